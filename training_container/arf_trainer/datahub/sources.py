"""The files an ingest reads: finding them, their schemas, and their rows as a bounded stream.

Formats are told by the file name (`.parquet`/`.pq`, `.csv`/`.csv.gz`/`.tsv`,
`.arrow`/`.feather`/`.ipc`/`.arrows`, `.jsonl`/`.ndjson` (gzipped too): JSON Lines,
`arf_trainer.datahub.jsonl`); a folder holding `_delta_log` is a Delta table, and one holding
`meta/info.json` a LeRobot dataset (`arf_trainer.datahub.lerobot`: its data files, one source
each, with their camera frames). Each
file is read on its own, batch by batch, so an error names the file (and, for CSV, the line).
Hive partition folders (`column=value/`) under a walked folder add their columns
(`arf_trainer.datahub.hive`).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from arf_trainer.datahub import column_types, csv_values, hive, jsonl, lerobot, lerobot_meta
from arf_trainer.datahub.arrow_types import schema_differences
from arf_trainer.datahub.tables import open_delta_dataset
from arf_trainer.errors import DataHubError

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
            ".csv.gz": "csv", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
            ".arrows": "arrow", ".jsonl": "json", ".ndjson": "json", ".jsonl.gz": "json",
            ".ndjson.gz": "json"}
BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 4 << 20
_KNOWN = ", ".join(sorted(SUFFIXES))


@dataclass(frozen=True)
class Source:
    """One input: a file of a known format, or a Delta table folder."""

    path: Path
    format: str  # parquet | csv | json | arrow | delta | lerobot
    size: int
    # A Delta table is opened here, on the caller's thread: delta-rs cannot open a table from
    # the thread of its own runtime that pulls the batches during the write.
    dataset: pads.Dataset | None = field(default=None, compare=False, repr=False)
    partition: hive.Partition = ()  # the column=value folders it sits under, outermost first
    lerobot: lerobot_meta.LeRobotMeta | None = field(default=None, compare=False, repr=False)


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def _delta_source(path: Path) -> Source:
    size = sum(f.stat().st_size for f in path.rglob("*.parquet") if f.is_file())
    return Source(path, "delta", size, open_delta_dataset(path))


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))  # hidden files, _SUCCESS markers, _delta_log, _tmp/


def _walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, Delta table folders) under `folder`, each sorted. Hidden and `_` entries are
    skipped, with what is under them; a symlinked folder is walked like a real one (each real
    folder once, so a link to an ancestor ends); a nested Delta table is one entry, read as a
    table (its log says which of its files count)."""
    files: list[Path] = []
    tables: list[Path] = []
    seen: set[str] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        here = Path(top)
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if here != folder and (here / "_delta_log").is_dir():
            tables.append(here)
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not _hidden(d)]
        files += [here / name for name in names if not _hidden(name)]
    return sorted(files), sorted(tables)


def _folder_sources(folder: Path) -> list[Source]:
    found, tables = _walk(folder)
    unknown = [f for f in found if not _format_of(f)]
    if unknown:
        raise DataHubError(
            f"{folder} holds files of no known format: {', '.join(map(str, unknown[:5]))}"
            f"{' ...' if len(unknown) > 5 else ''}; known: {_KNOWN}. Move them out of the "
            "folder or pass the data files one by one"
        )
    partitions = [hive.partition_of(f, folder) for f in found]
    hive.check_same_columns(folder, found, partitions)
    return [Source(f, _format_of(f), f.stat().st_size, partition=p)
            for f, p in zip(found, partitions)] + [_delta_source(t) for t in tables]


def resolve_sources(paths: Sequence[str | Path]) -> list[Source]:
    """Every data file (or Delta table) named by `paths`, in order; folders are walked, sorted."""
    if not paths:
        raise DataHubError("nothing to ingest: name at least one file or folder")
    sources: list[Source] = []
    for item in paths:
        path = Path(item).expanduser()
        if not path.exists():
            raise DataHubError(f"{path} does not exist; check the path (nothing was written)")
        if path.is_dir() and (path / "_delta_log").is_dir():
            sources.append(_delta_source(path))
        elif lerobot_meta.is_dataset(path):
            meta = lerobot_meta.read_meta(path)
            sources.extend(Source(f, "lerobot", f.stat().st_size, lerobot=meta)
                           for f in lerobot_meta.data_files(meta))
        elif path.is_dir():
            found = _folder_sources(path)
            if not found:
                raise DataHubError(f"folder {path} holds no data files ({_KNOWN})")
            sources.extend(found)
        elif _format_of(path) is None:
            raise DataHubError(f"{path}: unknown file type; name it with one of {_KNOWN}")
        else:
            sources.append(Source(path, _format_of(path), path.stat().st_size))
    return sources


