"""Hive-style partition folders in an ingest's input: `robot=r7/day=2026-12-01/part-0.parquet`.

Spark, Hive, Athena and `pyarrow.dataset.write_dataset(partitioning="hive")` write a column's
value into the folder name instead of the files. A walked folder's `column=value` segments
become columns of every row under them, as those tools read them back:

- Values are URI-decoded (`%2F` is `/`); `__HIVE_DEFAULT_PARTITION__` is null.
- The type is the table's on an append (the value is cast: `2026-12-01` to a date column);
  otherwise int64 when every value of that column is an integer, else string. Hive's own
  readers guess more types (dates, floats); a guess that changes with the data would change the
  table's schema between two ingests of one dataset, so only integers are taken as numbers.
- Every file of a folder must sit under the same partition columns in the same order, and no
  file may hold a partition column itself: either would leave a value undefined.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import pyarrow as pa

from arf_trainer.errors import DataHubError

if TYPE_CHECKING:
    from arf_trainer.datahub.sources import Source

NULL = "__HIVE_DEFAULT_PARTITION__"
_INTEGER = re.compile(r"-?[0-9]{1,18}\Z")

Partition = tuple[tuple[str, str | None], ...]


def partition_of(file: Path, root: Path) -> Partition:
    """The (column, value) pairs the folders between `root` and `file` name, outermost first."""
    pairs = []
    for segment in file.relative_to(root).parts[:-1]:
        if "=" not in segment:
            continue
        column, value = segment.split("=", 1)
        if not column:
            raise DataHubError(f"{file}: folder {segment!r} names no column before '='; name "
                               "partition folders column=value (e.g. day=2026-12-01)")
        value = unquote(value)
        pairs.append((unquote(column), None if value == NULL else value))
    return tuple(pairs)


def check_same_columns(root: Path, files: Sequence[Path], partitions: Sequence[Partition]) -> None:
    """Every file under `root` has the same partition columns, in the same order."""
    columns = [[c for c, _ in p] for p in partitions]
    other = next((i for i, c in enumerate(columns) if c != columns[0]), None)
    if other is None:
        return
    raise DataHubError(
        f"{root}: its files sit under different partition folders: {files[0]} under "
        f"{columns[0] or 'none'}, {files[other]} under {columns[other] or 'none'}. Every file "
        "of one ingest needs the same column=value folders in the same order; ingest the parts "
        "separately")


def partition_fields(sources: Sequence[Source], file_schema: pa.Schema,
                     hint: pa.Schema | None) -> list[pa.Field]:
    """The partition columns' fields: the table's type on an append, else int64 or string."""
    first = sources[0]
    fields = []
    for column, _ in first.partition:
        if column in file_schema.names:
            raise DataHubError(
                f"{first.path}: column {column!r} is both in the file and in its folder name "
                f"({column}=...); drop the column from the files or rename the folder")
        if hint is not None and column in hint.names:
            fields.append(pa.field(column, hint.field(column).type))
            continue
        values = [dict(s.partition).get(column) for s in sources]
        numbers = all(v is None or _INTEGER.match(v) for v in values)
        fields.append(pa.field(column, pa.int64() if numbers else pa.string()))
    return fields


def with_partition(batch: pa.RecordBatch, source: Source,
                   fields: Sequence[pa.Field]) -> pa.RecordBatch:
    """`batch` with the partition columns of `source` appended, one value per row."""
    if not fields:
        return batch
    values = dict(source.partition)
    arrays = list(batch.columns)
    for field in fields:
        arrays.append(pa.repeat(_scalar(values[field.name], field, source), batch.num_rows))
    return pa.RecordBatch.from_arrays(arrays, names=[*batch.schema.names,
                                                     *(f.name for f in fields)])


def _scalar(value: str | None, field: pa.Field, source: Source) -> pa.Scalar:
    if value is None:
        return pa.scalar(None, field.type)
    try:
        return pa.array([value]).cast(field.type)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataHubError(
            f"{source.path}: partition folder {field.name}={value} does not fit the column's "
            f"type {field.type} ({exc}); rename the folder or ingest into a table whose "
            f"{field.name!r} is a string (nothing was written)") from exc
