"""Users' data into the hub: Parquet, CSV, Arrow IPC, JSON Lines files or folders (or a Delta
table, or a LeRobot dataset: `arf_trainer.datahub.lerobot`) in one atomic, versioned Delta
commit, streamed in bounded memory.

The guarantees, in the order they are built:

1. Every source is resolved and its schema checked before a byte is written: a missing path,
   an unknown file type, files whose columns differ from the first one, or an append whose
   columns differ from the table's (named: missing, extra, different type) fail here.
2. The rows stream: one file at a time, record batch by record batch (Parquet row groups, CSV
   blocks, IPC batches), through a `RecordBatchReader` that delta-rs writes as it reads. Memory
   is bounded by a few batches plus delta-rs's open file buffers, not by the input size.
3. Delta commits once, at the end: the data files are written first and the new log entry is
   put with an atomic create-if-absent. Anything that stops the stream (a CSV row that does not
   parse, a corrupt file, SIGKILL) leaves no log entry, so the table stays at its previous
   version and every reader sees what it saw before. Orphaned data files of a stopped write
   are never referenced (`arf datahub vacuum` removes them once older than its retention).
4. Array columns (`FLOAT[7]` joint vectors, `UTINYINT[64][64][3]` frames) and unsigned integers
   keep their Arrow types through `arf_trainer.datahub.arrow_types`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Schema, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from arf_trainer.datahub import ingest_checks
from arf_trainer.datahub.arrow_types import schema_differences, storable_schema, to_storable
from arf_trainer.datahub.sources import Source, read_source, resolve_sources, source_schema
from arf_trainer.datahub.table_damage import damaged_log
from arf_trainer.datahub.tables import WriteMode, make_hub, open_table, table_path
from arf_trainer.errors import DataHubError


@dataclass(frozen=True)
class IngestResult:
    """What one ingest committed."""

    table: str
    version: int
    rows: int
    files: int
    bytes_read: int
    mode: str

    def as_dict(self) -> dict:
        return {"table": self.table, "version": self.version, "rows": self.rows,
                "files": self.files, "bytes_read": self.bytes_read, "mode": self.mode}


def _existing(hub: Path, name: str) -> DeltaTable | None:
    path = table_path(hub, name)
    try:
        return DeltaTable(str(path))
    except TableNotFoundError:
        return None
    except DeltaError as exc:  # a damaged log: appending to it would fail half-way
        raise damaged_log(path, name, exc) from exc


def _check_append(name: str, table: DeltaTable, current: pa.Schema, incoming: pa.Schema,
                  partition_by: list[str]) -> pa.Schema:
    """`incoming` in the table's column order, once its columns are known to match."""
    problems = schema_differences(current, incoming)
    if problems:
        raise DataHubError(
            f"cannot append to data hub table {name!r}: the input's columns differ from the "
            f"table's (version {table.version()}): {'; '.join(problems)}. Fix: make the input "
            "match the table (rename those columns, read one as the table's type with "
            "`--type COLUMN=TYPE`, or cast it in DuckDB or pandas), or replace the table with "
            "`--mode overwrite` (older versions stay readable)"
        )
    existing = list(table.metadata().partition_columns)
    if partition_by and partition_by != existing:
        raise DataHubError(
            f"cannot append to data hub table {name!r} partitioned by {existing or 'nothing'} "
            f"with --partition-by {','.join(partition_by)}; drop --partition-by to keep the "
            "table's partitioning, or repartition it with `--mode overwrite`"
        )
    return pa.schema([incoming.field(column) for column in current.names])


def _check_partitions(partition_by: list[str], schema: pa.Schema) -> None:
    for column in partition_by:
        if column not in schema.names:
            raise DataHubError(
                f"--partition-by {column!r} is not a column of the input; columns: "
                f"{', '.join(schema.names)}"
            )
        dtype = schema.field(column).type
        # Binary values do not survive a partition folder's name (delta-rs writes b'a' as the
        # text '\\u0061' and reads that back), so they are refused like floats.
        if pa.types.is_nested(dtype) or pa.types.is_floating(dtype) or _is_binary(dtype):
            raise DataHubError(
                f"--partition-by {column!r}: a {dtype} column cannot name a partition folder; "
                "partition by a string, integer or date column (e.g. a day or a robot id)"
            )
    if len(set(partition_by)) != len(partition_by) or len(set(partition_by)) >= len(schema):
        raise DataHubError(
            f"--partition-by {','.join(partition_by)}: name each column once, and leave at "
            "least one column out (the data files hold the columns that are not partitions)"
        )


def _is_binary(dtype: pa.DataType) -> bool:
    return (pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)
            or pa.types.is_fixed_size_binary(dtype) or pa.types.is_binary_view(dtype))


