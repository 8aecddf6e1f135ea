"""The data part of the training loop: the in-memory loader, and `open_source`, which picks it
or the streaming one (stream.py) for a run; see data.py for the batch interface.

Both give the same two-phase interface to the loop:

* a *source*, before the model exists: ``labels`` (what ``Recipe.describe`` sees of the
  training targets), ``set_normalization(recipe, model, info)`` (the training split's
  statistics into the model's buffers);
* a *loader*, once the model exists (`source.loader(...)`): ``steps_per_epoch``,
  ``batches(epoch, skip)`` (this rank's batches of an epoch from batch `skip`, an exact
  resume position), ``val_chunks()`` (this rank's share of the validation split) and
  ``state()`` / ``check_state(state)`` (what the checkpoint stores, and its check on resume).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from arf_trainer.trainer.accel import tensor_bytes
from arf_trainer.trainer.data import (
    Inputs,
    Manifest,
    chunks,
    read_split,
    take,
    target_matrix,
    to_device,
)
from arf_trainer.trainer.checkpoint import CheckpointError
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.recipes import MLP, ModelInfo, Recipe


class ShardedBatchSampler(Sampler[torch.Tensor]):
    """This rank's batches of an epoch, as index tensors: exactly the batches of
    ``BatchSampler(DistributedSampler(n, world_size, rank, shuffle=True, seed=seed),
    batch_size, drop_last=False)`` after ``set_epoch(epoch)``, computed without Python lists.

    DistributedSampler builds a Python list of every index each epoch and BatchSampler hands
    out lists that each indexing converts back into a tensor: ~30 us a step, 2% of a small
    MLP's step on one CPU core (bench/harness_overhead.py). tests/unit/test_trainer.py checks
    the equality with torch's samplers.
    """

    def __init__(self, n: int, world_size: int, rank: int, batch_size: int, seed: int) -> None:
        if n <= 0 or batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatchSampler(n={n}, world_size={world_size}, rank={rank}, "
                             f"batch_size={batch_size}): need n, batch_size > 0 and a valid rank")
        self.n, self.world_size, self.rank = n, world_size, rank
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from torch.split(self.order(), self.batch_size)

    def order(self) -> torch.Tensor:
        """This rank's indices of the epoch, in order (the batches are its consecutive cuts)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        total = self.per_rank * self.world_size
        if total > self.n:  # pad by repeating the permutation from its start, as torch does
            order = order.repeat(math.ceil(total / self.n))[:total]
        return order[self.rank:total:self.world_size]

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)


@dataclass
class MemorySource:
    """Both splits read whole: every column as one NumPy array."""

    manifest: Manifest
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    mode = "memory"

    @classmethod
    def read(cls, manifest: Manifest) -> "MemorySource":
        names = manifest.features + manifest.targets
        return cls(manifest, read_split(manifest, "train", names),
                   read_split(manifest, "val", names))

    @property
    def labels(self) -> np.ndarray:
        return target_matrix(self.train, self.manifest.targets)

    @property
    def feature_width(self) -> int:
        return sum(int(np.prod(self.train[n].shape[1:])) for n in self.manifest.features)

    def agree(self, denv: DistEnv) -> None:
        """Nothing to exchange: every rank read and checked the whole (small) split."""

    def set_normalization(self, recipe: Recipe, model: MLP, info: ModelInfo) -> None:
        if not recipe.fits_normalization:
            return
        from arf_trainer.trainer.stream import READ_ROWS
        from arf_trainer.trainer.stream_scan import RunningStats

        # Statistics of what the model standardizes (`normalized_inputs`: the flattened
        # features of an MLP, bc_pixels' state alone, not every pixel), over row chunks: a
        # float64 copy of a whole split (of 176 MB of frames) peaked at 4.6 GB.
        x_stats, y_stats = RunningStats(), RunningStats()
        n = len(next(iter(self.train.values())))
        for start in range(0, n, READ_ROWS):
            part = {name: values[start:start + READ_ROWS] for name, values in self.train.items()}
            x, targets = recipe.columns_to_tensors(info, part, "training")
            x_stats.add(recipe.normalized_inputs(x).numpy())
            if targets.is_floating_point():
                y_stats.add(targets.numpy())
        recipe.set_inputs_normalization(model, x_stats.result(), y_stats.result())

    def loader(self, recipe: Recipe, info: ModelInfo, model: MLP, denv: DistEnv,
               batch_size: int, seed: int) -> "MemoryLoader":
        x, y = recipe.columns_to_tensors(info, self.train, "training")
        x_val, y_val = (recipe.columns_to_tensors(info, self.val, "validation")
                        if self.val else (None, None))
        # Preprocessed once for the whole split (the recipe's transform is row-wise), so a
        # step only slices: the same rows as a per-batch transform, without its cost.
        tensors = recipe.training_tensors(model, x, y)
        sampler = ShardedBatchSampler(len(tensors[1]), denv.world_size, denv.rank, batch_size,
                                      seed=seed)
        return MemoryLoader(tensors, sampler, x_val, y_val, denv)


class MemoryLoader:
    mode = "memory"

    def __init__(self, tensors: tuple[Inputs, torch.Tensor], sampler: ShardedBatchSampler,
                 x_val: Inputs | None, y_val: torch.Tensor | None, denv: DistEnv) -> None:
        self.tensors, self.sampler, self.denv = tensors, sampler, denv
        self.x_val, self.y_val = x_val, y_val
        self.steps_per_epoch = len(sampler)
        self.device: torch.device | None = None

    def tensor_bytes(self) -> int:
        """Bytes of the training and validation tensors (what `to_device` would copy)."""
        return tensor_bytes((self.tensors, self.x_val, self.y_val))

    def to_device(self, device: torch.device) -> None:
        """Keep both splits on `device` (accel.place decides): a step then only indexes them."""
        x, y = self.tensors
        self.tensors = (to_device(x, device), y.to(device))
        if self.y_val is not None:
            self.x_val, self.y_val = to_device(self.x_val, device), self.y_val.to(device)
        self.device = device

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[Inputs, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        x, y = self.tensors
        order = self.sampler.order()
        if self.device is not None:  # the data is on the device: so is the order (one copy)
            order = (order.pin_memory().to(self.device, non_blocking=True)
                     if self.device.type == "cuda" else order.to(self.device))
        for i, index in enumerate(torch.split(order, self.sampler.batch_size)):
            if i >= skip:  # the permutation is drawn whole; skipping costs no data reads
                yield take(x, index), y[index]

    def val_chunks(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """Every world_size-th validation row, from this rank's offset (exact: no padding)."""
        if self.y_val is None:
            return
        step = slice(self.denv.rank, None, self.denv.world_size)
        yield from chunks(take(self.x_val, step), self.y_val[step])

    def state(self) -> dict[str, Any]:
        return {"mode": "memory", "rows": self.sampler.n}

    def check_state(self, state: dict[str, Any] | None) -> None:
        if state is not None and state != self.state():
            raise CheckpointError(f"the checkpoint was written reading the data as {state}, this "
                                f"run reads it as {self.state()}; delete the checkpoints to "
                                "start over")


def open_source(mode: str, manifest: Manifest, recipe: Recipe, denv: DistEnv,
                window_rows: int | None = None) -> Any:
    """The data source for `mode` (memory | stream)."""
    if mode == "memory":
        return MemorySource.read(manifest)
    from arf_trainer.trainer.stream import StreamSource

    return StreamSource.scan(manifest, recipe, window_rows=window_rows, denv=denv)
