"""A dataset query read as a stream of Arrow batches in bounded memory (the prepare step's path).

`QuerySource` checks the query and opens the snapshots of the tables it reads once (steps 1 and
2 of `arf_trainer.datahub.query`); every later use (`columns`, `count`, `stream`) runs in a
fresh locked sandbox connection over those same snapshots, so a count and the rows it counts
always come from the same table versions, even if a table gets a new version meanwhile.

What differs from `run_query`:
- The sandbox gets a spill directory (inside the run workspace, created by the caller), set in
  the connection's configuration before `lock_configuration`: DuckDB's sort spills there when
  the result is larger than its memory limit. Everything else of the sandbox is unchanged.
- Rows come out in a canonical order without holding the result in memory: sorted by the
  template's `dataset.order_by` columns (DuckDB's external sort), or by all columns (`ORDER BY
  ALL`, as `run_query`) when it declares none. The sort is built with the relational API
  (column expressions, no SQL text spliced).
- A declared order must be a unique key: two rows with equal `order_by` values could come out
  in either order (DuckDB's sort is parallel), and the shards' bytes with them, so prepare
  stops at the first repeat (compared with the row before it, which the sort puts next to it).
- The stream reads the tables with little read-ahead (`query._bounded_scan`): Arrow's default
  read-ahead alone held ~1 GiB on an 18.5 M-row table. The schema and the count keep the
  dataset scan with projection pushdown (a count reads no column).
- The time limit counts the time spent inside DuckDB (the query's own work, summed over the
  count and every batch fetch), not the time the caller spends writing what it read.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from arf_trainer.datahub.columns import check_order_by, check_scalar_keys
from arf_trainer.datahub.deadline import Deadline
from arf_trainer.datahub.query import _sandbox, open_checked, query_errors, timeout_line
from arf_trainer.errors import QueryError, SpecError


class QuerySource:
    """One checked query over fixed table snapshots, streamed from sandboxed connections."""

    def __init__(self, hub: Path, query: str, pinned: Mapping[str, int] | None, *,
                 parameters: Mapping[str, Any] | None, what: str, memory_limit: str,
                 timeout_s: float, spill_dir: Path, memory_ceiling: str | None = None,
                 threads: int | None = None):
        self.hub, self.query, self.what = hub, query, what
        self.memory_limit, self.ceiling, self.threads = memory_limit, memory_ceiling, threads
        self.spill_dir = spill_dir
        self.timeout_s = timeout_s
        self._left = timeout_s
        self._sql, self._bound, self._snapshots = open_checked(hub, query, pinned, parameters,
                                                               what, timeout_s)

    @property
    def versions(self) -> dict[str, int]:
        """{table: version} of every hub table the query reads."""
        return {name: snap.version for name, snap in self._snapshots.items()}

    @contextmanager
    def _connection(self, bounded_scan: bool = False) -> Iterator[
            tuple[duckdb.DuckDBPyConnection, duckdb.DuckDBPyRelation, _Clock]]:
        con = _sandbox(self._snapshots, self.memory_limit, self.threads, self.spill_dir,
                       bounded_scan)
        clock = _Clock(con, self)
        try:
            # Timed too: DuckDB folds constant expressions while it plans, so a query's whole
            # work can happen here (`list_sort(range(...))`).
            with self._errors(clock), clock.running():
                relation = con.sql(self._sql, params=self._bound or None)
            if relation is None:  # cannot happen for a checked SELECT
                raise QueryError(f"{self.what} returned no result")
            yield con, relation, clock
        finally:
            con.close()

    def _errors(self, clock: _Clock) -> Any:
        return query_errors(self.hub, self.what, self.query, self.memory_limit, self.ceiling,
                            self.timeout_s, clock.timed_out, self._snapshots)

    def schema(self) -> pa.Schema:
        """The result's columns and Arrow types (an empty result of the same query)."""
        with self._connection() as (_, relation, clock), self._errors(clock), clock.running():
            return relation.limit(0).to_arrow_table().schema

    def count(self) -> int:
        """Rows of the result (DuckDB drops the columns a count does not need)."""
        with self._connection() as (_, relation, clock), self._errors(clock), clock.running():
            rows = relation.aggregate("count(*)").fetchall()
        return int(rows[0][0])

    @contextmanager
    def stream(self, order_by: list[str] | None,
               batch_rows: int) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
        """(schema, batches) of the result in canonical order; see the module docstring."""
        with self._connection(bounded_scan=True) as (_, relation, clock):
            with self._errors(clock), clock.running():
                if order_by:
                    check_order_by(order_by, relation.columns, self.what)
                    ordered = relation.sort(*(duckdb.ColumnExpression(c) for c in order_by))
                else:
                    ordered = relation.order("ALL")
                reader = ordered.to_arrow_reader(batch_rows)  # runs the sort (spilling)
            batches = self._batches(reader, clock)
            yield reader.schema, (_unique(batches, order_by, self.what) if order_by else batches)

    def _batches(self, reader: pa.RecordBatchReader, clock: _Clock) -> Iterator[pa.RecordBatch]:
        while True:
            with self._errors(clock), clock.running():
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
            if batch.num_rows:
                yield batch


class _Clock:
    """The query's time budget, spent only while DuckDB works (see the module docstring)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, source: QuerySource):
        self.con, self.source = con, source
        self.timed_out = threading.Event()

    @contextmanager
    def running(self) -> Iterator[None]:
        if self.source._left <= 0:  # spent by earlier fetches: stop before asking for more
            self.timed_out.set()
            raise duckdb.InterruptException("the time limit was reached")
        source = self.source
        deadline = Deadline(self.con, source._left, functools.partial(
            timeout_line, source.what, source.query, source.timeout_s))
        started = time.monotonic()
        try:
            with deadline:
                yield
        finally:
            if deadline.timed_out.is_set():
                self.timed_out.set()
            source._left -= time.monotonic() - started


def _same(a: pa.Array, b: pa.Array) -> pa.Array:
    """Row-wise a == b, with null equal to null."""
    equal = pc.fill_null(pc.equal(a, b), False)
    return pc.or_(equal, pc.and_(pc.is_null(a), pc.is_null(b)))


def _unique(batches: Iterator[pa.RecordBatch], order_by: list[str],
            what: str) -> Iterator[pa.RecordBatch]:
    """`batches` (sorted by order_by), refusing a key that repeats (see the module docstring)."""
    last: pa.RecordBatch | None = None
    for batch in batches:
        keys = batch.select(order_by)
        check_scalar_keys(order_by, keys.schema)
        both = pa.Table.from_batches([last, keys] if last is not None else [keys]).combine_chunks()
        repeated = None
        for name in order_by:
            column = both.column(name).chunk(0) if both.num_rows else both.column(name)
            same = _same(column.slice(1), column.slice(0, len(column) - 1))
            repeated = same if repeated is None else pc.and_(repeated, same)
        if repeated is not None and pc.any(repeated).as_py():
            row = both.slice(pc.index(repeated, True).as_py(), 1).to_pylist()[0]
            raise SpecError(
                f"dataset.order_by {order_by} is not a unique key of {what}'s result: more than "
                f"one row has {row}. Add columns that tell such rows apart (e.g. [episode, "
                "step, source]), or leave order_by out to sort by every column")
        last = keys.slice(batch.num_rows - 1)
        yield batch
