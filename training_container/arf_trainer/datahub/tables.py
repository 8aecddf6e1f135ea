"""The embedded data hub: versioned Delta Lake tables stored as `<hub>/<table_name>/`.

Every write (append or overwrite) creates a new table version; old versions stay readable,
which is what lets a template pin `dataset.tables: {reach_demos: 3}` and get the same rows
forever. Reading goes through `open_table`, which returns a lazily scanned Arrow dataset
(DuckDB scans it with projection and filter pushdown) together with the concrete version, so
the caller can record exactly what it read.

Only this module and `arf_trainer.datahub.table_damage` (which names a damaged log or lost
data files) touch the Delta log; the query sandbox (`arf_trainer.datahub.query`) and the
demo seeder (`arf_trainer.datahub.seed`) go through the functions here.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from arf_trainer.datahub.arrow_types import (logical_schema, recorded_types,
                                            storable_schema)
from arf_trainer.datahub.table_damage import (damaged_log, files_gone, format_versions,
                                             missing_commits)
from arf_trainer.errors import DataHubError

# Table names become directory names and SQL identifiers, so keep them to plain identifiers:
# no path separators (a name like '../x' or '/etc' must never reach the filesystem) and no
# quoting needed in SQL.
# `\Z`, not `$`: `$` also matches before a trailing newline, which would let 'x\n' through.
TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,127}\Z")
MAX_NAME_LENGTH = 128

WriteMode = Literal["append", "overwrite"]


@dataclass(frozen=True)
class TableSnapshot:
    """One table at one concrete version, ready to scan."""

    name: str
    version: int
    uri: str
    dataset: pads.Dataset


def _seed_hint(hub: Path) -> str:
    return f"create the demo tables with `arf-trainer datahub seed --hub {hub}`"


def _check_name(name: str) -> None:
    if not TABLE_NAME.match(name):
        shown = name if len(name) <= 60 else f"{name[:40]}...{name[-10:]}"
        long = f" ({len(name)} characters)" if len(name) > MAX_NAME_LENGTH else ""
        raise DataHubError(
            f"table name {shown!r}{long} is not allowed; data hub table names are lower-case "
            f"identifiers matching [a-z_][a-z0-9_]* of at most {MAX_NAME_LENGTH} characters "
            "(e.g. reach_demos)"
        )


@functools.cache
def sql_keywords() -> frozenset[str]:
    """The words DuckDB cannot read as a bare table name (`SELECT * FROM select` is a parser
    error): its reserved keywords and the type/function ones (`join`, `left`, ...)."""
    import duckdb

    with duckdb.connect() as con:
        rows = con.execute("SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category "
                           "IN ('reserved', 'type_function')").fetchall()
    return frozenset(row[0].lower() for row in rows)


def check_new_table_name(hub: Path, name: str) -> None:
    """Refuse a name a query could not use, for a table about to be created: an SQL keyword
    (`FROM select` does not parse). A table that already has that name keeps working."""
    path = table_path(hub, name)
    if name in sql_keywords() and not _has_commits(path):
        raise DataHubError(
            f"table name {name!r} is an SQL keyword: a dataset query could not name it "
            f"(`SELECT * FROM {name}` does not parse). Pick another name, e.g. {name}_data")


def _check_hub(hub: Path) -> None:
    if "%" in str(hub):
        # delta-rs takes the path for a URL: h%41 is read as hA. A write then committed its
        # version under one folder and failed reading it back from the other ("unchanged").
        raise DataHubError(
            f"the data hub path {hub} contains '%', which delta-rs decodes as an escape (%41 "
            "is 'A'): its tables would be written in one folder and looked for in another. "
            "Rename the folder without '%'")


def table_path(hub: Path, name: str) -> Path:
    """The directory of table `name` in `hub` (after checking the name is a plain identifier
    and the hub a path delta-rs reads as written)."""
    _check_name(name)
    _check_hub(hub)
    return hub / name


def make_hub(hub: Path) -> None:
    """Create the hub's folder for a write; a path that cannot be one is bad input, named."""
    _check_hub(hub)
    try:
        hub.mkdir(parents=True, exist_ok=True)
        probe = hub / ".locks"
        probe.mkdir(exist_ok=True)
    except OSError as exc:
        why = "it is a file" if hub.is_file() else exc.strerror or str(exc)
        raise DataHubError(
            f"the data hub {hub} is not a folder this process can write ({why}); "
            "pass --hub (or ARF_DATAHUB_URI) a writable folder, created if missing"
        ) from exc


