"""Ways out of the SQL sandbox found by probing it with a real DuckDB, and the run-dependent
constructs that made the same table versions give different shards; each stays closed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from arf_trainer.datahub.query import run_query
from arf_trainer.datahub.tables import write_table
from arf_trainer.errors import QueryError


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    write_table(root, "t", pa.table({"a": [3, 1, 2], "b": ["c", "a", "b"]}))
    write_table(root, "u", pa.table({"x": [1.0, 2.0]}))
    return root


def _refused(hub: Path, sql: str, *fragments: str) -> str:
    with pytest.raises(QueryError) as info:
        run_query(hub, sql, timeout_s=10)
    message = str(info.value)
    for fragment in (*fragments, "Query: ", "Fix: "):
        assert fragment in message, (fragment, message)
    return message


@pytest.mark.parametrize("sql", [
    # A CTE of a subquery is not in scope beside it: this pg_settings is DuckDB's own view.
    pytest.param("SELECT * FROM (WITH pg_settings AS (SELECT 1) SELECT * FROM pg_settings), "
                 "pg_settings", id="cte-of-another-scope"),
    # A CTE never answers a qualified name: this reads DuckDB's catalog.
    pytest.param("WITH duckdb_tables AS (SELECT 1) SELECT count(*) AS n FROM main.duckdb_tables",
                 id="cte-name-qualified"),
    pytest.param('WITH "information_schema.tables" AS (SELECT 1) '
                 "SELECT table_name FROM information_schema.tables", id="cte-named-like-a-path"),
    # A CTE's body does not see the CTE itself: the inner name is the catalog's view.
    pytest.param("WITH pg_settings AS (SELECT * FROM pg_settings) SELECT * FROM pg_settings",
                 id="cte-reads-its-own-name"),
])
def test_cte_names_do_not_open_duckdbs_catalog(hub: Path, sql: str) -> None:
    _refused(hub, sql, "which is not a table of the data hub", "tables available: t, u")


@pytest.mark.parametrize("sql", [
    pytest.param("WITH x AS (SELECT a FROM t), y AS (SELECT * FROM x) SELECT * FROM y",
                 id="later-cte-sees-earlier"),
    pytest.param("WITH x AS (SELECT a FROM t) SELECT * FROM x UNION ALL SELECT * FROM x",
                 id="set-operation"),
    pytest.param("SELECT * FROM (WITH x AS (SELECT a FROM t) SELECT * FROM x) "
                 "WHERE a IN (WITH y AS (SELECT a FROM t) FROM y)", id="nested-scopes"),
])
def test_scoped_ctes_still_work(hub: Path, sql: str) -> None:
    table, versions = run_query(hub, sql)
    assert sorted(set(table.column("a").to_pylist())) == [1, 2, 3]
    assert versions == {"t": 0}


def test_a_recursive_cte_is_refused_saying_so(hub: Path) -> None:
    """It was refused as "a SELECT_NODE in FROM (e.g. DESCRIBE, SHOW, SUMMARIZE)"."""
    message = _refused(hub, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r "
                       "WHERE n < 3) SELECT n FROM r", "uses WITH RECURSIVE, which is not allowed")
    assert "DESCRIBE" not in message


@pytest.mark.parametrize(("sql", "fragment"), [
    pytest.param("SELECT a, CURRENT_DATE AS d FROM t", "uses CURRENT_DATE", id="current_date"),
    pytest.param('SELECT a, "current_timestamp" AS d FROM t', "uses current_timestamp",
                 id="quoted-current_timestamp"),
    pytest.param("SELECT a, localtimestamp AS d FROM t", "different value on every run",
                 id="localtimestamp"),
    pytest.param("SELECT a, current_catalog AS c FROM t", "sandbox's own session",
                 id="current_catalog"),
])
def test_bare_value_functions_are_refused(hub: Path, sql: str, fragment: str) -> None:
    _refused(hub, sql, fragment, "not allowed", "qualify it with its table")


def test_a_column_named_like_a_value_function_can_be_qualified(hub: Path) -> None:
    table, _ = run_query(hub, "SELECT s.user FROM (SELECT a AS user FROM t) s")
    assert table.column("user").to_pylist() == [1, 2, 3]


@pytest.mark.parametrize(("sql", "fragment"), [
    pytest.param("SELECT * FROM t USING SAMPLE 50%", "USING SAMPLE", id="using-sample"),
    pytest.param("SELECT * FROM t TABLESAMPLE 2 ROWS", "TABLESAMPLE", id="tablesample"),
    pytest.param("SELECT * FROM t USING SAMPLE 10% (bernoulli, 42)", "hash(", id="seeded"),
    pytest.param("SELECT string_agg(b, ',') AS s FROM t", "calls string_agg() without an "
                 "ORDER BY", id="string_agg"),
    pytest.param("SELECT first(a) AS f FROM t", "calls first() without", id="first"),
    pytest.param("SELECT list(a) OVER () AS l FROM t", "calls list() without", id="list-window"),
    pytest.param("SELECT row_number() OVER (PARTITION BY b) AS r FROM t",
                 "calls row_number() without", id="row_number"),
    pytest.param("SELECT * FROM t LIMIT 2", "LIMIT/OFFSET in a SELECT without ORDER BY",
                 id="limit"),
    pytest.param("SELECT * FROM (SELECT * FROM t LIMIT 2) ORDER BY a", "LIMIT/OFFSET",
                 id="limit-in-subquery"),
    pytest.param("SELECT DISTINCT ON (b) a FROM t", "DISTINCT ON", id="distinct-on"),
])
def test_run_dependent_row_choices_are_refused(hub: Path, sql: str, fragment: str) -> None:
    _refused(hub, sql, fragment, "not allowed")


@pytest.mark.parametrize("sql", [
    pytest.param("SELECT string_agg(b, ',' ORDER BY b) AS s FROM t", id="ordered-agg"),
    pytest.param("SELECT list(a) OVER (ORDER BY a) AS l FROM t", id="ordered-window"),
    pytest.param("SELECT lag(a ORDER BY b) OVER () AS l FROM t", id="argument-order"),
    pytest.param("SELECT * FROM t ORDER BY a LIMIT 2", id="ordered-limit"),
    pytest.param("SELECT DISTINCT ON (b) a FROM t ORDER BY b, a", id="ordered-distinct-on"),
    pytest.param("SELECT sum(a) OVER () AS s, rank() OVER () AS r FROM t", id="order-free"),
])
def test_ordered_forms_run(hub: Path, sql: str) -> None:
    table, _ = run_query(hub, sql)
    assert table.num_rows > 0


def test_timestamptz_results_do_not_follow_the_hosts_time_zone(tmp_path: Path) -> None:
    import datetime as dt

    root = tmp_path / "hub"
    when = dt.datetime(2026, 11, 25, 23, 30, tzinfo=dt.UTC)
    write_table(root, "c", pa.table({"ts": pa.array([when], type=pa.timestamp("us", tz="UTC"))}))
    script = ("import sys; from pathlib import Path; from arf_trainer.datahub.query import "
              "run_query; print(run_query(Path(sys.argv[1]), \"SELECT ts::VARCHAR AS s, "
              "hour(ts) AS h FROM c\")[0].to_pylist())")
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True,
                         text=True, check=True, env={**os.environ, "TZ": "Pacific/Kiritimati"})
    assert out.stdout.strip() == "[{'s': '2026-11-25 23:30:00+00', 'h': 23}]"


def test_the_prepare_steps_stream_runs_the_same_check(hub: Path, tmp_path: Path) -> None:
    from arf_trainer.datahub.stream import QuerySource

    def source(sql: str) -> QuerySource:
        return QuerySource(hub, sql, None, parameters=None, what="dataset.query",
                           memory_limit="64MB", timeout_s=10, spill_dir=tmp_path / "spill")

    with pytest.raises(QueryError, match="'pg_settings', which is not a table of the data hub"):
        source("SELECT * FROM (WITH pg_settings AS (SELECT 1) FROM pg_settings), pg_settings")
    with pytest.raises(QueryError, match="calls string_agg\\(\\) without an ORDER BY"):
        source("SELECT string_agg(b, ',') AS s FROM t")
    with source("SELECT a, TIMESTAMPTZ '2026-11-25 23:30:00+00'::VARCHAR AS s FROM t").stream(
            ["a"], 10) as (_, batches):
        assert [b.column("s")[0].as_py() for b in batches] == ["2026-11-25 23:30:00+00"]