def _hub_type(dtype: pa.DataType) -> pa.DataType:
    """The type the hub gives back for `dtype`, so that ingesting the same file twice appends:
    Delta stores instants in UTC (any time zone reads back as UTC) and dictionary-encoded
    columns (pandas categoricals) as their values."""
    if pa.types.is_dictionary(dtype):
        return _hub_type(dtype.value_type)
    if pa.types.is_timestamp(dtype) and dtype.tz is not None and dtype.tz != "UTC":
        return pa.timestamp(dtype.unit, tz="UTC")
    return dtype


def _check_columns(source: Source, schema: pa.Schema) -> pa.Schema:
    """`schema` in the hub's types, after checking Delta can hold every column as named."""
    lower: dict[str, str] = {}
    for position, column in enumerate(schema.names, start=1):
        if not column.strip():
            # Delta cannot address a column with no name (nor can SQL in prepare).
            raise DataHubError(
                f"{source.path}: column {position} has no name ({column!r}); give it one in "
                "the file (the CSV header, or the Parquet/Arrow schema) and ingest again "
                "(nothing was written)")
        if column.lower() in lower:
            raise DataHubError(
                f"{source.path}: columns {lower[column.lower()]!r} and {column!r} differ only "
                "in case (or repeat); Delta column names are case-insensitive. Rename one of "
                "them and ingest again (nothing was written)")
        lower[column.lower()] = column
    schema = pa.schema([pa.field(f.name, _hub_type(f.type)) for f in schema])
    untyped = [f.name for f in schema if pa.types.is_null(f.type)]
    if untyped:
        # Delta would store them as type null, and every later append of real values to the
        # table would then be refused.
        raise DataHubError(
            f"{source.path}: column(s) {', '.join(map(repr, untyped))} have no type: no value to "
            "infer it from (a CSV with a header and no rows, or a column empty in every row). "
            "Ingest a file with values first, or write the column with a type (e.g. a Parquet "
            "file); nothing was written")
    for field in storable_schema(schema):
        try:
            Schema.from_arrow(pa.schema([field]))
        except Exception as exc:  # delta-rs raises a bare Exception for a type it lacks
            raise DataHubError(
                f"{source.path}: column {field.name!r} has type {field.type}, which a Delta "
                f"table cannot store ({_short(exc)}). Cast it first (e.g. a time of day or a "
                "duration to int64 microseconds, or to a string) and ingest again (nothing was "
                "written)") from exc
    return schema


class _Stream:
    """The batches of every source in turn, cast to the stored schema; counts what passed.

    delta-rs pulls from this generator on its own thread; an exception raised here surfaces
    as a generic DeltaError, so the original one is kept to be re-raised as it was.
    """

    def __init__(self, sources: Sequence[Source], schema: pa.Schema, storable: pa.Schema,
                 types: Mapping[str, pa.DataType], partitions: Sequence[str], mode: str):
        self.sources, self.schema, self.storable, self.types = sources, schema, storable, types
        self.partitions, self.mode = partitions, mode
        self.rows = 0
        self.error: BaseException | None = None

    def batches(self) -> Iterator[pa.RecordBatch]:
        try:
            for source in self.sources:
                before = 0  # the source's rows already read, for the row an error names
                for batch in read_source(source, self.schema, self.types):
                    ingest_checks.check_batch(batch, str(source.path), self.partitions, before)
                    self.rows += batch.num_rows
                    before += batch.num_rows
                    yield self._storable(batch, str(source.path))
            if self.rows == 0:  # raised, not returned: delta-rs would commit an empty version
                raise ingest_checks.no_rows(self.sources, self.mode)
        except BaseException as exc:
            self.error = exc
            raise

    def _storable(self, batch: pa.RecordBatch, where: str) -> pa.RecordBatch:
        try:
            return to_storable(batch, self.storable)
        except pa.ArrowException as exc:  # a uint64 above int64's range
            raise ingest_checks.storable_error(batch, self.storable, where, exc) from exc

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.storable, self.batches())


class _CreatedMeanwhile(Exception):
    """Another writer created the table while this ingest was creating it."""


