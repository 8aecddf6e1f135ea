"""Process groups of the embedded stack: start one, remember its descendants, stop all of it.

Every long-running component runs as the leader of its own process group, so that one
`killpg()` reaches its children (LocalExecutor workers, gunicorn/uvicorn workers, serve-logs).
That is not enough on its own: a component may start grandchildren in sessions of their own
(the local backend starts each training step with `start_new_session=True`), and a component
killed with SIGKILL leaves its group and those sessions orphaned. `Descendants` snapshots the
process tree while the leader lives, so that what it left behind can still be found and
stopped after it died; (pid, create time) pairs guard against a reused pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from arf_training.logrotate import RotatingLog, private_fd


def start_process(command: list[str], env: dict[str, str], log: Path | RotatingLog,
                  **popen_kwargs) -> subprocess.Popen:
    """Start `command` as the leader of a new session (and process group), its output
    appended to `log`: a file (0600, written directly) or a `RotatingLog` (through a pipe that
    the log drains, so that it can rotate without losing a line); `popen_kwargs` e.g. the user
    to run as (the database server)."""
    if isinstance(log, RotatingLog):
        log.path.parent.mkdir(parents=True, exist_ok=True)
        output = log.pipe()
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        output = open_private_log(log)
    with output as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                **popen_kwargs)


def open_private_log(path: Path):
    """`path` opened for appending, 0600 (see `private_fd`)."""
    return os.fdopen(private_fd(path), "ab")


def port_holder(port: int) -> str | None:
    """Who listens on TCP `port` (any address), as 'pid N (command line)'; None if nobody
    does, or if this system does not tell."""
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.Error:
        return None
    for conn in conns:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if not conn.pid:  # another user's socket, as seen by a non-root caller
            return "a process of another user"
        try:
            words = " ".join(psutil.Process(conn.pid).cmdline()).split()  # one line
            return f"pid {conn.pid} ({' '.join(words)[:80]})"
        except psutil.Error:
            return f"pid {conn.pid}"
    return None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member runs as another user (e.g. the postgres server)
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(pid: int) -> None:
    """Collect our own child's exit status, if it is one (no zombie left behind)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class Descendants:
    """Last known descendants of one process: (pid, create_time) pairs."""

    def __init__(self) -> None:
        self.known: dict[int, float] = {}

    def snapshot(self, pid: int) -> None:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return  # keep the last snapshot: the leader is gone, its leftovers are not
        seen = {}
        for child in children:
            try:
                seen[child.pid] = child.create_time()
            except psutil.Error:
                pass
        # Keep the leftovers of earlier snapshots too: a step process in its own session
        # stops being a descendant the moment its parent (the task runner) dies.
        self.known = {**{p: t for p, t in self.known.items() if _same(p, t)}, **seen}

    def alive(self) -> list[psutil.Process]:
        found = []
        for pid, created in self.known.items():
            if _same(pid, created):
                try:
                    found.append(psutil.Process(pid))
                except psutil.Error:
                    pass
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal each leftover descendant and its whole process group (a step's torchrun
        and its ranks form one group)."""
        for proc in self.alive():
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                continue
            if pgid > 1 and pgid != os.getpgid(0):
                signal_group(pgid, sig)
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass


def group_descendants(pgid: int) -> Descendants:
    """The members of process group `pgid` and everything below them: what a component left
    running, found from its group when its supervisor (and so its `Descendants`) is gone."""
    found = Descendants()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.snapshot(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def _same(pid: int, created: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - created) < 0.01
    except psutil.Error:
        return False


def stop_groups(groups: dict[str, int], grace_s: float = 15,
                descendants: dict[str, Descendants] | None = None,
                first_signal: int = signal.SIGTERM) -> list[str]:
    """SIGTERM every process group, SIGKILL what is left after `grace_s` (and the recorded
    descendants of each); the names stopped, in the order given.

    Airflow components do not stop their children on SIGTERM (task runners, gunicorn/uvicorn
    workers), hence whole groups, and SIGKILL for whatever lingers.
    """
    descendants = descendants or {}
    for name, pgid in groups.items():
        if name in descendants:
            descendants[name].snapshot(pgid)
        signal_group(pgid, first_signal)
    deadline = time.monotonic() + grace_s
    for pgid in groups.values():
        while time.monotonic() < deadline and group_alive(pgid):
            reap(pgid)
            time.sleep(0.2)
    for name, pgid in groups.items():
        signal_group(pgid, signal.SIGKILL)
        if name in descendants:
            descendants[name].kill()
        reap(pgid)
    return list(groups)
