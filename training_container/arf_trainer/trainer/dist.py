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
        torch_dist.init_process_group(backend=backend, rank=denv.rank,
                                      world_size=denv.world_size, **kwargs)
    return device


def teardown(denv: DistEnv, clean: bool = True) -> None:
    """Destroy the process group; on a clean exit, only after every rank has arrived.

    Without the barrier, a fast rank can tear down gloo while a slower peer still has a
    collective in flight, and that peer then aborts ("Connection closed by peer"). After a
    failure (`clean=False`) the peers may never reach a barrier, so none is attempted.
    """
    if denv.enabled and torch_dist.is_initialized():
        try:
            if clean:
                torch_dist.barrier()
        finally:
            torch_dist.destroy_process_group()


def barrier(denv: DistEnv) -> None:
    if denv.enabled:
        torch_dist.barrier()


def all_reduce_sum(denv: DistEnv, values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python floats over all ranks (float64, so epoch sums stay exact enough)."""
    if not denv.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_from_main(denv: DistEnv, obj: T) -> T:
    """Return rank 0's `obj` on every rank (a small picklable value)."""
    if not denv.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


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
