"""A dataset query's time limit: interrupt DuckDB, then end the process if that is not enough.

DuckDB checks for an interrupt between vectors of rows, not inside one function call: a query
such as `list_sort(range(300000000))` goes on for minutes after `interrupt()` (measured: a
2 s limit on `list_sort(list_reverse(range(60000000)))` returned after 41 s, with its result).
So once the limit has passed, the query gets `GRACE_S` more to notice the interrupt; if it is
still running then, the process says why on stderr and exits 2 (bad input: the same query
would do the same on a retry). Nothing is lost: a query only reads the hub, and the step that
runs it writes its result only after the query is done. Used by `run_query` and the prepare
step's stream (`arf_trainer.datahub.stream`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import duckdb

GRACE_S = 30.0
EXIT_CODE = 2  # arf_trainer.errors: bad input


class Deadline:
    """`with Deadline(con, seconds, why):` interrupts `con` after `seconds`, and ends the
    process `GRACE_S` later if the block is still running; `timed_out` says whether the limit
    was reached. `why(how)` gives the error line printed before the process ends, `how` saying
    what happened to the query."""

    def __init__(self, con: duckdb.DuckDBPyConnection, seconds: float,
                 why: Callable[[str], str]) -> None:
        self.con, self.seconds, self.why = con, max(seconds, 0.0), why
        self.timed_out = threading.Event()
        self._timer = threading.Timer(self.seconds, self._interrupt)
        self._timer.daemon = True
        self._end: threading.Timer | None = None
        self._lock = threading.Lock()
        self._done = False

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()  # never close the connection under a timer that is interrupting it
        with self._lock:
            self._done = True
            if self._end is not None:
                self._end.cancel()

    def _interrupt(self) -> None:
        self.timed_out.set()
        self.con.interrupt()
        with self._lock:
            if not self._done:
                self._end = threading.Timer(GRACE_S, self._stop_process)
                self._end.daemon = True
                self._end.start()

    def _stop_process(self) -> None:
        with self._lock:
            if self._done:
                return
        how = (f"did not stop within {GRACE_S:g}s of being interrupted (DuckDB checks between "
               "row batches, not inside one function call), so the process was ended (exit "
               f"{EXIT_CODE})")
        print(f"arf-trainer: error: {self.why(how)}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)
