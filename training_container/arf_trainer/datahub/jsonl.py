"""JSON Lines files for `arf datahub ingest` (`.jsonl`, `.ndjson`, gzipped or not): one JSON
object per line, read block by block with Arrow's JSON reader.

Types are inferred from the first 4 MiB block, as for CSV; a column's known type (the table's
on an append, or `--type`) is parsed as that type instead. A JSON array is a list of varying
length to Arrow: an array column becomes a fixed-size one (`--type joints=float32[7]`, or the
table's `FLOAT[7]`) by a checked cast after the read, since Arrow's JSON reader parses only
variable lists; a row whose array has another length then fails, naming the file.

Arrow's JSON errors count rows from the start of a block and often name no column, so on the
error path only the file is read again line by line (`jsonl_lines.locate`) to name the line
and the column. An integer beyond int64 would make Arrow read its whole column as double
(1 as 1.0, the big one rounded): a float column of values that large sends the file through
the same scan, which refuses it when the value is written as an integer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from arf_trainer.datahub import jsonl_lines
from arf_trainer.errors import DataHubError

BLOCK_BYTES = 4 << 20


def parsed_as(dtype: pa.DataType) -> pa.DataType:
    """The type Arrow's JSON reader can parse for `dtype`: fixed-size lists as lists."""
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(parsed_as(dtype.value_type))
    return dtype


def _open(path: Path, known: pa.Schema | None) -> pajson.JSONStreamingReader:
    explicit = pa.schema([pa.field(f.name, parsed_as(f.type)) for f in known]) if known else None
    return pajson.open_json(
        pa.input_stream(str(path), compression="detect"),
        read_options=pajson.ReadOptions(use_threads=False, block_size=BLOCK_BYTES),
        parse_options=pajson.ParseOptions(explicit_schema=explicit,
                                          unexpected_field_behavior="infer"))


def _known(path: Path, types: pa.Schema | None) -> tuple[pa.Schema, pa.Schema | None]:
    """(the file's inferred columns, the known types of those of them `types` names): a type
    for a column the file lacks would make the reader add it, all null."""
    try:
        inferred = _open(path, None).schema
    except (pa.ArrowException, OSError) as exc:
        raise error(path, exc, None) from exc
    if types is None:
        return inferred, None
    known = [types.field(n) for n in inferred.names if n in types.names]
    return inferred, pa.schema(known) if known else None


def schema(path: Path, types: pa.Schema | None) -> pa.Schema:
    """The file's columns, with the types `types` gives where it names them."""
    inferred, known = _known(path, types)
    if known is None:
        return inferred
    return pa.schema([known.field(f.name) if f.name in known.names else f for f in inferred])


def batches(path: Path, types: pa.Schema,
            given: Collection[str] = ()) -> Iterator[pa.RecordBatch]:
    """The rows of `path`, its known columns parsed as (or cast to) their `types`; `given`
    names the columns whose type the user gave (`--type`), which may hold huge integers."""
    _, known = _known(path, types)
    given = set(given)
    try:
        reader = _open(path, known)  # parses the first block
    except (pa.ArrowException, OSError) as exc:
        raise error(path, exc, known, given) from exc
    # Inferred float columns, until one scan of the file has cleared them of huge integers.
    floats = [f.name for f in reader.schema
              if pa.types.is_floating(f.type) and f.name not in given]
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise error(path, exc, reader.schema, given) from exc
        for name in list(floats):
            if pc.any(pc.greater_equal(pc.abs(batch.column(name)), 2.0 ** 63)).as_py():
                if (found := jsonl_lines.huge_integer(path, name)) is not None:
                    raise _refused(path, found)
                floats.remove(name)
        yield batch


def error(path: Path, exc: Exception, schema: pa.Schema | None,
          given: set[str] = frozenset()) -> DataHubError:
    """The reader's error, with the file's line and column found by reading it again."""
    found = jsonl_lines.locate(path, schema, given)
    if found is not None:
        return _refused(path, found)
    text = str(exc).strip()
    return DataHubError(f"{path}: not readable as JSON Lines (one object per line): {text} "
                        "(nothing was written; the table is at its previous version)")


def _refused(path: Path, found: str) -> DataHubError:
    return DataHubError(f"{path}: {found} (nothing was written; the table is at its previous "
                        "version)")
