"""Checkpoints (torchtitan-style) and the weights file with its sha256.

Layout under ``<workspace>/train/checkpoints/``::

    step-120/                 complete: it exists only after every file in it was written
        .complete             marker, written last before the rename (defence in depth)
        shared.pt             rank 0: model, optimizer, progress, resolved config
        rank-00000.pt         one per rank: RNG states (torch, numpy, python, cuda),
        rank-00001.pt         the DataLoader generator state, the rank's partial epoch sums
    .tmp-step-180/            being written, or left by a crash: ignored, removed on next save

A checkpoint is written into ``.tmp-step-N`` and renamed to ``step-N`` by rank 0 once every
rank has fsynced its file, so a reader sees a step complete or not at all. Resume picks the
highest complete step; only the latest ``keep`` steps are kept. The folder must be shared by
all ranks (one machine, or an RWX volume across nodes), like the rest of the run workspace.

Asynchronous writes (`training.async_checkpoint`, torchtitan's async mode): the loop's thread
only snapshots the state to CPU memory at step N; a writer thread writes, fsyncs and commits
``step-N`` (its barriers on a process group of its own, so they never interleave with the
training's collectives) while training goes on. At most one save is in flight: the next save,
the final one and a preemption's wait for it first (and raise its error, if any). A crash
during the write leaves only a ``.tmp-step-N``: complete-or-absent holds the same way.

Model and optimizer states are identical on every rank under DDP, so only rank 0 writes them.
The RNG and data-order states differ per rank, so each rank writes its own file; resuming with
a different world size is refused because those cannot be redistributed exactly.

Weights hash (`state_dict_sha256`): sha256 over the state_dict's entries in sorted key order;
for each entry the key (UTF-8), the dtype name, the shape, each followed by a NUL byte, then the
tensor's raw bytes (CPU, contiguous, native byte order). It depends only on names and values,
not on torch.save's container format, so it is stable across torch versions and files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arf_trainer.datahub.shards import sha256_file
from arf_trainer.errors import TrainingError
from arf_trainer.trainer import dist
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.testhooks import TestHooks


class CheckpointError(TrainingError):
    """A complete checkpoint that cannot be resumed (damaged, or written by another config or
    world size): every retry would meet it again, so bad input (exit 2); the message names it."""

    exit_code = 2


_STEP_DIR = re.compile(r"^step-(\d+)$")
_COMPLETE = ".complete"
_SHARED = "shared.pt"

log = logging.getLogger(__name__)


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of a state_dict's names, dtypes, shapes and values (see module docstring)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0"
                      f"{list(tensor.shape)}\0".encode())
        # A uint8 view gives the raw bytes of any dtype (bfloat16 has no numpy equivalent).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cpu_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy, keys in sorted order (so the saved file is deterministic too)."""
    # Contiguous: weights kept channels_last on a GPU (bc_pixels) are saved in the usual layout.
    return {key: state_dict[key].detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for key in sorted(state_dict)}