def ingest(hub: Path, name: str, paths: Sequence[str | Path], mode: WriteMode = "append",
           partition_by: Sequence[str] = (),
           types: Mapping[str, pa.DataType] | None = None,
           frames: str = "png") -> IngestResult:
    """Write the rows of `paths` (files, folders, Delta tables) to table `name` in one commit.

    `append` adds to the table (creating it if needed) and requires the same columns and
    types; `overwrite` replaces rows and schema (older versions stay readable). `types`
    (`--type`, `arf_trainer.datahub.column_types`) gives columns' types instead of inferring
    them. `frames` ("png" or "video", `--frames`) is how a LeRobot dataset's cameras are
    stored (`arf_trainer.datahub.lerobot`, `video_store`). Raises `DataHubError` for bad input;
    the table is then unchanged (a stopped `--frames video` ingest may leave videos in the
    table's `_videos` folder, stored by content: a later ingest reuses them).
    """
    if mode not in ("append", "overwrite"):
        raise DataHubError(f"--mode {mode!r} is not supported; use 'append' or 'overwrite'")
    if frames not in ("png", "video"):
        raise DataHubError(f"--frames {frames!r} is not supported; use 'png' or 'video'")
    try:
        return _ingest_once(hub, name, paths, mode, partition_by, types or {}, frames)
    except _CreatedMeanwhile:
        # Checked again against the table the other writer created: an append of other
        # columns is then refused, naming them, instead of replacing that table's schema.
        return _ingest_once(hub, name, paths, mode, partition_by, types or {}, frames)


def _with_frames(sources: list[Source], frames: str, table_dir: Path) -> list[Source]:
    """`--frames video`: the LeRobot sources store their videos in `table_dir`."""
    if frames == "png":
        return sources
    if not any(s.lerobot is not None and s.lerobot.video_keys for s in sources):
        raise DataHubError("--frames video stores a LeRobot dataset's camera videos; none of "
                           "the sources is a LeRobot dataset with video features (a folder "
                           "with meta/info.json): leave --frames out")
    return [replace(s, lerobot=replace(s.lerobot, video_store=table_dir))
            if s.lerobot is not None else s for s in sources]


def _ingest_once(hub: Path, name: str, paths: Sequence[str | Path], mode: WriteMode,
                 partition_by: Sequence[str],
                 types: Mapping[str, pa.DataType], frames: str) -> IngestResult:
    path = table_path(hub, name)
    sources = _with_frames(resolve_sources(paths), frames, path)
    ingest_checks.check_distinct(sources)
    existing = _existing(hub, name)
    if existing is None:
        ingest_checks.check_table_folder(path, name)
    table = existing if mode == "append" else None
    current = open_table(hub, name).dataset.schema if table is not None else None
    # An append reads CSV with the table's column types, so inference cannot invent a clash.
    schema = _check_columns(sources[0], source_schema(sources, current, types))
    partitions = list(partition_by)
    _check_partitions(partitions, schema)
    if table is not None:
        schema = _check_append(name, table, current, schema, partitions)
        partitions = partitions or list(table.metadata().partition_columns)
    storable = storable_schema(schema)
    stream = _Stream(sources, schema, storable, types, partitions, mode)
    make_hub(path.parent)
    named = [str(s.path.resolve()) for s in sources[:20]]  # the commit log stays small
    if len(sources) > 20:
        named.append(f"... {len(sources) - 20} more")
    token = uuid.uuid4().hex
    # Creating: no retry. delta-rs would otherwise commit a create that lost the race for
    # version 0 as the next version, replacing the winner's schema even in append mode.
    commit = CommitProperties(custom_metadata={"arf.operation": "ingest",
                                               "arf.sources": json.dumps(named),
                                               "arf.ingest_id": token},
                              max_commit_retries=0 if existing is None else None)
    try:
        write_deltalake(str(path), stream.reader(), mode=mode, partition_by=partitions or None,
                        schema_mode="overwrite" if mode == "overwrite" else None,
                        commit_properties=commit)
    except Exception as exc:  # delta-rs raises bare Exceptions too (schema errors)
        if isinstance(stream.error, DataHubError):
            raise stream.error from None
        if existing is None and isinstance(exc, CommitFailedError) and stream.error is None:
            raise _CreatedMeanwhile() from exc
        cause = stream.error or exc
        action = f"{mode} to" if existing is not None else "ingest into"
        raise DataHubError(
            f"could not {action} data hub table {name!r} at {path}: {_short(cause)}; the table "
            "is unchanged (still at its previous version)"
        ) from cause
    return IngestResult(table=name, version=_committed_version(path, token),
                        rows=stream.rows, files=len(sources),
                        bytes_read=sum(s.size for s in sources), mode=mode)


def _committed_version(path: Path, token: str) -> int:
    """The version this ingest's commit got (other writers may have committed since)."""
    table = DeltaTable(str(path))
    for limit in (50, None):
        for entry in table.history(limit):
            if entry.get("arf.ingest_id") == token:
                return int(entry["version"])
    return int(table.version())


def _short(exc: BaseException) -> str:
    """The first line of an error, without delta-rs's embedded Python traceback."""
    text = re.split(r"\. Detail: Python exception|\n", str(exc), maxsplit=1)[0]
    return text or type(exc).__name__
