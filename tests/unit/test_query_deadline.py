"""A dataset query that ignores DuckDB's interrupt still ends at its time limit (plus a grace):
the process exits 2 naming the limit (arf_trainer.datahub.deadline). Real DuckDB, in child
processes, since the process ends."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from arf_trainer.datahub.query import run_query
from arf_trainer.datahub.tables import write_table

# One function call over a 50 M-element list: DuckDB checks for an interrupt only between
# row batches, and folds this constant while it plans the query, so it ran on for ~25 s past
# a 1 s limit here (each time it was planned) and returned its result.
SLOW = "SELECT len(list_sort(list_reverse(range(50000000)))) AS n FROM t"

CHILD = """
import sys
from pathlib import Path
from arf_trainer.datahub import deadline
from arf_trainer.datahub.query import run_query
from arf_trainer.datahub.stream import QuerySource
deadline.GRACE_S = 2.0
hub, how, query = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if how == "run_query":
    print(run_query(hub, query, timeout_s=1.0, threads=1)[0].num_rows)
else:  # the prepare step's stream
    source = QuerySource(hub, query, None, parameters=None, what="dataset.query",
                         memory_limit="2GB", timeout_s=1.0, spill_dir=hub / "spill", threads=1)
    with source.stream(None, 1024) as (_, batches):
        print(sum(b.num_rows for b in batches))
"""


def _run(hub: Path, how: str, query: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CHILD, str(hub), how, query],
                          capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - started


def test_a_query_that_ignores_the_interrupt_ends_the_process(tmp_path: Path) -> None:
    write_table(tmp_path, "t", pa.table({"x": [1]}))
    (tmp_path / "spill").mkdir()
    for how, what in (("run_query", "the dataset query"), ("stream", "dataset.query")):
        done, seconds = _run(tmp_path, how, SLOW)
        assert done.returncode == 2, (how, done.stdout, done.stderr)
        assert done.stdout == ""  # no result
        assert (f"arf-trainer: error: {what} ran longer than its 1s limit and did not stop "
                "within 2s of being interrupted") in done.stderr, done.stderr
        assert "Fix: select fewer rows" in done.stderr
        assert seconds < 25, (how, seconds)  # 1 s + 2 s + the interpreter's start


def test_a_query_that_stops_at_the_interrupt_is_a_query_error(tmp_path: Path) -> None:
    """The usual case: the interrupt works, the step reports the error and goes on (no exit)."""
    import pytest

    from arf_trainer.errors import QueryError

    write_table(tmp_path, "t", pa.table({"x": list(range(1000))}))
    cross = "SELECT count(*) FROM t a, t b, t c, t d"  # 10^12 rows, checked between batches
    started = time.monotonic()
    with pytest.raises(QueryError, match=r"ran longer than its 1s limit and was stopped"):
        run_query(tmp_path, cross, timeout_s=1.0, threads=1)
    assert time.monotonic() - started < 10
