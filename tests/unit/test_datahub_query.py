"""The data hub tables and the SQL sandbox, against real Delta tables and a real DuckDB."""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from arf_trainer.datahub import query as query_module
from arf_trainer.datahub.query import run_query
from arf_trainer.datahub.tables import list_tables, open_table, table_versions, write_table
from arf_trainer.errors import DataHubError, QueryError


def _files_under(*roots: Path) -> set[Path]:
    found: set[Path] = set()
    for root in roots:
        for folder, _, files in os.walk(root):
            found.update(Path(folder) / name for name in files)
    return found


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """Table `t` with versions 0 (a = 3, 1, 2) and 1 (+ a = 5, 4); table `u` with one version."""
    root = tmp_path / "hub"
    write_table(root, "t", pa.table({"a": [3, 1, 2], "b": ["c", "a", "b"]}))
    write_table(root, "t", pa.table({"a": [5, 4], "b": ["e", "d"]}), mode="append")
    write_table(root, "u", pa.table({"x": [1.0, 2.0]}))
    return root


@pytest.fixture
def sandbox_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: DuckDB would spill or write relative paths here."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# --- tables -----------------------------------------------------------------------------------


def test_tables_list_versions_and_open(hub: Path) -> None:
    assert list_tables(hub) == ["t", "u"]
    assert table_versions(hub, "t") == [0, 1]
    latest, first = open_table(hub, "t"), open_table(hub, "t", 0)
    assert (latest.version, latest.dataset.count_rows()) == (1, 5)
    assert (first.version, first.dataset.count_rows()) == (0, 3)
    assert latest.uri.startswith("file://") and latest.uri.endswith("/hub/t")
    assert list_tables(hub / "missing") == []


def test_missing_table_and_version_are_named(hub: Path) -> None:
    with pytest.raises(DataHubError, match=r"'nope' \(version latest\).*tables available: t, u"):
        open_table(hub, "nope")
    with pytest.raises(DataHubError, match=r"'t' has no version 7; versions available: 0, 1"):
        open_table(hub, "t", 7)
    with pytest.raises(DataHubError, match="not allowed"):
        open_table(hub, "../t")


def test_write_returns_new_version_and_rejects_schema_drift(hub: Path) -> None:
    with pytest.raises(DataHubError, match="mode='overwrite'"):
        write_table(hub, "u", pa.table({"y": ["text"]}))
    assert write_table(hub, "u", pa.table({"y": ["text"]}), mode="overwrite") == 1
    assert open_table(hub, "u", 0).dataset.schema.names == ["x"]


# --- sandbox ----------------------------------------------------------------------------------

BAD_QUERIES = [
    pytest.param("COPY (SELECT 1) TO '{tmp}/x.csv'", "COPY statement", id="copy"),
    pytest.param("COPY t TO '{tmp}/t.parquet' (FORMAT parquet)", "COPY statement", id="copy-table"),
    pytest.param("SELECT * FROM read_csv('/etc/passwd')", "outside the data hub", id="read_csv"),
    pytest.param("SELECT * FROM read_text('{tmp}/secret.txt')", "outside the data hub",
                 id="read_text"),
    pytest.param("SELECT * FROM glob('/*')", "outside the data hub", id="glob"),
    pytest.param("SELECT * FROM '/etc/passwd'", "'/etc/passwd', which is not a table",
                 id="file-as-table"),
    pytest.param("ATTACH '{tmp}/x.db'", "ATTACH statement", id="attach"),
    pytest.param("INSTALL httpfs", "INSTALL statement", id="install"),
    pytest.param("LOAD httpfs", "LOAD statement", id="load"),
    pytest.param("SELECT * FROM t; SELECT * FROM u", "holds 2 statements", id="two-statements"),
    pytest.param("SELECT 1; COPY (SELECT 1) TO '{tmp}/y.csv'", "holds 2 statements",
                 id="select-then-copy"),
    pytest.param("PRAGMA database_list", "PRAGMA statement", id="pragma"),
    pytest.param("SET enable_external_access = true", "SET statement", id="set"),
    pytest.param("CALL pragma_version()", "CALL statement", id="call"),
    pytest.param("EXPLAIN SELECT * FROM t", "EXPLAIN statement", id="explain"),
    pytest.param("CREATE TABLE z AS SELECT 1", "CREATE statement", id="create"),
    pytest.param("SELECT * FROM nope", "'nope', which is not a table of the data hub",
                 id="unknown-table"),
    pytest.param("SELEC * FROM t", "not valid SQL", id="syntax"),
    pytest.param("   ", "is empty", id="empty"),
    pytest.param("SELECT * FROM secret_rows", "not a table", id="python-variable"),
]


