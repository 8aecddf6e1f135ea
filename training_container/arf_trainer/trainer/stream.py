"""Streaming the prepare step's shards: bounded memory at any dataset size, a deterministic
per-rank order, and an exact resume position.

Order of an epoch (a pure function of the seed, the epoch and the manifest):

1. the training shards in a permuted order (``default_rng([seed, epoch, 0])``), read as one
   logical stream of ``n`` rows;
2. that stream cut into windows of ``window_rows`` consecutive rows, each window's rows
   permuted (``default_rng([seed, epoch, 1, k])`` for window ``k``): a bounded shuffle whose
   memory is one window, never the dataset;
3. like torch's DistributedSampler, the shuffled stream padded by repeating it from its start
   to ``per_rank x world_size`` rows; rank ``r`` takes the contiguous rows ``r x per_rank`` ..
   ``(r + 1) x per_rank - 1`` of it and cuts them into batches of the per-rank batch size.

Contiguous, not strided (``r, r + world_size, ...``): a rank then reads its share of the data
and the windows at its share's two ends, not every row to keep one in world_size (on hundreds
of GPUs the data was read hundreds of times an epoch). The global batch of a step still mixes
world_size parts of the shuffled stream, and with one rank the order is the same. Validation
is split the same way, without padding.

Resume: batch ``b`` of an epoch starts at rank position ``b x batch_size``, so the stream
seeks to the window that holds it (skipping whole shards and Parquet row groups by their
metadata) and reads nothing before it. The checkpoint stores the layout (rows, shards,
window size, rank assignment: a different one is refused) with ``(epoch, batches_done)`` from
`Progress`.

Memory: one window of rows (``WINDOW_BYTES`` of decoded columns at most, or
``MAX_WINDOW_ROWS``), a Parquet read batch (``data.READ_BYTES`` decoded at most), and the batch.
Statistics (feature mean/std, the classifier's labels) come from one streaming pass that also
checks every shard's sha256 and every feature and target value of both splits (a null, NaN or
infinite one is refused before training starts): each rank reads its share of the shards
before the process group exists and the ranks agree after it (`stream_scan`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from arf_trainer.datahub.arrow_types import unsliced_table
from arf_trainer.errors import SpecError, TrainingError
from arf_trainer.trainer.data import (
    EVAL_CHUNK,
    Inputs,
    Manifest,
    chunks,
    concat,
    read_rows,
    read_table_columns,
    shard_row,
    take,
)
from arf_trainer.trainer.checkpoint import CheckpointError
from arf_trainer.trainer import stream_scan
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.recipes import MLP, ModelInfo, Recipe

WINDOW_BYTES = 64 * 2**20
MAX_WINDOW_ROWS = 65_536
READ_ROWS = 4096
READ_BUFFER = 1 << 20


WINDOW_ENV = "ARF_STREAM_WINDOW_ROWS"
"""Tests and benchmarks: a smaller window, so that small data spans many windows."""


def window_rows_for(manifest: Manifest) -> int:
    """The shuffle window: as many rows as fit WINDOW_BYTES decoded, at most MAX_WINDOW_ROWS
    (from the manifest only, so every rank and every retry agrees; a checkpoint written with
    another window is refused)."""
    if os.environ.get(WINDOW_ENV):
        raw = os.environ[WINDOW_ENV]
        if not raw.strip().isdigit() or int(raw) < 1:
            raise SpecError(f"{WINDOW_ENV}={raw!r} must be a whole number of rows >= 1 (a test "
                            "and benchmark setting); unset it for the automatic window")
        return int(raw)
    return max(1, min(MAX_WINDOW_ROWS, WINDOW_BYTES // manifest.row_bytes()))


class ShardStream:
    """Rows of a split's shards as one logical stream, read in record batches from any row."""

    def __init__(self, manifest: Manifest, split: str, names: list[str]) -> None:
        self.manifest, self.split, self.names = manifest, split, names
        self.shards = manifest.shards(split)
        self.rows = [int(s["rows"]) for s in self.shards]
        # Bounded in bytes too: 4096 rows of 64x64x3 frames were 50 MB of uint8, and the scan's
        # float64 statistics of them ~1.2 GB (peak RSS 2.1 GB for 176 MB of frames).
        self.read_rows = min(READ_ROWS, read_rows(manifest))

    def read(self, order: list[int] | np.ndarray, start: int) -> Iterator[Any]:
        """pyarrow RecordBatches of the shards in `order`, from stream row `start` on."""
        import pyarrow.parquet as pq

        offset = start
        for index in order:
            if offset >= self.rows[index]:
                offset -= self.rows[index]
                continue
            path = self.manifest.folder / self.shards[index]["path"]
            try:
                parquet = pq.ParquetFile(path, buffer_size=READ_BUFFER)
            except OSError as exc:
                raise TrainingError(f"cannot open shard {path}: {exc}; rerun prepare") from exc
            groups, skip = [], offset
            for g in range(parquet.metadata.num_row_groups):
                group_rows = parquet.metadata.row_group(g).num_rows
                if skip >= group_rows and not groups:
                    skip -= group_rows  # whole row groups before the position: not read
                else:
                    groups.append(g)
            try:
                for batch in parquet.iter_batches(batch_size=self.read_rows, row_groups=groups,
                                                  columns=self.names):
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    yield batch.slice(skip)
                    skip = 0
            except (KeyError, ValueError) as exc:
                raise TrainingError(f"cannot read columns {self.names} from shard {path}: "
                                    f"{exc}; rerun prepare") from exc
            offset = 0

    def windows(self, order: list[int] | np.ndarray, size: int,
                first: int = 0) -> Iterator[tuple[int, Any]]:
        """(k, pyarrow Table) of windows k = first, first+1, ... of `size` rows each."""
        import pyarrow as pa

        total = sum(self.rows)
        k, pieces, have = first, [], 0
        for batch in self.read(order, first * size):
            while batch.num_rows:
                want = min(size, total - k * size) - have
                pieces.append(batch.slice(0, want))
                have += min(want, batch.num_rows)
                batch = batch.slice(want)
                if have == min(size, total - k * size):
                    # Pieces are slices of Parquet batches: see arrow_types.unsliced.
                    yield k, unsliced_table(pa.Table.from_batches(pieces))
                    k, pieces, have = k + 1, [], 0