def _csv_options(source: Source, schema: pa.Schema | None):
    read = pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES)  # rows numbered
    parse = pacsv.ParseOptions(delimiter="\t" if source.path.name.lower().endswith(".tsv")
                               else ",")
    types = {field.name: field.type for field in schema} if schema is not None else None
    # Only an empty field is null. Arrow's default tokens (`n/a`, `NA`, `null`, `nan`, `#N/A`,
    # ...) would make a typo or a placeholder a silent null in a number column; as text they
    # make the column a string (or fail at their line, once its type is known).
    return read, parse, pacsv.ConvertOptions(column_types=types, null_values=[""],
                                             quoted_strings_can_be_null=True)


def _open_csv(source: Source, schema: pa.Schema | None) -> pacsv.CSVStreamingReader:
    read, parse, convert = _csv_options(source, schema)
    stream = pa.input_stream(str(source.path), compression="detect")
    try:
        return pacsv.open_csv(stream, read_options=read, parse_options=parse,
                              convert_options=convert)
    except (pa.ArrowException, OSError) as exc:  # OSError: a corrupt or truncated .gz
        raise _csv_error(source, exc, 0) from exc


def _file_schema(source: Source, hint: pa.Schema | None) -> pa.Schema:
    if source.format == "json":
        return jsonl.schema(source.path, hint)
    if source.lerobot is not None:
        return lerobot.table_schema(source.lerobot, source.path)
    try:
        if source.format == "parquet":
            return pq.read_schema(source.path)
        if source.format == "arrow":
            return _open_ipc(source.path).schema
        if source.format == "delta":
            return source.dataset.schema
    except (pa.ArrowException, OSError) as exc:
        raise DataHubError(f"{source.path}: not a readable {source.format} file: {exc}") from exc
    header = _csv_header(source)
    if not header:
        raise DataHubError(f"{source.path}: the CSV file is empty (no header line, no rows); "
                           "remove it from the ingest or write its rows (nothing was written)")
    typed = pa.schema([hint.field(n) for n in header if n in hint.names]) if hint else None
    inferred = csv_values.readable(_open_csv(source, csv_values.as_read(typed)).schema, typed)
    csv_values.check_text(source.path, inferred, typed)
    return inferred


def _csv_header(source: Source) -> list[str]:
    delimiter = "\t" if source.path.name.lower().endswith(".tsv") else ","
    try:
        with _text(source.path) as handle:
            return next(csv.reader(handle, delimiter=delimiter), [])
    except UnicodeDecodeError as exc:
        raise csv_values.not_utf8(source.path) from exc
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataHubError(f"{source.path}: not a readable gzip file ({exc}); check the file "
                           "(`gzip -t` tests it) or pass it uncompressed (nothing was written)"
                           ) from exc


def _text(path: Path) -> io.TextIOBase:
    # utf-8-sig: Arrow's reader skips a byte-order mark, so the header read here must too (or
    # the first column's name would not match the table's on an append).
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _open_ipc(path: Path):
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic == b"ARROW1":  # the IPC file format (Feather v2); else the streaming format
        return pa.ipc.open_file(pa.memory_map(str(path)))
    return pa.ipc.open_stream(pa.OSFile(str(path)))