@contextlib.contextmanager
def table_lock(hub: Path, name: str) -> Iterator[None]:
    """Hold table `name` for a read-check-append sequence across processes (an advisory flock
    on ``<hub>/.locks/<name>.lock``, released by the OS if the holder dies). Delta's optimistic
    commits let two blind appends both land, so "append the rows not yet there" needs this."""
    _check_name(name)
    make_hub(hub)
    with open(hub / ".locks" / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def list_tables(hub: Path) -> list[str]:
    """Names of the Delta tables directly under `hub`, sorted; [] if the hub does not exist.
    A hub path that is a file (or else not a folder) is named, not read as an empty hub."""
    if not hub.is_dir():
        if hub.exists():
            kind = "it is a file" if hub.is_file() else "it is not a directory"
            raise DataHubError(
                f"the data hub {hub} is not a folder this process can write or read ({kind}); "
                "set ARF_DATAHUB_URI (or --hub) to the hub's folder")
        return []
    return sorted(child.name for child in hub.iterdir()
                  if TABLE_NAME.match(child.name) and _has_commits(child))


def _has_commits(table: Path) -> bool:
    """A Delta table with at least one commit (or checkpoint). A create killed before its first
    commit leaves an empty `_delta_log`: no table, not one to skip when seeding or to list."""
    try:
        return any(entry.name.endswith((".json", ".parquet"))
                   for entry in (table / "_delta_log").iterdir())
    except OSError:  # no such folder, or not a folder
        return False


def _missing_table(hub: Path, name: str, version: int | None) -> DataHubError:
    available = list_tables(hub)
    asked = "latest" if version is None else str(version)
    return DataHubError(
        f"data hub table {name!r} (version {asked}) does not exist in {hub}; tables available: "
        f"{', '.join(available) or 'none'}. Fix the table name, or {_seed_hint(hub)}"
    )


def latest_table(hub: Path, name: str) -> DeltaTable:
    """The latest version of `name`; a missing table or an unreadable log is named."""
    path = table_path(hub, name)
    try:
        return DeltaTable(str(path))
    except TableNotFoundError as exc:
        if missing_commits(path):  # a log without its first commit: not a missing table
            raise damaged_log(path, name, exc) from exc
        raise _missing_table(hub, name, None) from exc
    except DeltaError as exc:
        raise damaged_log(path, name, exc) from exc


def table_versions(hub: Path, name: str) -> list[int]:
    """The versions of `name` that can still be read, ascending."""
    history = latest_table(hub, name).history()
    return sorted(int(entry["version"]) for entry in history if "version" in entry)


def open_table(hub: Path, name: str, version: int | None = None) -> TableSnapshot:
    """Open `name` at `version` (None = the latest) for scanning.

    Raises `DataHubError` naming the table, the version asked for and the versions available
    when the table or the version does not exist.
    """
    path = table_path(hub, name)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 0 <= version < 2**63):  # delta-rs: an int64
        raise DataHubError(
            f"version {version!r} of table {name!r} is not a valid table version; "
            "pin a non-negative integer (e.g. dataset.tables: {" + name + ": 0})"
        )
    try:
        table = DeltaTable(str(path), version=version)
    except TableNotFoundError as exc:
        if missing_commits(path):  # e.g. version 0's commit file deleted: name that
            raise damaged_log(path, name, exc) from exc
        raise _missing_table(hub, name, version) from exc
    except DeltaError as exc:
        if version is None:
            raise damaged_log(path, name, exc) from exc
        # delta-rs reports a missing version as a generic kernel error; list what exists (or
        # name the damaged log, if that is why the version could not be read).
        versions = table_versions(hub, name)
        raise DataHubError(
            f"data hub table {name!r} has no version {version}; versions available: "
            f"{format_versions(versions)} (latest {versions[-1] if versions else 'none'}). "
            f"Pin one of those in dataset.tables, or drop the pin to read the latest"
        ) from exc
    dataset = _scan(table, path)
    snapshot = TableSnapshot(name=name, version=int(table.version()), uri=path.resolve().as_uri(),
                             dataset=dataset)
    error = vacuumed(hub, snapshot)
    if error:
        raise error
    return snapshot