@pytest.mark.parametrize(("sql", "fragment"), BAD_QUERIES)
def test_bad_queries_are_refused_and_leave_nothing(hub: Path, tmp_path: Path, sandbox_dirs: Path,
                                                   sql: str, fragment: str) -> None:
    (tmp_path / "secret.txt").write_text("do not read")
    secret_rows = pa.table({"password": ["hunter2"]})  # noqa: F841 - bait for replacement scans
    before = _files_under(tmp_path)
    with pytest.raises(QueryError) as info:
        run_query(hub, sql.format(tmp=tmp_path), timeout_s=10)
    message = str(info.value)
    assert fragment in message
    assert "Query: " in message or "is empty" in message  # the offending text is shown
    assert _files_under(tmp_path) == before


def test_unknown_table_lists_available_tables(hub: Path) -> None:
    with pytest.raises(QueryError, match="tables available: t, u"):
        run_query(hub, "SELECT * FROM t JOIN missing USING (a)")


def test_python_variables_are_invisible_even_without_the_table_check(hub: Path) -> None:
    # Second line of defence: the locked connection itself cannot see caller variables.
    secret_rows = pa.table({"password": ["hunter2"]})  # noqa: F841
    con = query_module._sandbox({}, "256MB", 1)
    try:
        with pytest.raises(duckdb.CatalogException):
            con.sql("SELECT * FROM secret_rows").fetchall()
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
    finally:
        con.close()


