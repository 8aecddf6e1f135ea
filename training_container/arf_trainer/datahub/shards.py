"""Parquet shards written as rows stream in, and the manifest's description of their columns.

Shard layout is a function of the schema and the row sequence alone, never of how the stream was
batched: rows are written in row groups of exactly `group_rows` rows (the last one of a split
may be shorter) and shards of exactly `shard_rows` rows, each row group's arrays made contiguous
before it is written, with fixed writer options. So the same rows give the same bytes, and the
same fingerprint. A shard's sha256 is taken as soon as it is closed.

Both sizes follow the row's width from the schema, so that one row group (what the writer holds
in memory) stays near `GROUP_BYTES` whether a row is 14 floats or a 64x64x3 camera frame: a
tabular row group is `SHARD_ROWS` rows (one row group per shard, as before), a frame's a few
thousand.

Columns (manifest "columns"): {"name", "type" (Arrow's type text), "dtype", "shape"}. A
fixed-shape array column (DuckDB `FLOAT[7]`, `UTINYINT[64][64][3]`; Arrow fixed_size_list,
nested) has the element's NumPy dtype ("float32", "uint8") and its shape ([7], [64, 64, 3]); a
scalar has shape []. dtype is null for elements that are not numbers or booleans (strings,
timestamps...); shape is null for a column that is not fixed-shape (variable-length lists,
structs, maps), which a feature or target may not be.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arf_trainer.errors import SpecError

SHARD_ROWS = 262_144
GROUP_BYTES = 32 * 2**20
GROUPS_PER_SHARD = 8
# Fixed writer options: shard bytes (and so the fingerprint) must not depend on defaults that
# could change between runs. `created_by` still carries the pyarrow version, recorded too.
# Dictionary encoding only where it can pay (not on floating-point columns: measured, trying it
# on sensor noise doubled the writer's CPU time for a larger file); zstd level 1 (0.21 s of CPU
# per 170k robot rows against 0.32 s at level 3, for the same size).
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "version": "2.6",
    "data_page_version": "1.0",
    "write_statistics": True,
}
_HASH_CHUNK = 1 << 20
_VARIABLE_WIDTH = 32  # bytes assumed per string/binary value when sizing row groups


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _shape(arrow_type: pa.DataType) -> tuple[list[int], pa.DataType]:
    shape = []
    while pa.types.is_fixed_size_list(arrow_type):
        shape.append(arrow_type.list_size)
        arrow_type = arrow_type.value_type
    return shape, arrow_type


def _is_nested(arrow_type: pa.DataType) -> bool:
    return pa.types.is_nested(arrow_type) or pa.types.is_dictionary(arrow_type)


def describe_column(field: pa.Field) -> dict[str, Any]:
    """The manifest entry of one column (see the module docstring)."""
    shape, element = _shape(field.type)
    numeric = (pa.types.is_integer(element) or pa.types.is_floating(element)
               or pa.types.is_boolean(element))
    return {"name": field.name, "type": str(field.type),
            "dtype": np.dtype(element.to_pandas_dtype()).name if numeric else None,
            "shape": None if _is_nested(element) else shape}


def check_fixed_shape(schema: pa.Schema, field: str, names: list[str]) -> None:
    """A feature or target column must be a scalar or a fixed-shape array."""
    for name in names:
        column = describe_column(schema.field(name))
        arrow_type = schema.field(name).type
        if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
            raise SpecError(
                f"{field} column {name!r} has type {column['type']} (bytes), which no recipe "
                "reads; if it holds encoded images, declare how to decode them, e.g. "
                f"dataset.decode: {{{name}: {{format: png, shape: [64, 64, 3]}}}}, or leave it "
                f"out of {field}")
        if column["shape"] is None:
            raise SpecError(
                f"{field} column {name!r} has type {column['type']}, which has no fixed shape "
                "(a variable-length list, struct or map); a feature or target must be a scalar "
                f"or a fixed-shape array. Fix: CAST it in the query to a fixed size, e.g. "
                f"CAST({name} AS FLOAT[7]) (every row must then hold 7 values), or leave it "
                f"out of {field}")


def _row_bytes(schema: pa.Schema) -> int:
    total = 0
    for field in schema:
        shape, element = _shape(field.type)
        try:
            width = max(1, element.bit_width // 8)
        except ValueError:  # no fixed width: strings, binary, nested
            width = _VARIABLE_WIDTH
        total += width * math.prod(shape)
    return max(1, total)


def layout(schema: pa.Schema) -> tuple[int, int]:
    """(rows per row group, rows per shard) for rows of this schema."""
    group = max(1, min(SHARD_ROWS, GROUP_BYTES // _row_bytes(schema)))
    return group, group * max(1, min(GROUPS_PER_SHARD, SHARD_ROWS // group))


class ShardWriter:
    """Rows of one split (train/ or val/) into `root/<split>/shard-NNNNN.parquet` files."""

    def __init__(self, root: Path, split: str, schema: pa.Schema):
        self.root, self.split, self.schema = root, split, schema
        self.group_rows, self.shard_rows = layout(schema)
        self.shards: list[dict[str, Any]] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows = 0
        (root / split).mkdir(parents=True)

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards) + self._shard_rows + self._pending_rows

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
        while self._pending_rows >= self.group_rows:
            self._flush(self.group_rows)

    def close(self) -> list[dict[str, Any]]:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._close_shard()
        return self.shards

    def _flush(self, rows: int) -> None:
        pending = pa.Table.from_batches(self._pending, schema=self.schema)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows
        if self._writer is None:
            path = self.root / self._relative(len(self.shards))
            self._writer = pq.ParquetWriter(path, self.schema, use_dictionary=self._dictionary(),
                                            **PARQUET_OPTIONS)
        # Contiguous arrays: the input's chunking must not reach the file's bytes.
        self._writer.write_table(group.combine_chunks(), row_group_size=rows)
        self._shard_rows += rows
        if self._shard_rows >= self.shard_rows:
            self._close_shard()

    def _dictionary(self) -> list[str]:
        return [f.name for f in self.schema if not pa.types.is_floating(_shape(f.type)[1])]

    def _relative(self, number: int) -> str:
        return f"{self.split}/shard-{number:05d}.parquet"

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        relative = self._relative(len(self.shards))
        self.shards.append({"path": relative, "rows": self._shard_rows,
                            "sha256": sha256_file(self.root / relative)})
        self._shard_rows = 0