def cpu_copy(value: Any) -> Any:
    """`value` (nested dicts/lists/tuples) with every tensor replaced by a CPU copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_fsynced(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_weights(state_dict: Mapping[str, torch.Tensor], path: Path) -> str:
    """Atomically write a state_dict (CPU, sorted keys) to `path`; return its sha256."""
    weights = cpu_state_dict(state_dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _save_fsynced(weights, tmp)
    os.replace(tmp, path)
    return state_dict_sha256(weights)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: the file holds tensors only, so refuse anything that would run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise TrainingError(f"cannot load weights from {path}: {exc}") from exc


# -- RNG states, in a form torch.load(weights_only=True) accepts (tensors, tuples, ints) -------

def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class Checkpoint:
    """What `Checkpointer.load` returns: rank 0's shared state and this rank's own state."""

    step: int
    shared: dict[str, Any]
    rank_state: dict[str, Any]


class Checkpointer:
    """Save, prune and load ``step-N`` checkpoints (see the module docstring for the layout).

    Every method is collective: all ranks call it at the same step.
    """

    def __init__(self, folder: Path, denv: DistEnv, keep: int, every_steps: int,
                 hooks: TestHooks | None = None, async_writes: bool = False) -> None:
        if keep < 1:
            raise TrainingError(
                f"training.keep_checkpoints={keep} must be >= 1 (resume needs the latest one)"
            )
        if every_steps < 0:
            raise TrainingError(
                f"training.checkpoint_every_steps={every_steps} must be >= 0 "
                "(0 = only the final checkpoint)"
            )
        self.folder, self.denv, self.keep, self.every_steps = folder, denv, keep, every_steps
        self.hooks = hooks or TestHooks()
        self.async_writes = async_writes
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        # Collective on every rank, here, in the same order: the writer's own group.
        self._group = dist.side_group(denv) if async_writes else None

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def complete_steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        steps = []
        for child in self.folder.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / _COMPLETE).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The highest complete step, as rank 0 sees it (all ranks get the same answer)."""
        steps = self.complete_steps() if self.denv.is_main else None
        steps = dist.broadcast_from_main(self.denv, steps)
        return steps[-1] if steps else None

    def save(self, step: int, shared: Mapping[str, Any], rank_state: Mapping[str, Any],
             wait: bool = True) -> None:
        """Write ``step-N`` complete-or-absent. `shared` is taken from rank 0 only. With
        async writes and `wait` False, a writer thread writes it: the states handed in must be
        CPU snapshots that training does not change."""
        self.wait()
        tmp = self._begin(step)
        if tmp is None:  # already written (e.g. the last periodic checkpoint is the final one)
            return
        if wait or not self.async_writes:
            self._write(step, tmp, shared, rank_state, None)
            return

        def write() -> None:
            try:
                self._write(step, tmp, shared, rank_state, self._group)
            except BaseException as exc:  # raised by the next wait(), in the loop's thread
                self._error = exc

        self._writer = threading.Thread(target=write, name=f"checkpoint-step-{step}",
                                        daemon=True)
        self._writer.start()

    def wait(self) -> None:
        """Until the save in flight (if any) is committed; raises its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise TrainingError(f"writing a checkpoint in the background failed: {error}; the "
                                "previous complete checkpoint stays the resume point") from error

    def _begin(self, step: int) -> Path | None:
        """Rank 0 makes a fresh ``.tmp-step-N``; None on every rank if step-N is complete."""
        final = self.folder / f"step-{step}"
        tmp = self.folder / f".tmp-step-{step}"
        exists = False
        if self.denv.is_main:
            exists = (final / _COMPLETE).is_file()
            if not exists:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        return None if dist.broadcast_from_main(self.denv, exists) else tmp

    def _write(self, step: int, tmp: Path, shared: Mapping[str, Any],
               rank_state: Mapping[str, Any], group: Any) -> None:
        _save_fsynced(dict(rank_state), tmp / f"rank-{self.denv.rank:05d}.pt")
        if self.denv.is_main:
            _save_fsynced({**shared, "step": step, "world_size": self.denv.world_size},
                          tmp / _SHARED)
        # Every rank's file is on disk before the step becomes visible.
        dist.barrier(self.denv, group)
        if self.denv.is_main:
            self.hooks.before_checkpoint_commit()  # tests: a window to kill a save half-way
            # The files' sha256 (every rank's: the folder is shared): a resume verifies them,
            # so a damaged byte is refused instead of silently resumed from.
            digests = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
            (tmp / _COMPLETE).write_text(json.dumps({"step": step, "sha256": digests}) + "\n")
            _fsync_dir(tmp)
            os.rename(tmp, self.folder / f"step-{step}")
            _fsync_dir(self.folder)
            self._prune()
        dist.barrier(self.denv, group)

    def _prune(self) -> None:
        for old in self.complete_steps()[:-self.keep]:
            shutil.rmtree(self.folder / f"step-{old}", ignore_errors=True)
        for child in self.folder.iterdir():
            # Temp folders of an interrupted save; ours was just renamed away.
            if child.name.startswith(".tmp-step-"):
                shutil.rmtree(child, ignore_errors=True)

    def load(self, step: int) -> Checkpoint:
        path = self.folder / f"step-{step}"
        files = (_SHARED, f"rank-{self.denv.rank:05d}.pt")
        fix = ("delete that folder to resume from the previous checkpoint (or the whole "
               "checkpoints folder to start over)")
        try:
            self._verify(path, files, fix)
            shared, rank_state = (torch.load(path / name, map_location="cpu", weights_only=True)
                                  for name in files)
        except OSError as exc:  # the volume, not the checkpoint: a retry may read it
            raise TrainingError(f"checkpoint {path} cannot be read ({exc})") from exc
        except CheckpointError:
            raise
        except Exception as exc:  # torch.load of a damaged file: RuntimeError, EOFError, ...
            raise CheckpointError(f"checkpoint {path} is marked complete but cannot be loaded "
                                  f"({type(exc).__name__}: {exc}); {fix}") from exc
        missing = ([f"{_SHARED}:{k}" for k in _SHARED_KEYS if not isinstance(shared, dict)
                    or k not in shared]
                   + [f"{files[1]}:{k}" for k in _RANK_KEYS if not isinstance(rank_state, dict)
                      or k not in rank_state])
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not written "
                                  f"by this arf-trainer; {fix}")
        if shared["world_size"] != self.denv.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {shared['world_size']} processes but this "
                f"run has world size {self.denv.world_size}; per-rank RNG and data-order "
                "states cannot be redistributed exactly: rerun with the original "
                "training.distributed shape, or delete the checkpoints to start over"
            )
        return Checkpoint(step=step, shared=shared, rank_state=rank_state)

    @staticmethod
    def _verify(path: Path, files: tuple[str, ...], fix: str) -> None:
        """Check `files` against the sha256 recorded in the marker. A marker of an earlier
        arf-trainer (the bare step number) records none: such a checkpoint loads unchecked."""
        text = (path / _COMPLETE).read_text()
        if re.fullmatch(r"\d+\n?", text):
            log.warning("checkpoint %s records no sha256 (an earlier arf-trainer wrote it); "
                        "resuming from it unchecked", path)
            return
        try:
            digests = json.loads(text)["sha256"]
            wanted = {name: digests[name] for name in files}
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} has a damaged {_COMPLETE} marker or "
                                  f"one that does not list {exc}; {fix}") from exc
        for name, digest in wanted.items():
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint {path} lacks {name}; {fix}")
            if sha256_file(path / name) != digest:
                raise CheckpointError(f"checkpoint file {path / name} does not match the sha256 "
                                      f"recorded when it was written (damaged); {fix}")


_SHARED_KEYS = ("model", "optimizer", "progress", "config_hash", "world_size")
_RANK_KEYS = ("rng", "loss_sum", "samples")
