"""The streaming source's one pass before training, split over the ranks.

Before the first step, the prepared data is checked whole (every shard's sha256 and row count,
every feature and target value of both splits: a null, NaN or infinite one is named by its
shard, row and key) and the training split's statistics are computed (feature and target
mean/std, the classifier's labels). Every rank used to do all of it: on hundreds of GPUs, the
dataset was read hundreds of times before training started. Now:

1. `share`: each rank takes the shards whose middle row falls in its contiguous part of the
   split's rows (whole shards, so each is opened by one rank only; prepare cuts shards of at
   most 262,144 rows) and checks and summarizes them, in the order one rank alone would: the
   sha256 of the training shards, then of the validation shards, then the validation values,
   then the training values. It runs before the process group exists, and stops at its first
   bad shard, keeping the error instead of raising it: a rank that raised before
   `init_process_group` would leave the others waiting there until its timeout.
2. `agree`, after `dist.init`: one `all_gather_object` of the shares (a few KiB: per-column
   sums, never rows). If any rank found bad data, every rank raises the error one rank alone
   would have met first (the smallest (phase, shard) position): the same message and exit code
   everywhere, at once. Otherwise the statistics are merged in rank order, i.e. in shard order.

Reproducible: the shares and their merge order are functions of the manifest and the world
size, so the same data and world size give bitwise the same statistics; with one rank, the
pass is the single running merge it always was. (A different world size may change their last
bits: a checkpoint records the world size and refuses another one anyway.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arf_trainer.errors import TrainerError, TrainingError
from arf_trainer.trainer.data import (
    Manifest,
    checked_shard,
    feature_matrix,
    target_matrix,
)
from arf_trainer.trainer.dist import DistEnv, all_gather_objects
from arf_trainer.trainer.recipes import Recipe, stats_of

# The order one rank alone checks in; a share's error is placed by (phase, shard index).
SHA_TRAIN, SHA_VAL, VALUES_VAL, VALUES_TRAIN = range(4)


class RunningStats:
    """Column mean and variance merged over chunks (Chan et al.), in float64."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, values: np.ndarray) -> None:
        values = values.astype(np.float64, copy=False)
        mean = values.mean(axis=0)
        self._merge(len(values), mean, ((values - mean) ** 2).sum(axis=0))

    def merge(self, other: "RunningStats") -> None:
        if other.mean is not None:
            self._merge(other.n, other.mean, other.m2)

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    def result(self) -> Any:
        return None if self.mean is None else stats_of(self.mean, np.sqrt(self.m2 / self.n))


def owned(rows: list[int], world_size: int, rank: int) -> list[int]:
    """Indices of the shards `rank` checks: those whose middle row falls in its contiguous
    1/world_size of the rows (every shard has exactly one owner; a rank may have none)."""
    total = sum(rows)
    first, mine = 0, []
    for index, count in enumerate(rows):
        # floor(middle x world / total), in integers: the same on every rank and platform.
        owner = (2 * first + count) * world_size // (2 * total) if total else 0
        if min(owner, world_size - 1) == rank:
            mine.append(index)
        first += count
    return mine


@dataclass
class Share:
    """What one rank's shards add to the pass, or the first bad one it met."""

    x: RunningStats = field(default_factory=RunningStats)
    y: RunningStats = field(default_factory=RunningStats)
    labels: list[np.ndarray] = field(default_factory=list)
    width: int = 0
    error: tuple[tuple[int, int], TrainerError] | None = None


def share(manifest: Manifest, recipe: Recipe, denv: DistEnv,
          checked_columns: Callable[[str, list[str], int], Iterator[dict[str, np.ndarray]]]
          ) -> tuple[Share, Exception | None]:
    """This rank's part of the pass, and the exception behind its error (kept on this rank to
    be raised with its traceback; the share carries a picklable copy). `checked_columns(split,
    names, index)`: the checked values of one shard, in bounded read batches."""
    mine = {split: owned([int(s["rows"]) for s in manifest.shards(split)], denv.world_size,
                         denv.rank) for split in ("train", "val")}
    result, at = Share(), (SHA_TRAIN, 0)
    try:
        for phase, split in ((SHA_TRAIN, "train"), (SHA_VAL, "val")):
            for index in mine[split]:
                at = (phase, index)
                checked_shard(manifest, manifest.shards(split)[index])
        names = manifest.features + manifest.targets
        for index in mine["val"]:
            at = (VALUES_VAL, index)
            for _ in checked_columns("val", names, index):
                pass  # a bad value is named now, not after an epoch of training
        for index in mine["train"]:
            at = (VALUES_TRAIN, index)
            for columns in checked_columns("train", names, index):
                _summarize(result, recipe, manifest, columns)
    except Exception as exc:  # exchanged in `agree`, then raised on every rank
        copy = exc if isinstance(exc, TrainerError) else TrainingError(
            f"{type(exc).__name__} while checking the prepared data: {exc}")
        return Share(error=(at, copy)), exc
    if recipe.target_labels and result.labels:
        result.labels = [np.unique(np.concatenate(result.labels))]
    return result, None


def _summarize(result: Share, recipe: Recipe, manifest: Manifest,
               columns: dict[str, np.ndarray]) -> None:
    x = feature_matrix(columns, manifest.features)
    result.width = x.shape[1]
    if recipe.fits_normalization:
        result.x.add(x)
    y = target_matrix(columns, manifest.targets)
    if recipe.target_labels:
        result.labels.append(np.unique(y))
    elif y.dtype.kind in "fiu":
        result.y.add(y.astype(np.float32))
        result.labels = [y[:0]]


@dataclass(frozen=True)
class Agreed:
    """The pass's outcome, the same on every rank."""

    x_stats: Any
    y_stats: Any
    labels: np.ndarray
    width: int


def agree(mine: Share, raised: Exception | None, recipe: Recipe, denv: DistEnv) -> Agreed:
    """Every rank's share merged in rank order; or, on every rank, the first error met."""
    shares = all_gather_objects(denv, mine)
    errors = [s.error for s in shares if s.error is not None]
    if errors:
        first = min(errors, key=lambda e: e[0])
        if raised is not None and mine.error is not None and mine.error[0] == first[0]:
            raise raised
        raise first[1]
    x, y, labels, width = RunningStats(), RunningStats(), [], 0
    for part in shares:
        x.merge(part.x)
        y.merge(part.y)
        labels += part.labels
        width = max(width, part.width)
    if recipe.target_labels:
        found = np.unique(np.concatenate(labels)) if labels else np.zeros(0)
    else:
        found = labels[0] if labels else np.zeros(0, np.float32)
    return Agreed(x.result(), y.result(), found, width)
