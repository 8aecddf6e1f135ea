"""Sandboxed, read-only SQL over the data hub: `run_query(hub, query, pinned)`.

Template authors and trigger-form users write the dataset query, so it is untrusted input
running inside the training container. The sandbox, in the order it is built:

1. The static check `arf_trainer.datahub.sqlcheck.check_query` (also what `arf templates
   lint` runs): a length cap before any parsing, then DuckDB's own parser (not regexes) must
   find exactly one SELECT (COPY, ATTACH, INSTALL/LOAD, PRAGMA, SET, CALL, EXPLAIN, DDL and
   DML are refused before anything runs), reading only tables by name and calling only
   allowlisted functions (nothing that reads DuckDB's settings, catalog or files).
2. The tables the statement references (from DuckDB's parse tree) must all be hub tables.
   Only those are opened, at their pinned version (or the latest), so the versions reported
   back are exactly the data the query could read.
3. A fresh in-memory DuckDB with extension autoload/autoinstall off, Python replacement scans
   off (otherwise `FROM some_name` would find any Python variable of that name in the caller's
   frames), no temp directory (an in-memory database would otherwise spill to `./.tmp`), a
   memory limit, and the UTC time zone (not the host's: TIMESTAMPTZ results would follow it).
   The referenced tables are registered as views over Arrow datasets, then
   `enable_external_access=false` (no files, URLs, databases or extensions) and
   `lock_configuration=true` (the query cannot undo any of the above).
4. A timer interrupts the connection when the time limit passes, and ends the process if the
   query does not stop (`arf_trainer.datahub.deadline`: DuckDB checks between row batches).

The prepare step streams instead (`arf_trainer.datahub.stream`): the same steps 1, 2 and 4 and
the same locked connection, except that step 3 gives DuckDB a spill directory inside the run
workspace (set in the connection's configuration, so before the lock), so that sorting a result
larger than the memory limit spills to disk there instead of failing.

Rows come back in a canonical order: the query is run as `SELECT * FROM (<query>) ORDER BY ALL`
(built with DuckDB's relational API, so no SQL text is spliced). DuckDB scans Arrow datasets and
runs operators in parallel, so without it the row order of e.g. `SELECT * FROM t WHERE ...`
depends on thread scheduling, and so would the shard hashes and the dataset fingerprint built
from them. A query's own ORDER BY therefore does not decide the output order; LIMIT still
decides which rows are picked. (Floating-point aggregates such as `sum(x)` over many rows can
still differ in the last bits between thread counts; pass `threads=1` where that matters.)
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from arf_trainer.datahub.deadline import Deadline
from arf_trainer.datahub.sqlcheck import (
    _FIX_READ_ONLY,
    available_text,
    check_query,
)
from arf_trainer.datahub.sqlcheck import shown as _shown
from arf_trainer.datahub.tables import TableSnapshot, list_tables, open_table, vacuumed
from arf_trainer.errors import QueryError

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = "1GB"
DEFAULT_TIMEOUT_S = 60.0


def _referenced_tables(hub: Path, names: tuple[str, ...]) -> list[str]:
    """The hub tables behind the checked query's table names (already known to exist).
    SQL identifiers are case-insensitive in DuckDB; hub table names are lower case."""
    by_lower = {name.lower(): name for name in list_tables(hub)}
    return sorted({by_lower[n.lower()] for n in names if n.lower() in by_lower})


def _available(available: list[str]) -> str:
    return available_text(available)


def _open_snapshots(hub: Path, referenced: list[str],
                    pinned: Mapping[str, int]) -> dict[str, TableSnapshot]:
    for name in sorted(set(pinned) - set(referenced)):
        # Validate the pin (a typo in a pin must not pass silently) but say it is unused:
        # an overriding query may legitimately read other tables than the template's.
        open_table(hub, name, pinned[name])
        log.warning("dataset.tables pins %s=%s, but the query does not read %s; pin ignored",
                    name, pinned[name], name)
    return {name: open_table(hub, name, pinned.get(name)) for name in referenced}


# A streamed scan reads one file and this many batches ahead (Arrow's defaults: 4 files and 16
# batches of 131,072 rows each, ~1.6 GiB in flight on 200-byte rows once a table's files hold
# enough batches to fill them: a prepare of 18.5 M episode rows peaked at 2 GiB resident).
SCAN_BATCH_ROWS, SCAN_BATCH_READAHEAD = 65_536, 2


class _BoundedDataset(pads.FileSystemDataset):
    """A table's files as a dataset whose scans read ahead little. DuckDB asks the registered
    dataset for `scanner(columns=..., filter=...)` (a Python call), so projection and filter
    pushdown still apply: a narrow query over a wide frame table reads only its columns."""

    def scanner(self, *args: Any, **kwargs: Any) -> pads.Scanner:
        kwargs.setdefault("batch_size", SCAN_BATCH_ROWS)
        kwargs.setdefault("fragment_readahead", 1)
        kwargs.setdefault("batch_readahead", SCAN_BATCH_READAHEAD)
        return super().scanner(*args, **kwargs)


def _bounded_scan(snapshot: TableSnapshot) -> _BoundedDataset:
    """`snapshot` with little read-ahead (the same fragments, partition values included; a
    Delta table's dataset is a FileSystemDataset, `tables.open_table`)."""
    dataset = snapshot.dataset
    return _BoundedDataset(list(dataset.get_fragments()), dataset.schema, dataset.format,
                           dataset.filesystem, root_partition=dataset.partition_expression)


def _sandbox(snapshots: Mapping[str, TableSnapshot], memory_limit: str,
             threads: int | None, spill_dir: Path | None = None,
             bounded_scan: bool = False) -> duckdb.DuckDBPyConnection:
    """A locked connection over `snapshots`; it spills only into `spill_dir`, if given.
    `bounded_scan`: the tables are read with little read-ahead (`_bounded_scan`), for a query
    that streams a large result (prepare); else with Arrow's defaults. Both keep projection and
    filter pushdown."""
    config: dict[str, str | bool | int | float | list[str]] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_persistent_secrets": False,
        "python_enable_replacements": False,
        "python_scan_all_frames": False,
        "temp_directory": str(spill_dir) if spill_dir is not None else "",
        "memory_limit": memory_limit,
    }
    if threads is not None:
        config["threads"] = threads
    try:
        con = duckdb.connect(":memory:", config=config)
    except duckdb.Error as exc:
        raise QueryError(
            f"cannot start the query sandbox with memory_limit={memory_limit!r}, "
            f"threads={threads!r}: {exc}. Use a memory size such as '1GB' and threads >= 1"
        ) from exc
    try:
        # Register before locking down: registration is the only step that needs Python
        # objects, and it happens under our control, not the query's.
        for name, snapshot in snapshots.items():
            con.register(name, _bounded_scan(snapshot) if bounded_scan else snapshot.dataset)
        # The host's zone otherwise (ICU's settings, so not in `config`): TIMESTAMPTZ values
        # print, truncate and extract (::VARCHAR, date_trunc, hour) in it, so would the shards.
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET Calendar = 'gregorian'")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _out_of_memory(what: str, query: str, memory_limit: str, ceiling: str | None,
                   exc: BaseException) -> QueryError:
    # DuckDB's limit covers its buffer manager only; values such as repeat('x', 10**8) are
    # allocated outside it and fail only at the process's own ceiling (a failed malloc).
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    limits = f"memory limit of {memory_limit}" + (f" within {ceiling}" if ceiling else "")
    raise_it = "raise resources.memory in the template's training section" if ceiling \
        else "raise the limit"
    return QueryError(f"{what} needs more than its {limits} ({reason}). Query: {_shown(query)}. "
                      f"Fix: select fewer rows or columns, avoid building huge values, or "
                      f"{raise_it}")