def vacuumed(hub: Path, snapshot: TableSnapshot, *, while_reading: bool = False
             ) -> DataHubError | None:
    """The error naming why data files of `snapshot`'s version are gone (a VACUUM, or files
    deleted from disk by hand: `table_damage.files_gone`), or None while every file is there.
    A version with files gone is still in the log: refused by name when opened (its scan would
    fail half-way with a bare "Object ... not found"), and named when the files went under a
    query reading it (`while_reading`). The dataset's paths are relative to the table's folder
    (`file_uris` would be percent-encoded)."""
    return files_gone(table_path(hub, snapshot.name), snapshot.name, snapshot.version,
                      snapshot.dataset.files, while_reading=while_reading)


def local_filesystem(path: Path) -> pafs.FileSystem:
    """The table folder `path` as Arrow's own filesystem, which every scan reads through.

    Not delta-rs's default, a Python filesystem handler: its reads hand Arrow Python `bytes`,
    and a scan's read-ahead ends on Arrow's worker threads after the scan has returned. The
    last such buffer freed there needs the GIL; once the interpreter is finalizing, taking it
    exits the thread mid-destructor and the process aborts ("terminate called without an
    active exception", SIGABRT after the step's work was done: 15 of 80 reading processes
    here, `bench/datahub_exit_abort.py`). Arrow's own reads are native buffers, and need
    no Python at all (so no GIL either while DuckDB scans).
    """
    return pafs.SubTreeFileSystem(str(Path(path).resolve()), pafs.LocalFileSystem())


def _scan(table: DeltaTable, path: Path) -> pads.Dataset:
    """The table's dataset, its files read through `local_filesystem(path)`."""
    filesystem = local_filesystem(path)
    dataset = table.to_pyarrow_dataset(filesystem=filesystem)
    recorded = recorded_types(table.schema())
    if recorded:  # array / unsigned columns: scan them with their original Arrow types
        dataset = table.to_pyarrow_dataset(schema=logical_schema(dataset.schema, recorded),
                                           filesystem=filesystem)
    return dataset


def open_delta_dataset(path: Path) -> pads.Dataset:
    """The latest version of the local Delta table at `path` (e.g. one to ingest), for scanning.

    Its files are read through Arrow's own filesystem, not delta-rs's: an ingest scans it
    while delta-rs writes, from delta-rs's runtime thread, which must not start another.
    """
    try:
        return _scan(DeltaTable(str(path)), path)
    except (TableNotFoundError, DeltaError) as exc:
        raise DataHubError(f"{path} is not a readable Delta table: {exc}") from exc


def write_table(hub: Path, name: str, data: pa.Table, mode: WriteMode = "append") -> int:
    """Append `data` to (or overwrite) table `name`, creating it if needed; return the new version.

    An append whose schema differs from the table's raises `DataHubError`; overwrite replaces
    the schema as well (older versions keep theirs).
    """
    if mode not in ("append", "overwrite"):
        raise DataHubError(f"write mode {mode!r} is not supported; use 'append' or 'overwrite'")
    path = table_path(hub, name)
    make_hub(path.parent)
    # Array and unsigned columns keep their Arrow types (see arf_trainer.datahub.arrow_types).
    data = data.cast(storable_schema(data.schema))
    try:
        write_deltalake(
            str(path), data, mode=mode,
            schema_mode="overwrite" if mode == "overwrite" else None,
        )
    except DeltaError as exc:
        raise DataHubError(
            f"could not {mode} {data.num_rows} rows to data hub table {name!r} at {path}: {exc}. "
            "For a schema change write with mode='overwrite' (older versions stay readable)"
        ) from exc
    return int(DeltaTable(str(path)).version())
