"""JSON Lines files for `arf datahub ingest` (`.jsonl`, `.ndjson`, gzipped or not): one JSON
object per line, read block by block with Arrow's JSON reader.

Types are inferred from the first 4 MiB block, as for CSV; a column's known type (the table's
on an append, or `--type`) is parsed as that type instead. A JSON array is a list of varying
length to Arrow: an array column becomes a fixed-size one (`--type joints=float32[7]`, or the
table's `FLOAT[7]`) by a checked cast after the read, since Arrow's JSON reader parses only
variable lists; a row whose array has another length then fails, naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pajson

from arf_trainer.errors import DataHubError

BLOCK_BYTES = 4 << 20


def _parsed_as(dtype: pa.DataType) -> pa.DataType:
    """The type Arrow's JSON reader can parse for `dtype`: fixed-size lists as lists."""
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(_parsed_as(dtype.value_type))
    return dtype


def _open(path: Path, known: pa.Schema | None) -> pajson.JSONStreamingReader:
    explicit = pa.schema([pa.field(f.name, _parsed_as(f.type)) for f in known]) if known else None
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
        raise error(path, exc) from exc
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


def batches(path: Path, types: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The rows of `path`, its known columns parsed as (or cast to) their `types`."""
    _, known = _known(path, types)
    reader = _open(path, known)
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise error(path, exc) from exc
        yield batch


def error(path: Path, exc: Exception) -> DataHubError:
    text = str(exc).strip()
    retype = ("; if a column holds values of two types, give its type with --type COLUMN=TYPE "
              "(e.g. float64 or string)" if "convert" in text or "Failed" in text else "")
    return DataHubError(f"{path}: not readable as JSON Lines (one object per line): {text}"
                        f"{retype} (nothing was written; the table is at its previous version)")
