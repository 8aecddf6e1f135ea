"""`arf datahub ingest --type COLUMN=TYPE`: a column's type given instead of inferred.

A CSV column's type is otherwise inferred from the file's first 4 MiB block, and a later value
of another type (`1.5` after a million integers, `n/a` in a number column) fails the ingest at
its line. Given a type, the CSV is parsed into it; a Parquet or Arrow column is cast to it (a
value that does not fit names the file and the column). Type names are Arrow's (`int64`,
`float64` or `double`, `float` = float32, `string`, `bool`, `date32`, `timestamp[us]`, ...),
with `[N]` for fixed-size arrays as DuckDB writes them (`float32[7]`, `uint8[64][64][3]`),
plus `date` (date32) and `timestamp` (microseconds, UTC: what the hub stores instants as; its
values need a zone offset, `2026-12-01T10:00:00Z`: naive ones read as `timestamp[us]`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import pyarrow as pa

from arf_trainer.errors import DataHubError

_ALIASES = {"date": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC")}
_EXAMPLES = "int64, float64, string, bool, date, timestamp, float32[7]"
_ARRAY = re.compile(r"(.+?)((?:\[[0-9]+\])+)")
# Arrow addresses list values with 32-bit offsets: an array of more values cannot be built.
MAX_ARRAY_VALUES = 2 ** 31 - 1


def parse_types(specs: Iterable[str]) -> dict[str, pa.DataType]:
    """{column: type} from `COLUMN=TYPE` texts; `DataHubError` naming a bad one."""
    types: dict[str, pa.DataType] = {}
    for spec in specs:
        column, sep, name = spec.partition("=")
        column, name = column.strip(), name.strip()
        if not sep or not column or not name:
            raise DataHubError(f"--type {spec!r}: give COLUMN=TYPE, e.g. --type step=int64")
        if column in types:
            raise DataHubError(f"--type names column {column!r} twice; give it once")
        try:
            types[column] = _type(name.lower())
        except (ValueError, KeyError) as exc:
            raise DataHubError(f"--type {spec!r}: {name!r} is not a type name; use one of "
                               f"{_EXAMPLES} (Arrow's names)") from exc
    return types


def _type(name: str) -> pa.DataType:
    """An Arrow type name, or one with `[N]...` dimensions (outermost first)."""
    array = _ARRAY.fullmatch(name)
    if array is None:
        return _ALIASES.get(name) or pa.type_for_alias(name)
    dtype = _type(array.group(1))
    sizes = [int(n) for n in re.findall(r"[0-9]+", array.group(2))]
    if min(sizes) < 1 or math.prod(sizes) > MAX_ARRAY_VALUES:
        raise DataHubError(
            f"--type {name!r}: array sizes must be at least 1 and hold at most "
            f"{MAX_ARRAY_VALUES:,} values in all (Arrow's limit); got {array.group(2)}")
    for size in reversed(sizes):
        dtype = pa.list_(dtype, size)
    return dtype


def retyped(schema: pa.Schema, types: Mapping[str, pa.DataType]) -> pa.Schema:
    """`schema` with the given columns' types replaced."""
    return pa.schema([field.with_type(types[field.name]) if field.name in types else field
                      for field in schema])


def check_named(types: Mapping[str, pa.DataType], columns: list[str], where: str) -> None:
    """Every column `--type` names is one of the input's `columns`."""
    unknown = [c for c in types if c not in columns]
    if unknown:
        raise DataHubError(
            f"--type names {', '.join(map(repr, unknown))}, which {where} does not have; its "
            f"columns: {', '.join(columns)}")


def cast_named(batch: pa.RecordBatch, types: Mapping[str, pa.DataType],
               where: str) -> pa.RecordBatch:
    """`batch` with the `--type` columns cast (checked: a value that does not fit fails)."""
    if not types:
        return batch
    arrays = []
    for name, column in zip(batch.schema.names, batch.columns):
        target = types.get(name)
        if target is None or column.type == target:
            arrays.append(column)
            continue
        try:
            arrays.append(column.cast(target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataHubError(
                f"{where}: column {name!r} ({column.type}) cannot be read as {target} given by "
                f"--type: {exc}; fix the value or give another type (nothing was written)"
            ) from exc
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