def open_checked(hub: Path, query: str, pinned: Mapping[str, int] | None,
                 parameters: Mapping[str, Any] | None, what: str,
                 timeout_s: float) -> tuple[str, dict[str, Any], dict[str, TableSnapshot]]:
    """Steps 1 and 2 of the sandbox: the checked SQL, the parameter values it uses, and the
    snapshots of the hub tables it reads (each at its pinned or latest version)."""
    if timeout_s <= 0:
        raise QueryError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    bound_values = dict(parameters or {})
    checked = check_query(query, list_tables(hub), what=what, parameters=list(bound_values))
    statement = checked.statement
    bound = {name: bound_values[name] for name in set(statement.named_parameters)}
    referenced = _referenced_tables(hub, checked.tables)
    return statement.query, bound, _open_snapshots(hub, referenced, dict(pinned or {}))


def timeout_line(what: str, query: str, timeout_s: float, how: str = "was stopped") -> str:
    return (f"{what} ran longer than its {timeout_s:g}s limit and {how}. Query: "
            f"{_shown(query)}. Fix: select fewer rows (WHERE), avoid cross joins and functions "
            "over huge lists, or raise the time limit")


@contextmanager
def query_errors(hub: Path, what: str, query: str, memory_limit: str, ceiling: str | None,
                 timeout_s: float, timed_out: threading.Event,
                 snapshots: Mapping[str, TableSnapshot]) -> Iterator[None]:
    """Turn what DuckDB (or Arrow, reading its result) raises into a QueryError that says why
    (a DataHubError when a VACUUM removed files of a version the query was reading)."""
    try:
        yield
    except duckdb.InterruptException as exc:
        if timed_out.is_set():
            raise QueryError(timeout_line(what, query, timeout_s)) from exc
        raise QueryError(f"the dataset query was interrupted: {exc}") from exc
    except (duckdb.OutOfMemoryException, MemoryError) as exc:
        raise _out_of_memory(what, query, memory_limit, ceiling, exc) from exc
    except duckdb.PermissionException as exc:
        raise QueryError(
            f"the dataset query tried to reach outside the data hub ({exc}). "
            f"Query: {_shown(query)}. Fix: {_FIX_READ_ONLY}; files, URLs, databases and "
            "extensions are not reachable from the sandbox"
        ) from exc
    except duckdb.CatalogException as exc:
        raise QueryError(
            f"the dataset query failed: {exc}. Query: {_shown(query)}. Only hub tables named in "
            f"FROM/JOIN clauses can be read; {_available(list_tables(hub))}"
        ) from exc
    except (duckdb.Error, pa.ArrowException) as exc:
        for snapshot in snapshots.values():
            error = vacuumed(hub, snapshot, while_reading=True)
            if error:
                raise error from exc
        raise QueryError(f"the dataset query failed: {exc}. Query: {_shown(query)}") from exc


