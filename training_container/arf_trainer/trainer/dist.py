"""The distributed shape of this process, and the few collective helpers the trainer needs.

torchrun (or the Kubeflow PyTorchJob) sets RANK, LOCAL_RANK and WORLD_SIZE; we read them once
into a frozen `DistEnv`, like nanoGPT's `ddp_rank`/`ddp_world_size`. Without them (a plain
`arf-trainer train`) the trainer runs as a single process and never creates a process group,
so every helper here degrades to a no-op when `DistEnv.enabled` is false.

Rank-0 side effects (MLflow, result files, checkpoint renames) go through `is_main` checks in
the callers; `run_on_main` runs a rank-0-only action and tells every rank whether it worked, so a
failure there ends the job on all ranks instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from arf_trainer.errors import SpecError, TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Rank and world size of this process, read once from the torchrun environment."""

    rank: int
    local_rank: int
    world_size: int
    enabled: bool
    """True when started by torchrun (RANK is set): a process group is created, even for 1 rank."""

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process that talks to MLflow and writes shared files."""
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        if "RANK" not in env:
            return cls(rank=0, local_rank=0, world_size=1, enabled=False)

        def read_int(name: str) -> int:
            value = env.get(name)
            try:
                return int(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise SpecError(
                    f"environment variable {name}={value!r} is not an integer; RANK is set, so "
                    "this looks like a torchrun launch, which sets RANK, LOCAL_RANK and "
                    "WORLD_SIZE together: start the step with torchrun or unset RANK"
                ) from None

        rank, local_rank = read_int("RANK"), read_int("LOCAL_RANK")
        world_size = read_int("WORLD_SIZE")
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise SpecError(
                f"inconsistent torchrun environment RANK={rank} LOCAL_RANK={local_rank} "
                f"WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
            )
        return cls(rank=rank, local_rank=local_rank, world_size=world_size, enabled=True)


def init(denv: DistEnv) -> torch.device:
    """Create the process group (if launched by torchrun) and return this rank's device.

    NCCL when CUDA is available (one GPU per local rank), gloo on CPU.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", denv.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if denv.enabled and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds NCCL communicators eagerly; gloo has no use for it.
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        store = _restart_store(denv) or _loopback_store(denv)
        if store is not None:
            kwargs["store"] = store
        torch_dist.init_process_group(backend=backend, rank=denv.rank,
                                      world_size=denv.world_size, **kwargs)
    return device


