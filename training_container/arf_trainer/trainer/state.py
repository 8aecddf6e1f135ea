"""The model/optimizer state of the training loop and its checkpointing (torchtitan's
TrainState + CheckpointManager split, over checkpoint.py's complete-or-absent folders).

A checkpoint holds, from rank 0: model, optimizer, `Progress` (step, epoch, batches done in
it, last metrics), the resolved config and its hash; from every rank: its RNG states, its
partial epoch sums and its data loader's state (mode and layout; the exact position is
``(epoch, batches_done)``, from which a loader replays nothing it does not need).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arf_trainer.trainer.checkpoint import (
    CheckpointError,
    Checkpointer,
    capture_rng_state,
    cpu_copy,
    cpu_state_dict,
    restore_rng_state,
)
from arf_trainer.trainer.config import TrainConfig
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.recipes import MLP
from arf_trainer.trainer.testhooks import TestHooks

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands; what a checkpoint must restore besides weights and optimizer."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    """Batches of `epoch` already trained (a resumed run skips them)."""
    loss_sum: float = 0.0
    """This rank's summed per-sample training loss in `epoch` (for the epoch's mean)."""
    samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    """The last finished epoch's metrics."""

    def shared(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "metrics": self.metrics}

    def next_epoch(self, metrics: dict[str, float]) -> "Progress":
        return Progress(step=self.step, epoch=self.epoch + 1,
                        metrics={**metrics, "epoch": float(self.epoch + 1)})


@dataclass
class TrainState:
    """Model, optimizer, the module the step trains (DDP-wrapped core) and the progress."""

    model: MLP
    optimizer: torch.optim.Optimizer
    net: torch.nn.Module
    progress: Progress = field(default_factory=Progress)


class CheckpointPart:
    """Saves and resumes `TrainState` + the loader's state; times its own saves."""

    def __init__(self, folder: Path, cfg: TrainConfig, denv: DistEnv, hooks: TestHooks, *,
                 data_fingerprint: str) -> None:
        self.cfg, self.denv = cfg, denv
        # Not part of config_hash (that is the template, hyperparameters and seed, tagged on the
        # run); checked on resume so that data prepared again by hand never continues a training
        # begun on other rows.
        self.data_fingerprint = data_fingerprint
        self.checkpointer = Checkpointer(folder, denv, keep=cfg.keep_checkpoints,
                                         every_steps=cfg.checkpoint_every_steps, hooks=hooks,
                                         async_writes=cfg.async_checkpoint)
        self.latest = self.checkpointer.latest_step()
        self.seconds = 0.0

    @property
    def folder(self) -> Path:
        return self.checkpointer.folder

    def due(self, step: int) -> bool:
        return self.checkpointer.due(step)

    def save(self, state: TrainState, loader: Any, wait: bool = True) -> None:
        """Collective; a no-op if this step is already saved. `wait` False: written in the
        background when training.async_checkpoint is on (a periodic save)."""
        progress = state.progress
        background = not wait and self.checkpointer.async_writes
        optimizer = state.optimizer.state_dict() if self.denv.is_main else {}
        shared = {
            "model": cpu_state_dict(state.model.state_dict()),
            # The writer thread must not see the next steps' in-place updates.
            "optimizer": cpu_copy(optimizer) if background else optimizer,
            "progress": progress.shared(),
            "config": self.cfg.resolved,
            "config_hash": self.cfg.config_hash,
            "data_fingerprint": self.data_fingerprint,
        } if self.denv.is_main else {}
        started = time.perf_counter()
        self.checkpointer.save(progress.step, shared, {
            "rng": capture_rng_state(), "data": loader.state(),
            "loss_sum": progress.loss_sum, "samples": progress.samples}, wait=wait)
        self.seconds += time.perf_counter() - started

    def resume(self, state: TrainState, loader: Any) -> None:
        """Load the highest complete step into `state`, if there is one."""
        if self.latest is None:
            return
        ckpt = self.checkpointer.load(self.latest)
        where = f"checkpoint step-{self.latest} in {self.folder}"
        if ckpt.shared["config_hash"] != self.cfg.config_hash:
            changed = ", ".join(_differences(ckpt.shared.get("config"), self.cfg.resolved))
            raise CheckpointError(
                f"{where} was written with another configuration (differs in: "
                f"{changed or 'config_hash'}); one checkpoints folder holds one training: "
                "restore the original settings, or delete the checkpoints folder to start over"
            )
        trained_on = ckpt.shared.get("data_fingerprint")  # absent: written by an older trainer
        if trained_on is not None and trained_on != self.data_fingerprint:
            raise CheckpointError(
                f"{where} was written while training on other prepared data (fingerprint "
                f"{str(trained_on)[:12]}, the prepare folder now holds "
                f"{self.data_fingerprint[:12]}); one checkpoints folder holds one training: "
                "restore the prepared data, or delete the checkpoints folder to start over")
        loader.check_state(ckpt.rank_state.get("data"))
        try:
            state.model.load_state_dict(ckpt.shared["model"])
            state.optimizer.load_state_dict(ckpt.shared["optimizer"])
            state.progress = Progress(**ckpt.shared["progress"],
                                      loss_sum=ckpt.rank_state["loss_sum"],
                                      samples=ckpt.rank_state["samples"])
            restore_rng_state(ckpt.rank_state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{where} does not fit this model or run ({exc}); delete "
                                  "the checkpoints folder to start over") from exc
        if self.denv.is_main:
            progress = state.progress
            log.info("resumed from %s/step-%d (epoch %d, after batch %d)", self.folder,
                     self.latest, progress.epoch + 1, progress.batches_done)


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted paths where two resolved configs differ (at most 5 named)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return found[:5]
    return [] if old == new else [path or "(whole config)"]
