"""torchrun for the local backend, with its TCP stores listening on loopback only.

`python -m arf_training.backends.loopback_torchrun <torchrun arguments>` is torchrun, except
that every TCPStore server it starts listens on 127.0.0.1 instead of every interface. Plain
torchrun's rendezvous store and the store it shares with its workers bind `::`/`0.0.0.0` whatever
host they are given (`ss -ltnp` showed both on `*:<port>` during a `--standalone` run), and the
c10d rendezvous `pickle.loads` the state it reads from that store: anyone who could reach the
port during a multi-process step could run code as the step's user. The local backend promises
that nothing it starts listens beyond this machine.

How: TCPStore takes `master_listen_fd`, a socket already bound (torch's own option, used by
its tests and by launchers that pre-bind ports). `LoopbackTCPStore` binds that socket to
127.0.0.1 for every server store (`is_master=True`) the agent makes; clients are untouched.
This process imports torch; the Airflow side only names it in a command line.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

LOOPBACK = "127.0.0.1"
# torch.distributed.elastic.utils.distributed._ADDRESS_IN_USE, which torchrun matches exactly.
ADDRESS_IN_USE = "Address already in use"


def torchrun_command() -> list[str]:
    """The command line that starts this module as torchrun (`-P`: the step's working
    directory, its workspace, is not searched for modules)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        from arf_training.errors import ArfError

        raise ArfError(f"torchrun needs torch, which {sys.executable} cannot import; install "
                       "arf-training with its extras ('pip install -e .[all]') here")
    return [sys.executable, "-P", "-m", "arf_training.backends.loopback_torchrun"]


def free_port() -> int:
    """A free TCP port on loopback (for a rendezvous endpoint of several local nodes)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def install() -> type:
    """Replace `torch.distributed.TCPStore` (before torchrun's modules import it) with a
    subclass whose servers listen on loopback; returns the subclass."""
    import torch.distributed as dist

    base = dist.TCPStore
    if getattr(base, "_arf_loopback", False):
        return base
    names = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers",
             "multi_tenant", "master_listen_fd", "use_libuv")

    class LoopbackTCPStore(base):  # type: ignore[misc, valid-type]
        _arf_loopback = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            given = dict(zip(names, args))
            given.update(kwargs)
            if given.get("is_master") and given.get("master_listen_fd") is None:
                fd, port = _bind(int(given.get("port") or 0))
                given.update(port=port, master_listen_fd=fd)
            super().__init__(**given)

    dist.TCPStore = LoopbackTCPStore
    return LoopbackTCPStore


def _bind(port: int) -> tuple[int, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, max(0, port)))
        sock.listen(socket.SOMAXCONN)
        bound = sock.getsockname()[1]
    except OSError as exc:
        sock.close()
        # As torch's own server reports it: torchrun then falls back to being a client of the
        # store another agent on this machine hosts (c10d rendezvous), or retries another
        # free port (its shared store).
        raise RuntimeError(ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else
                           f"cannot listen on {LOOPBACK}:{port}: {exc}") from exc
    return sock.detach(), bound  # the store owns the descriptor from here on


def main(argv: list[str] | None = None) -> None:
    install()
    from torch.distributed.run import main as torchrun

    torchrun(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