def _restart_store(denv: DistEnv) -> torch_dist.Store | None:
    """After an elastic restart on one node, a store namespace of its own for this attempt.

    torchrun keeps its agent's TCPStore for the whole job and, by default
    (TORCHELASTIC_USE_AGENT_STORE=True), the env:// rendezvous reuses it without a per-attempt
    prefix. The process group's keys written by the failed attempt (each rank's gloo/NCCL
    address) are still there, so a restarted rank may read its dead predecessor's address and
    fail with "Gloo connectFullMesh failed ... Connection refused": 3 restarts in 5 here with
    torch 2.13 and a minimal script; 0 in 5 with this prefix, 0 in 5 with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set for torchrun.

    On a single node (GROUP_WORLD_SIZE=1) every worker of an attempt has the same
    TORCHELASTIC_RESTART_COUNT, so it is the prefix. Across nodes it is not (an agent whose
    workers were healthy restarts them without counting), so there the launcher must set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (a fresh store per attempt) and None is
    returned (torch's default path).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if (attempt in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or os.environ.get("GROUP_WORLD_SIZE") != "1"):
        return None
    from torch.distributed.constants import default_pg_timeout

    client = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                 denv.world_size, is_master=False, timeout=default_pg_timeout)
    return torch_dist.PrefixStore(f"arf/attempt-{attempt}", client)


def _loopback_store(denv: DistEnv) -> torch_dist.Store | None:
    """The job's store, listening on 127.0.0.1 only, when this rank would host it and every
    peer reaches it through a loopback MASTER_ADDR.

    Without torchrun's agent store (the local backend's several nodes set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, see `_restart_store`), rank 0's env:// rendezvous
    starts a TCPStore on every interface whatever MASTER_ADDR says, and anyone who reached the
    port could write the process group's keys. Every rank then uses a store made here (a
    server on rank 0, clients elsewhere), so that all of them see the same keys: torch prefixes
    the rendezvous' store with "default_pg" but not one that is passed in.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or \
            not _is_loopback(os.environ.get("MASTER_ADDR", "")):
        return None
    import socket

    from torch.distributed.constants import default_pg_timeout

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if denv.rank != 0:
        return torch_dist.TCPStore(host, port, denv.world_size, is_master=False,
                                   timeout=default_pg_timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    return torch_dist.TCPStore(host, port, denv.world_size, is_master=True,
                               timeout=default_pg_timeout, multi_tenant=True,
                               master_listen_fd=listener.detach())


def _is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one (False if it resolves to
    none: torch then fails with its own message)."""
    import ipaddress
    import socket

    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


def teardown(denv: DistEnv) -> None:
    """Destroy the process group after every rank has arrived (clean exits only).

    Without the barrier, a fast rank can tear down gloo while a slower peer still has a
    collective in flight, and that peer then aborts ("Connection closed by peer"). After a
    failure nothing is torn down: the peers may never reach a barrier, and destroying a gloo
    group with work in flight can deadlock (see `arf_trainer.cli._exit_failed_worker`).
    """
    if denv.enabled and torch_dist.is_initialized():
        try:
            torch_dist.barrier()
        finally:
            torch_dist.destroy_process_group()


def barrier(denv: DistEnv, group: Any = None) -> None:
    if denv.enabled:
        torch_dist.barrier(group=group)


def side_group(denv: DistEnv) -> Any:
    """A second process group of all ranks (gloo: CPU only), for collectives issued from
    another thread than the training's: those of one group must come in one order on every
    rank. Collective: every rank calls it at the same point. None without distribution."""
    return torch_dist.new_group(backend="gloo") if denv.enabled else None


def all_reduce_sum(denv: DistEnv, values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python floats over all ranks (float64, so epoch sums stay exact enough)."""
    if not denv.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(denv: DistEnv, flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on at least one (one 1-element all_reduce)."""
    if not denv.enabled:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return bool(tensor.item())


class StopAgreement:
    """Decides, identically on every rank, whether all ranks stop after the current step.

    SIGTERM reaches the ranks at different moments, so each rank's own flag is not enough:
    they must stop after the same step or the next collective hangs. Agreeing costs one
    all_reduce: 0.3-0.9 ms with gloo on two busy CPU cores, which made every-step agreement
    cost 17-29% of the samples/s (bench/preemption_check.py). So the ranks agree only every K
    steps, with K such that about `interval_s` of training passes between agreements: the cost
    drops into the noise, and stopping takes at most about `interval_s` longer. K comes from
    the all-reduced (slowest rank's) step time, so every rank computes the same K and joins the
    same collectives; steps slower than `interval_s` are agreed on every step.
    A single process has nothing to agree with and checks its own flag every step.
    """

    MAX_EVERY = 1000

    def __init__(self, denv: DistEnv, device: torch.device, interval_s: float = 0.25) -> None:
        self.denv, self.device, self.interval_s = denv, device, interval_s
        self._next_step: int | None = None  # None: agree after the first step seen
        self._since_step: int | None = None
        self._since = time.perf_counter()

    def stop(self, step: int, requested: bool) -> bool:
        """Called after every optimizer step `step` (same numbering on every rank)."""
        if not self.denv.enabled:
            return requested
        if self._next_step is not None and step < self._next_step:
            return False
        now = time.perf_counter()
        steps = step - self._since_step if self._since_step is not None else 1
        tensor = torch.tensor([float(requested), (now - self._since) / max(steps, 1)],
                              dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        flag, seconds_per_step = tensor.tolist()
        every = int(self.interval_s / seconds_per_step) if seconds_per_step > 0 else 1
        self._next_step = step + min(max(every, 1), self.MAX_EVERY)
        self._since_step, self._since = step, time.perf_counter()
        return flag > 0


def broadcast_from_main(denv: DistEnv, obj: T) -> T:
    """Return rank 0's `obj` on every rank (a small picklable value)."""
    if not denv.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(denv: DistEnv, obj: T) -> list[T]:
    """Every rank's `obj` (small and picklable), in rank order, on every rank."""
    if not denv.enabled:
        return [obj]
    gathered: list[Any] = [None] * denv.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def run_on_main(denv: DistEnv, action: Callable[[], T], what: str) -> T | None:
    """Run `action` on rank 0 only, then raise on every rank if it failed there.

    Rank 0's own exception propagates unchanged; the other ranks raise a `TrainingError` that
    points at rank 0's log, instead of blocking in the next collective until the timeout.
    Returns the action's value on rank 0 and None elsewhere.
    """
    value: T | None = None
    error: str | None = None
    caught: BaseException | None = None
    if denv.is_main:
        try:
            value = action()
        except Exception as exc:  # re-raised below, after the other ranks have been told
            caught, error = exc, f"{type(exc).__name__}: {exc}"
    error = broadcast_from_main(denv, error)
    if caught is not None:
        raise caught
    if error is not None:
        raise TrainingError(f"rank 0 failed to {what} ({error}); see rank 0's log for details")
    return value
