"""Train/validation splits decided row by row as the query result streams past.

Two kinds, both deterministic from the job spec's seed and independent of how DuckDB happens to
cut the stream into batches:

- `GroupSplit` (`dataset.split_by: episode`): every row whose key equals a given value goes to
  the same side, chosen by a seeded hash of the value alone: validation when
  blake2b(seed, type, value) / 2**64 < validation_split. A group's side therefore never depends
  on the other rows, so appending episodes to a table keeps every earlier episode on its side,
  and nothing about the whole result is needed in memory. The validation fraction is
  validation_split in expectation over groups (a binomial draw, not an exact row count). A null
  key is one group of its own.
- `ExactSample` (the row split, and the replay's sampling): exactly k of n rows, uniformly at
  random, with n known beforehand (a count query). The stream is cut into fixed blocks of
  `BLOCK` positions; each block's number of picks is a hypergeometric draw from what is left and
  its picks a uniform choice inside the block, so memory is one block, never n.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arf_trainer.errors import DataHubError

BLOCK = 65_536


def _unit(seed: int, value: Any) -> float:
    """A value's seeded position in [0, 1): stable across processes, runs and versions."""
    text = f"{seed}\0{type(value).__name__}\0{value!r}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") / 2**64


class GroupSplit:
    """Validation mask of a batch from its group-key column (see the module docstring)."""

    def __init__(self, column: str, fraction: float, seed: int):
        self.column, self.fraction, self.seed = column, fraction, seed

    def mask(self, batch: pa.RecordBatch) -> np.ndarray:
        keys = batch.column(self.column)
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        encoded = pc.dictionary_encode(keys, null_encoding="encode")
        # One hash per distinct key of the batch (a few episodes), not one per row.
        side = np.array([_unit(self.seed, v) < self.fraction
                         for v in encoded.dictionary.to_pylist()], dtype=bool)
        return side[encoded.indices.to_numpy(zero_copy_only=False)]


class ExactSample:
    """Exactly `k` of `n` stream positions, uniformly at random, decided block by block."""

    def __init__(self, n: int, k: int, seed: int | list[int], what: str):
        if not 0 <= k <= n:
            raise ValueError(f"cannot pick {k} of {n} rows")
        self.rng = np.random.default_rng(seed)
        self.n_left, self.k_left, self.what = n, k, what
        self.pending = np.zeros(0, dtype=bool)

    def _block(self) -> np.ndarray:
        size = min(BLOCK, self.n_left)
        if size == 0:
            raise DataHubError(f"{self.what} returned more rows than it counted; its tables "
                               "changed under a pinned snapshot. Retry the prepare task")
        picks = (self.k_left if size == self.n_left else
                 int(self.rng.hypergeometric(self.k_left, self.n_left - self.k_left, size)))
        block = np.zeros(size, dtype=bool)
        block[self.rng.choice(size, size=picks, replace=False)] = True
        self.n_left -= size
        self.k_left -= picks
        return block

    def mask(self, rows: int) -> np.ndarray:
        """Whether each of the next `rows` positions is picked."""
        parts = []
        while rows:
            if not len(self.pending):
                self.pending = self._block()
            part, self.pending = self.pending[:rows], self.pending[rows:]
            parts.append(part)
            rows -= len(part)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