@dataclass(frozen=True)
class StreamLayout:
    """The epoch order's parameters: shard sizes, window size, seed, ranks and batch."""

    shard_rows: tuple[int, ...]
    window_rows: int
    seed: int
    world_size: int
    rank: int
    batch_size: int

    @property
    def n(self) -> int:
        return sum(self.shard_rows)

    @property
    def per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shard_rows))

    def window_permutation(self, epoch: int, k: int, length: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1, k]).permutation(length)

    def rank_rows(self, epoch: int, start: int,
                  windows: Callable[[int], Iterator[tuple[int, Any]]]) -> Iterator[tuple[Any, np.ndarray]]:
        """(window table, row indices into it) of this rank's rows from rank position
        `start` on, in order; `windows(k)` yields the epoch's windows from k on."""
        n, size = self.n, self.window_rows
        g, end = self.rank * self.per_rank + start, (self.rank + 1) * self.per_rank
        while g < end:
            lap, t = divmod(g, n)  # positions past n repeat the stream from its start
            stop = min(end - lap * n, n)
            for k, table in windows(t // size):
                low = k * size
                high = min(low + table.num_rows, stop)
                if t < high:
                    local = np.arange(t - low, high - low)
                    yield table, self.window_permutation(epoch, k, table.num_rows)[local]
                    t = high
                if t >= stop:
                    break
            g = lap * n + t


ONE = DistEnv(rank=0, local_rank=0, world_size=1, enabled=False)


class StreamSource:
    """The training split's statistics from one streaming pass (`stream_scan`, split over the
    ranks and agreed after `dist.init`); batches come from `loader`."""

    mode = "stream"

    def __init__(self, manifest: Manifest, recipe: Recipe, window_rows: int,
                 denv: DistEnv) -> None:
        self.manifest, self.recipe, self.window_rows = manifest, recipe, window_rows
        self._share = stream_scan.share(manifest, recipe, denv, self._checked_columns)
        self._agreed: stream_scan.Agreed | None = None

    @classmethod
    def scan(cls, manifest: Manifest, recipe: Recipe, window_rows: int | None = None,
             denv: DistEnv | None = None) -> "StreamSource":
        """This rank's part of the pass; without a process group (one rank), agreed at once.
        A bad shard is raised then, or by `agree` on every rank."""
        alone = denv is None or not denv.enabled
        source = cls(manifest, recipe, window_rows or window_rows_for(manifest),
                     ONE if alone else denv)
        if alone:
            source.agree(ONE)
        return source

    def agree(self, denv: DistEnv) -> None:
        """Exchange the ranks' parts of the pass (a collective: after `dist.init`)."""
        if self._agreed is None:
            self._agreed = stream_scan.agree(*self._share, self.recipe, denv)
            self._share = (stream_scan.Share(), None)

    def _checked_columns(self, split: str, names: list[str],
                         index: int) -> Iterator[dict[str, np.ndarray]]:
        """Every row of shard `index` of a split in bounded read batches, its values checked
        (`column_array`), a bad one named by its shard, row and order_by key."""
        stream = ShardStream(self.manifest, split, names)
        shard, first = stream.shards[index], 0
        for batch in stream.read([index], 0):
            yield read_table_columns(batch, names, f"the {split} split", lambda i, s=shard, at=first:
                                     shard_row(self.manifest, s, at + i))
            first += batch.num_rows

    def _outcome(self) -> stream_scan.Agreed:
        if self._agreed is None:
            raise RuntimeError("the streaming pass is not agreed yet: call agree() after "
                               "dist.init")
        return self._agreed

    @property
    def labels(self) -> np.ndarray:
        return self._outcome().labels

    @property
    def feature_width(self) -> int:
        return self._outcome().width

    @property
    def x_stats(self) -> Any:
        return self._outcome().x_stats

    @property
    def y_stats(self) -> Any:
        return self._outcome().y_stats

    def set_normalization(self, recipe: Recipe, model: MLP, info: ModelInfo) -> None:
        if recipe.fits_normalization:
            recipe.set_normalization(model, self.x_stats, self.y_stats)

    def loader(self, recipe: Recipe, info: ModelInfo, model: MLP, denv: DistEnv,
               batch_size: int, seed: int) -> "StreamLoader":
        return StreamLoader(self, recipe, info, model, denv, batch_size, seed)


class StreamLoader:
    """This rank's batches of an epoch from the shard stream (see the module docstring)."""

    mode = "stream"

    def __init__(self, source: StreamSource, recipe: Recipe, info: ModelInfo, model: MLP,
                 denv: DistEnv, batch_size: int, seed: int) -> None:
        manifest = source.manifest
        self.names = manifest.features + manifest.targets
        self.train = ShardStream(manifest, "train", self.names)
        self.val = ShardStream(manifest, "val", self.names)
        self.layout = StreamLayout(tuple(self.train.rows), source.window_rows, seed,
                                   denv.world_size, denv.rank, batch_size)
        self.recipe, self.info, self.model, self.denv = recipe, info, model, denv
        self.steps_per_epoch = self.layout.steps_per_epoch

    def _rows(self, table: Any, index: np.ndarray, split: str) -> tuple[Inputs, torch.Tensor]:
        columns = read_table_columns(table.take(index), self.names, f"the {split} split")
        return self.recipe.columns_to_tensors(self.info, columns, split)

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """This rank's batches of `epoch` from batch `skip` on (the same batches a run that
        did not skip yields there)."""
        order, size = self.layout.shard_order(epoch), self.layout.batch_size
        buffer: list[tuple[Inputs, torch.Tensor]] = []
        for table, index in self.layout.rank_rows(
                epoch, skip * size, lambda k: self.train.windows(order, self.layout.window_rows, k)):
            buffer.append(self.recipe.training_tensors(self.model,
                                                       *self._rows(table, index, "training")))
            have = sum(len(y) for _, y in buffer)
            if have >= size:
                x, y = concat([b[0] for b in buffer]), torch.cat([b[1] for b in buffer])
                full = have - have % size
                for i in range(0, full, size):
                    yield take(x, slice(i, i + size)), y[i:i + size]
                buffer = [(take(x, slice(full, None)), y[full:])] if full < have else []
        if buffer:  # the epoch's last, partial batch
            yield concat([b[0] for b in buffer]), torch.cat([b[1] for b in buffer])

    def val_chunks(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """This rank's contiguous part of the validation rows, in shard order (no padding)."""
        total, size = sum(self.val.rows), self.layout.window_rows
        share = math.ceil(total / self.denv.world_size)
        low, high = min(total, self.denv.rank * share), min(total, (self.denv.rank + 1) * share)
        if low >= high:
            return
        for k, table in self.val.windows(range(len(self.val.shards)), size, low // size):
            first = k * size
            index = np.arange(max(low, first), min(high, first + table.num_rows)) - first
            if len(index):
                yield from chunks(*self._rows(table, index, "validation"), EVAL_CHUNK)
            if first + table.num_rows >= high:
                break

    def state(self) -> dict[str, Any]:
        return {"mode": "stream", "rows": self.layout.n, "shards": len(self.layout.shard_rows),
                "window_rows": self.layout.window_rows, "ranks": "contiguous"}

    def check_state(self, state: dict[str, Any] | None) -> None:
        if state != self.state():
            raise CheckpointError(
                f"the checkpoint was written reading the data as {state}, this run streams it "
                f"as {self.state()}: the order would differ, so the resume would not be exact; "
                "delete the checkpoints folder to start over (or use the original data)")