def run_query(
    hub: Path,
    query: str,
    pinned: Mapping[str, int] | None = None,
    *,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    parameters: Mapping[str, Any] | None = None,
    what: str = "the dataset query",
    memory_ceiling: str | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """Run one read-only SELECT over the hub's tables in the sandbox described above.

    Args:
        hub: data hub root (a directory of Delta tables).
        query: the SQL text (DuckDB dialect); exactly one SELECT.
        pinned: table name -> version to read; unpinned tables are read at their latest version.
        memory_limit: DuckDB memory limit, e.g. "1GB"; exceeding it fails the query (nothing
            spills to disk).
        timeout_s: wall-clock limit of the execution, in seconds.
        threads: DuckDB worker threads; None = DuckDB's default (one per core).
        parameters: values for the query's named parameters (`$data_interval_start`), bound by
            DuckDB, never pasted into the SQL text. The query may use any subset of them; a
            parameter it uses that is not given is an error naming the ones available.
        what: how error messages name the query, e.g. "dataset.replay.query".
        memory_ceiling: the process's own memory limit as the user set it (e.g.
            "resources.memory: 2Gi"), named when the query runs out of memory.

    Returns:
        The result rows in canonical order (`ORDER BY ALL`), and {table: version read} for the
        tables the query references.

    Raises:
        QueryError: the query is not one SELECT, is invalid, references a table the hub does not
            have, touches files/extensions/settings, or exceeds its time or memory limit.
        DataHubError: a pinned table or version does not exist, or a VACUUM removed its files
            (before or while the query read them).
    """
    sql, bound, snapshots = open_checked(hub, query, pinned, parameters, what, timeout_s)
    con = _sandbox(snapshots, memory_limit, threads)
    deadline = Deadline(con, timeout_s, functools.partial(timeout_line, what, query, timeout_s))
    try:
        with deadline, query_errors(hub, what, query, memory_limit, memory_ceiling, timeout_s,
                                    deadline.timed_out, snapshots):
            relation = con.sql(sql, params=bound or None)
            if relation is None:  # cannot happen for a SELECT; kept so the type is honest
                raise QueryError(f"the dataset query returned no result. Query: {_shown(query)}")
            result = relation.order("ALL").to_arrow_table()
    finally:
        con.close()
    versions = {name: snap.version for name, snap in snapshots.items()}
    log.info("query read %s and returned %d rows",
             ", ".join(f"{n}@v{v}" for n, v in versions.items()) or "no tables", result.num_rows)
    return result, versions