def source_schema(sources: Sequence[Source], hint: pa.Schema | None = None,
                  types: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The columns of the first source, after checking every other source has the same ones.

    `hint` (the target table's schema on an append) fixes CSV column types by name; `types`
    (`--type`) fixes any column's, before it.
    """
    types = dict(types or {})
    hint = _with_types(hint, types)
    first = _file_schema(sources[0], hint)
    columns = [c for c, _ in sources[0].partition]
    column_types.check_named(types, [*first.names, *columns], str(sources[0].path))
    first = column_types.retyped(first, types)
    partitions = hive.partition_fields(sources, first, hint)
    for source in sources[1:]:
        other = column_types.retyped(
            _file_schema(source, first if source.format in ("csv", "json") else None), types)
        problems = schema_differences(first, other)
        if [c for c, _ in source.partition] != columns:
            problems.append(f"partition folders {[c for c, _ in source.partition] or 'none'} "
                            f"instead of {columns or 'none'}")
        if problems:
            raise DataHubError(
                f"{source.path} does not have the columns of {sources[0].path}: "
                f"{'; '.join(problems)}. One ingest writes one schema: ingest the files "
                "separately (the table's append check then names what to fix)"
            )
    return pa.schema([*(pa.field(f.name, f.type) for f in first), *partitions])


def _with_types(hint: pa.Schema | None, types: dict[str, pa.DataType]) -> pa.Schema | None:
    """The table's columns (on an append) with the `--type` ones put over them."""
    if not types:
        return hint
    fields = {f.name: f.type for f in hint} if hint is not None else {}
    return pa.schema({**fields, **types})


def read_source(source: Source, schema: pa.Schema,
                types: Mapping[str, pa.DataType] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of `source` as record batches with the column names of `schema` (its
    partition folders' columns included); the `types` columns cast (CSV: parsed) to them."""
    fields = [schema.field(column) for column, _ in source.partition]
    where = str(source.path)
    for batch in _file_batches(source, schema, types or {}):
        if source.format != "csv":
            batch = column_types.cast_named(batch, types or {}, where)
        yield hive.with_partition(batch, source, fields)


def _file_batches(source: Source, schema: pa.Schema,
                  types: Mapping[str, pa.DataType]) -> Iterator[pa.RecordBatch]:
    if source.format == "csv":
        yield from _csv_batches(source, schema)
        return
    if source.format == "json":
        yield from jsonl.batches(source.path, schema, types)
        return
    if source.lerobot is not None:
        yield from lerobot.batches(source.lerobot, source.path,
                                   lerobot.table_schema(source.lerobot, source.path))
        return
    try:
        if source.format == "parquet":
            yield from pq.ParquetFile(source.path).iter_batches(batch_size=BATCH_ROWS)
        elif source.format == "arrow":
            reader = _open_ipc(source.path)
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                for index in range(reader.num_record_batches):
                    yield reader.get_batch(index)
            else:
                yield from reader
        else:
            yield from source.dataset.to_batches(
                batch_size=BATCH_ROWS, batch_readahead=1, fragment_readahead=1)
    except (pa.ArrowException, OSError) as exc:
        raise DataHubError(f"{source.path}: could not read this {source.format} file: {exc}; "
                           "nothing was written") from exc


def _csv_batches(source: Source, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    header = _csv_header(source)
    typed = pa.schema([schema.field(n) for n in header if n in schema.names])
    reader = _open_csv(source, csv_values.as_read(typed))
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:  # OSError: a truncated .gz
            raise _csv_error(source, exc, rows) from exc
        try:
            batch = csv_values.finish(batch, typed)
        except csv_values.BadRow as bad:
            raise DataHubError(f"{source.path}: line {_line_of_row(source, rows + bad.index)}: "
                               f"{bad} (nothing was written; the table is at its previous "
                               "version)") from bad
        rows += batch.num_rows
        yield batch


_ROW = re.compile(r"Row #(\d+): ")
_NAIVE = re.compile(r"In CSV column #(\d+): .*expected a zone offset in '(.*?)'", re.DOTALL)
_BAD_VALUE = re.compile(r"In CSV column #(\d+): .*invalid value '(.*)'", re.DOTALL)


def _csv_error(source: Source, exc: Exception, rows_before: int) -> DataHubError:
    """A CSV error naming the file and the line (1 = the header) of the row that failed."""
    text = str(exc).replace("CSV parse error: ", "")
    if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
        return DataHubError(f"{source.path}: could not read the file ({text}): a corrupt or "
                            "truncated .gz? Check it with `gzip -t` (nothing was written)")
    if rows_before == 0 and ("Empty CSV file" in text or "cannot infer number" in text):
        return DataHubError(f"{source.path}: no rows (the file is empty or holds only a "
                            "header); remove it from the ingest or add its rows (nothing was "
                            "written)")
    if "invalid UTF8" in text:
        return csv_values.not_utf8(source.path)
    line, retype = None, ""
    if match := _ROW.search(text):
        line, text = int(match.group(1)), _ROW.sub("", text, count=1)
    if match := _NAIVE.search(text):
        column, value = int(match.group(1)), match.group(2)
        name = dict(enumerate(_csv_header(source))).get(column, f"#{column + 1}")
        line = line or _line_of_value(source, column, value, rows_before)
        return DataHubError(
            f"{source.path}: line {line}: column {name!r}: the value {value!r} has no time "
            "zone, and `timestamp` (UTC) needs one. Add the zone to the values "
            f"(`2026-12-01T10:00:00Z`, `+02:00`), or read them as they are with --type "
            f"{name}=timestamp[us] (nothing was written)")
    if match := _BAD_VALUE.search(text):
        column = int(match.group(1))
        line = line or _line_of_value(source, column, match.group(2), rows_before)
        header = _csv_header(source)
        if column < len(header):  # the type comes from the table (append) or the first rows
            text = f"column {header[column]!r}: {text}"
            retype = (f", or read the column as another type with --type {header[column]}=TYPE "
                      "(e.g. float64 or string; on an append it must be the table's)")
    where = f"line {line}" if line else f"after data row {rows_before}"
    return DataHubError(
        f"{source.path}: {where}: {text.strip()}. Fix or remove that row and ingest again"
        f"{retype} (nothing was written; the table is at its previous version)"
    )


def _line_of_row(source: Source, index: int) -> int | None:
    """The physical line of data row `index` (0-based; quoted fields may span lines)."""
    delimiter = "\t" if source.path.name.lower().endswith(".tsv") else ","
    with _text(source.path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)
        rows = (row for row in reader if row)  # Arrow skips empty lines
        for number, _ in enumerate(rows):
            if number == index:
                return reader.line_num
    return None


def _line_of_value(source: Source, column: int, value: str, rows_before: int) -> int | None:
    """The physical line of the first data row after `rows_before` whose `column` is `value`.

    Only on the error path: Arrow's conversion errors name the value, not the row.
    """
    delimiter = "\t" if source.path.name.lower().endswith(".tsv") else ","
    with _text(source.path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)
        for index, row in enumerate(reader):
            if index >= rows_before and len(row) > column and row[column] == value:
                return reader.line_num
    return None