def test_query_over_the_time_limit_is_stopped(hub: Path, tmp_path: Path,
                                              sandbox_dirs: Path) -> None:
    before = _files_under(tmp_path)
    started = time.monotonic()
    with pytest.raises(QueryError, match=r"longer than its 0.5s limit"):
        run_query(hub, "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b",
                  timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert _files_under(tmp_path) == before


def test_query_over_the_memory_limit_fails_without_spilling(hub: Path, tmp_path: Path,
                                                            sandbox_dirs: Path) -> None:
    before = _files_under(tmp_path)
    with pytest.raises(QueryError, match="memory limit of 64MB"):
        run_query(hub, "SELECT range % 7 AS k, range AS v FROM range(30000000)",
                  memory_limit="64MB", timeout_s=30, threads=1)
    assert _files_under(tmp_path) == before


def test_good_query_returns_canonical_rows_and_referenced_versions(hub: Path) -> None:
    table, versions = run_query(hub, "SELECT a, b FROM t WHERE a > 1;")
    assert table.column_names == ["a", "b"]
    assert table.to_pydict() == {"a": [2, 3, 4, 5], "b": ["b", "c", "d", "e"]}
    assert versions == {"t": 1}  # `u` exists but is not read, so it is not recorded


def test_pinned_version_is_honoured(hub: Path) -> None:
    table, versions = run_query(hub, "SELECT a FROM t", {"t": 0})
    assert table.column("a").to_pylist() == [1, 2, 3]
    assert versions == {"t": 0}
    with pytest.raises(DataHubError, match="versions available: 0, 1"):
        run_query(hub, "SELECT a FROM t", {"t": 9})


def test_pin_of_a_missing_table_is_an_error_even_if_unused(hub: Path) -> None:
    with pytest.raises(DataHubError, match="'tt'"):
        run_query(hub, "SELECT a FROM t", {"tt": 0})


@pytest.mark.parametrize("sql", [
    pytest.param("WITH big AS (SELECT * FROM t WHERE a >= 4) SELECT a FROM big", id="cte"),
    pytest.param("FROM T SELECT a WHERE a >= 4", id="from-first-upper-case"),
    pytest.param("SELECT a FROM t ORDER BY a DESC LIMIT 2 -- trailing comment", id="limit"),
    pytest.param("SELECT a FROM (SELECT * FROM t) WHERE a IN (SELECT 4 UNION SELECT 5)",
                 id="subqueries"),
])
def test_select_forms(hub: Path, sql: str) -> None:
    table, versions = run_query(hub, sql)
    assert table.column("a").to_pylist() == [4, 5]
    assert versions == {"t": 1}


def test_join_records_both_tables(hub: Path) -> None:
    table, versions = run_query(hub, "SELECT t.a, u.x FROM t JOIN u ON t.a = u.x", {"u": 0})
    assert table.to_pydict() == {"a": [1, 2], "x": [1.0, 2.0]}
    assert versions == {"t": 1, "u": 0}


@pytest.mark.parametrize("sql", [
    pytest.param("SELECT a, x FROM t JOIN (SELECT x, x::INT AS a FROM u) USING (a)", id="using"),
    pytest.param("SELECT a, x FROM t NATURAL JOIN (SELECT x, x::INT AS a FROM u)", id="natural"),
    pytest.param("SELECT COLUMNS('^(a|x)$') FROM main.t JOIN temp.main.u ON t.a = u.x",
                 id="qualified-columns-regex"),
])
def test_queries_that_need_binding_to_resolve_columns(hub: Path, sql: str) -> None:
    table, versions = run_query(hub, sql)
    assert table.to_pydict() == {"a": [1, 2], "x": [1.0, 2.0]}
    assert versions == {"t": 1, "u": 0}


@pytest.mark.parametrize(("sql", "fragment"), [
    pytest.param("SELECT * FROM query_table('u')", "tables available: t, u", id="query_table"),
    pytest.param("SELECT * FROM other.t", "'other.t', which is not a table", id="other-schema"),
])
def test_indirect_or_foreign_references_are_refused(hub: Path, sql: str, fragment: str) -> None:
    with pytest.raises(QueryError, match=fragment):
        run_query(hub, sql)


# --- bound parameters (the nightly fine-tune's data interval) --------------------------------

def _collected(tmp_path: Path) -> Path:
    import datetime as dt

    root = tmp_path / "hub"
    day = dt.datetime(2026, 11, 25, 2, 0, tzinfo=dt.UTC)
    times = [day - dt.timedelta(microseconds=1), day, day + dt.timedelta(hours=12),
             day + dt.timedelta(days=1) - dt.timedelta(microseconds=1), day + dt.timedelta(days=1)]
    write_table(root, "corrections", pa.table({
        "i": list(range(len(times))),
        "collected_at": pa.array(times, type=pa.timestamp("us", tz="UTC"))}))
    return root


INTERVAL_SQL = ("SELECT i FROM corrections WHERE collected_at >= $data_interval_start "
                "AND collected_at < $data_interval_end")


def test_data_interval_is_bound_with_exact_boundaries(tmp_path: Path) -> None:
    import datetime as dt

    start = dt.datetime(2026, 11, 25, 2, 0, tzinfo=dt.UTC)
    result, versions = run_query(_collected(tmp_path), INTERVAL_SQL, parameters={
        "data_interval_start": start, "data_interval_end": start + dt.timedelta(days=1),
        "logical_date": start})  # unused parameters are fine
    # [start, end): the row at start is in, the row at end is out, one microsecond either side
    # falls the other way.
    assert result.column("i").to_pylist() == [1, 2, 3]
    assert versions == {"corrections": 0}


def test_parameter_values_are_data_not_sql(tmp_path: Path) -> None:
    hub = _collected(tmp_path)
    sql = "SELECT count(*) AS n FROM corrections WHERE CAST(i AS VARCHAR) = $data_interval_start"
    result, _ = run_query(hub, sql, parameters={"data_interval_start": "1' OR '1'='1"})
    assert result.column("n").to_pylist() == [0]  # compared as a string, never parsed as SQL


def test_missing_parameter_is_named_with_those_available(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match=r"\$data_interval_end.*available: \$data_interval_start"):
        run_query(_collected(tmp_path), INTERVAL_SQL,
                  parameters={"data_interval_start": "2026-11-25"})
    with pytest.raises(QueryError, match="available: none"):
        run_query(_collected(tmp_path), INTERVAL_SQL)


# --- the static check (issue 13): allowlisted functions, size cap, parse cost ----------------

@pytest.mark.parametrize(("sql", "fragment"), [
    pytest.param("SELECT current_setting('temp_directory') AS d, a FROM t",
                 "calls current_setting()", id="current_setting"),
    pytest.param("SELECT * FROM duckdb_settings()", "reads FROM duckdb_settings()",
                 id="duckdb_settings"),
    pytest.param("SELECT a, (SELECT max(value) FROM duckdb_settings()) AS s FROM t",
                 "reads FROM duckdb_settings()", id="settings-in-subquery"),
    pytest.param("SELECT a, main.current_setting('memory_limit') AS m FROM t",
                 "calls main.current_setting()", id="qualified"),
    pytest.param("SELECT list_transform([1], lambda x: current_setting('threads')) AS v FROM t",
                 "calls current_setting()", id="in-lambda"),
    pytest.param("SELECT version() AS v", "calls version()", id="version"),
    pytest.param("SHOW memory_limit", "SHOW_REF", id="show-setting"),
    pytest.param("SUMMARIZE t", "SHOW_REF", id="summarize"),
    pytest.param("SELECT * FROM duckdb_tables()", "reads FROM duckdb_tables()", id="catalog"),
    pytest.param("SELECT a, now() AS at FROM t", "different value on every run", id="now"),
])
def test_functions_reading_the_sandbox_or_varying_per_run_are_refused(hub: Path, sql: str,
                                                                       fragment: str) -> None:
    with pytest.raises(QueryError) as info:
        run_query(hub, sql)
    message = str(info.value)
    assert fragment in message and "not allowed" in message and "Query: " in message
    assert "Fix: " in message


def test_query_using_every_allowed_family_runs(hub: Path) -> None:
    sql = """
        WITH w AS (SELECT a, b, row_number() OVER (ORDER BY a) AS n, lag(a) OVER (ORDER BY a) AS p
                   FROM t)
        SELECT a, abs(a - 3) + pow(a, 2) // 1 % 7 AS math, coalesce(p, -1) AS p,
               upper(b) || lpad(b, 3, '.') AS s, regexp_replace(b, '[a-c]', 'z') AS r,
               hash(a) % 10 AS bucket, date_trunc('day', TIMESTAMP '2026-11-25 02:00') AS d,
               list_sum(list_transform([a, a], lambda y: y * 2)) AS l, struct_pack(k := a).k AS k,
               CASE WHEN a > 2 THEN 'big' ELSE 'small' END AS c, a::DOUBLE AS f,
               json_extract_string('{"x": 1}', '$.x') AS j, x
        FROM w JOIN (SELECT x, x::INT AS a FROM u) USING (a), range(1) AS r0
        WHERE b LIKE '%' AND a IN (SELECT unnest(generate_series(1, 5)))
    """
    table, versions = run_query(hub, sql)
    assert table.column("a").to_pylist() == [1, 2]
    assert table.column("l").to_pylist() == [4, 8]
    assert versions == {"t": 1, "u": 0}


def test_oversized_query_is_refused_before_it_is_parsed(hub: Path) -> None:
    from arf_trainer.datahub.sqlcheck import MAX_QUERY_CHARS

    invalid = "SELECT 1 " + "?" * MAX_QUERY_CHARS  # would be a syntax error if it were parsed
    with pytest.raises(QueryError, match=r"over the limit of 32,768.*Fix: shorten it"):
        run_query(hub, invalid)
    huge = "SELECT " + ",".join(["a"] * 500_000) + " FROM t"  # 1 MB: 30 s and 1.6 GB (the issue)
    started = time.process_time()
    with pytest.raises(QueryError, match="1,000,013 characters long") as info:
        run_query(hub, huge)
    assert time.process_time() - started < 1.0
    assert len(str(info.value)) < 400  # quotes a short prefix, not the megabyte


def test_parse_cost_up_to_the_cap_stays_small(hub: Path) -> None:
    from arf_trainer.datahub.sqlcheck import MAX_QUERY_CHARS, check_query

    # The shapes with the largest parse trees per character (measured): long column and IN lists.
    n = (MAX_QUERY_CHARS - 40) // 2
    for sql in ("SELECT " + ",".join(["a"] * n) + " FROM t",
                "SELECT a FROM t WHERE a IN (" + ",".join(["1"] * n) + ")"):
        assert len(sql) <= MAX_QUERY_CHARS
        started = time.process_time()  # CPU time: wall time on a shared machine is noise
        check_query(sql, ["t"])
        assert time.process_time() - started < 5.0  # 0.45-0.7 s measured


def test_deeply_nested_expression_is_a_clear_error(hub: Path) -> None:
    # Under DuckDB's own depth limit (1000), but deeper than Python's JSON decoder recurses.
    sql = "SELECT " + "+".join(["a"] * 500) + " AS s FROM t"
    with pytest.raises(QueryError, match="nests expressions too deeply.*list_sum"):
        run_query(hub, sql)
