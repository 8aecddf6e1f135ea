"""CSV values Arrow's reader would take silently altered, and the array columns it cannot parse.

Arrow's CSV reader turns a number beyond a float's range (`1e400`, or `1e39` as float32) into
an infinity, reads a column with bytes that are not UTF-8 as binary, and has no parser for
fixed-size arrays. `finish` runs on every batch (vectorised: one kernel per float column) and
raises `BadRow` with the row's index in the batch, which the caller turns into a file line.

An array column (`--type joints=float32[7]`, or an append to a `FLOAT[7]` column) is read as
text and each value parsed as a JSON array (`[0.1, 0.2, ...]`, as DuckDB and pandas write a
list into a CSV), then cast with a checked length: a row whose array has another length fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from arf_trainer.datahub.jsonl import parsed_as
from arf_trainer.errors import DataHubError


class BadRow(Exception):
    """A value of the batch row `index` (0-based) that must not be ingested."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def not_utf8(path: Path, column: str | None = None) -> DataHubError:
    where = f" (column {column!r})" if column else ""
    return DataHubError(
        f"{path}: not UTF-8 text{where}; a CSV must be UTF-8 (a binary file, or one saved as "
        "Latin-1/Windows-1252 or UTF-16?). Convert it, e.g. `iconv -f latin1 -t utf-8 "
        "in.csv > out.csv` (or `-f utf-16`), and ingest that (nothing was written)")


def _arrays(typed: pa.Schema | None) -> dict[str, pa.DataType]:
    if typed is None:
        return {}
    return {f.name: f.type for f in typed if pa.types.is_fixed_size_list(f.type)}


def as_read(typed: pa.Schema | None) -> pa.Schema | None:
    """The types to give Arrow's CSV reader: array columns as text, parsed by `finish`."""
    if typed is None:
        return None
    return pa.schema([f.with_type(pa.string()) if f.name in _arrays(typed) else f
                      for f in typed])


def readable(schema: pa.Schema, typed: pa.Schema | None) -> pa.Schema:
    """The schema `finish` gives back for a reader opened with `as_read(typed)`."""
    arrays = _arrays(typed)
    return pa.schema([f.with_type(arrays[f.name]) if f.name in arrays else f for f in schema])


def check_text(path: Path, schema: pa.Schema, typed: pa.Schema | None) -> None:
    """A column inferred as binary holds bytes that are not UTF-8 (Latin-1 accents)."""
    given = set(typed.names) if typed is not None else set()
    for field in schema:
        if pa.types.is_binary(field.type) and field.name not in given:
            raise not_utf8(path, field.name)


def finish(batch: pa.RecordBatch, typed: pa.Schema | None) -> pa.RecordBatch:
    """`batch` with its array columns parsed; `BadRow` for an infinity or a bad array."""
    for field, column in zip(batch.schema, batch.columns):
        if pa.types.is_floating(field.type):
            infinite = pc.is_inf(column)
            if pc.any(infinite).as_py():
                raise BadRow(pc.index(infinite, True).as_py(), (
                    f"column {field.name!r}: the value is infinite (a number beyond "
                    f"{field.type}'s range such as 1e400, or `inf` written out); the hub "
                    "refuses infinities, which would train into NaN silently. Fix the value, "
                    f"or keep the text with --type {field.name}=string"))
    arrays = _arrays(typed)
    if not arrays:
        return batch
    columns = [_parse_arrays(column, arrays[name], name) if name in arrays else column
               for name, column in zip(batch.schema.names, batch.columns)]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


_JSON_ROW = re.compile(r"in row (\d+)")


def _parse_arrays(column: pa.Array, dtype: pa.DataType, name: str) -> pa.Array:
    """Text values `[1, 2, 3]` (empty: null) as `dtype`, parsed by Arrow's JSON reader in one
    go: the values become the lines `{"v": [1, 2, 3]}` of one buffer."""
    example = ", ".join(["1"] * min(dtype.list_size, 3)) + (", ..." if dtype.list_size > 3 else "")
    hint = (f"column {name!r}: a value is not a JSON array of {dtype.list_size} values like "
            f"[{example}]; fix the value")
    empty = pc.equal(column, "")
    if pc.any(empty).as_py():
        # A null fixed-size array is stored as an empty list, which the hub cannot read back.
        raise BadRow(pc.index(empty, True).as_py(),
                     f"column {name!r}: an empty value where an array of {dtype.list_size} "
                     "values is expected; write the array (arrays cannot be null here)")
    lines = pc.binary_join_element_wise('{"v":', column, "}\n", "")
    offsets = pa.Array.from_buffers(pa.int32(), len(lines) + 1, [None, lines.buffers()[1]],
                                    offset=lines.offset)
    start, end = offsets[0].as_py(), offsets[-1].as_py()
    data = lines.buffers()[2].slice(start, end - start)
    try:
        parsed = pajson.read_json(
            pa.BufferReader(data),
            read_options=pajson.ReadOptions(use_threads=False,
                                            block_size=max(end - start + 1, 1 << 16)),
            parse_options=pajson.ParseOptions(
                explicit_schema=pa.schema([pa.field("v", parsed_as(dtype))]),
                unexpected_field_behavior="error"))
    except pa.ArrowException as exc:
        match = _JSON_ROW.search(str(exc))
        raise BadRow(int(match.group(1)) if match else 0, hint) from exc
    values = parsed.column("v").combine_chunks()
    if len(values) != len(column):  # a value like `1]}{"v":[2` split its line in two
        raise BadRow(0, hint)
    try:
        return values.cast(dtype)
    except pa.ArrowException as exc:
        wrong = pc.and_(pc.is_valid(values),
                        pc.not_equal(pc.list_value_length(values), dtype.list_size))
        index = pc.index(wrong, True).as_py()
        if index < 0:  # an inner array of another length
            raise BadRow(0, f"{hint}: {exc}") from exc
        raise BadRow(index, f"column {name!r}: an array of "
                     f"{pc.list_value_length(values)[index].as_py()} values where --type (or "
                     f"the table) gives {dtype.list_size}; fix the value") from exc
