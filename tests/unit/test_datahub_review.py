"""Regressions found reviewing the data hub's write and read paths (ingest, sources, tables,
describe): each test failed before its fix."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

import arf_trainer.datahub.ingest as ingest_module
from arf_trainer.datahub.describe import describe_table
from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.tables import open_table, table_path
from arf_trainer.errors import DataHubError


def _parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def test_table_name_with_trailing_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataHubError, match="not allowed"):
        table_path(tmp_path, "robot\n")


@pytest.mark.parametrize("column", [
    pytest.param(pa.array([dt.datetime(2024, 1, 1, 12)], pa.timestamp("us", tz="Europe/Berlin")),
                 id="timestamp-with-zone"),
    pytest.param(pa.array(["a", "b", "a"]).dictionary_encode(), id="dictionary"),
])
def test_the_same_file_appends_twice(tmp_path: Path, column: pa.Array) -> None:
    data = _parquet(tmp_path / "d.parquet",
                    pa.table({"id": pa.array(range(len(column)), pa.int64()), "c": column}))
    ingest(tmp_path / "hub", "t", [data])
    assert ingest(tmp_path / "hub", "t", [data]).version == 1
    rows = open_table(tmp_path / "hub", "t").dataset.to_table()
    assert rows.num_rows == 2 * len(column)
    assert rows["c"].to_pylist()[: len(column)] == pa.chunked_array([column]).cast(
        rows.schema.field("c").type).to_pylist()


@pytest.mark.parametrize(("table", "match"), [
    pytest.param(pa.table({"A": [1], "a": [2]}), "differ only in case", id="case-duplicates"),
    pytest.param(pa.table({"id": [1], "c": pa.array([dt.time(1, 2)], pa.time64("us"))}),
                 "column 'c' has type time64", id="time-of-day"),
    pytest.param(pa.table({"id": [1], "c": pa.array([5], pa.duration("s"))}),
                 "column 'c' has type duration", id="duration"),
])
def test_columns_delta_cannot_hold_are_refused_by_name(tmp_path: Path, table: pa.Table,
                                                       match: str) -> None:
    data = _parquet(tmp_path / "d.parquet", table)
    with pytest.raises(DataHubError, match=match) as info:
        ingest(tmp_path / "hub", "t", [data])
    assert str(data) in str(info.value)
    assert not (tmp_path / "hub" / "t" / "_delta_log").exists()


def test_csv_with_byte_order_mark_appends_with_the_table_types(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    ingest(hub, "t", [_parquet(tmp_path / "d.parquet",
                               pa.table({"a": pa.array([1.5], pa.float32()), "b": [1]}))])
    csv = tmp_path / "bom.csv"
    csv.write_bytes(b"\xef\xbb\xbfa,b\n2.5,2\n")
    assert ingest(hub, "t", [csv]).version == 1
    assert sorted(open_table(hub, "t").dataset.to_table()["a"].to_pylist()) == [1.5, 2.5]


def test_folder_walk_follows_symlinked_folders_and_skips_hidden_tables(tmp_path: Path) -> None:
    outside, data = tmp_path / "outside", tmp_path / "data"
    outside.mkdir()
    data.mkdir()
    _parquet(outside / "o.parquet", pa.table({"id": [1, 2]}))
    _parquet(data / "d.parquet", pa.table({"id": [3]}))
    os.symlink(outside, data / "more")
    os.symlink(data, data / "loop")  # a link to an ancestor is walked once, not forever
    write_deltalake(str(data / "_old" / "stale"), pa.table({"id": [99]}))
    result = ingest(tmp_path / "hub", "t", [data])
    ids = sorted(open_table(tmp_path / "hub", "t").dataset.to_table()["id"].to_pylist())
    assert (result.rows, ids) == (3, [1, 2, 3])


@pytest.mark.parametrize(("partition_by", "match"), [
    pytest.param(["k"], "binary column", id="binary"),
    pytest.param(["k", "v"], "leave at least one column out", id="every-column"),
])
def test_bad_partition_columns_are_refused(tmp_path: Path, partition_by: list[str],
                                           match: str) -> None:
    data = _parquet(tmp_path / "d.parquet", pa.table({"k": [b"a", b"b"], "v": [1, 2]}
                                                     if partition_by == ["k"] else
                                                     {"k": ["a", "b"], "v": [1, 2]}))
    with pytest.raises(DataHubError, match=match):
        ingest(tmp_path / "hub", "t", [data], partition_by=partition_by)


def test_describe_an_older_version_numbers_its_history_right(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    ingest(hub, "t", [_parquet(tmp_path / "a.parquet", pa.table({"id": [1, 2]}))])
    ingest(hub, "t", [_parquet(tmp_path / "b.parquet", pa.table({"id": [3, 4, 5]}))])
    history = describe_table(hub, "t", 0)["history"]
    assert [(e["version"], e["rows_added"]) for e in history] == [(0, 2)]


def _while_streaming(monkeypatch, action) -> None:
    """Run `action` (another writer) once, as the ingest's first batch is read."""
    real, done = ingest_module.read_source, []

    def read_source(source, schema, *rest):
        if not done:
            done.append(True)
            other = threading.Thread(target=action)  # delta-rs's thread cannot write itself
            other.start()
            other.join()
        yield from real(source, schema, *rest)

    monkeypatch.setattr(ingest_module, "read_source", read_source)


def test_racing_create_does_not_replace_the_winners_schema(tmp_path: Path,
                                                           monkeypatch) -> None:
    hub = tmp_path / "hub"
    path = str(table_path(hub, "t"))
    _while_streaming(monkeypatch, lambda: write_deltalake(path, pa.table({"id": [1, 2]})))
    mine = _parquet(tmp_path / "b.parquet", pa.table({"id": ["x"], "x": [1.0]}))
    with pytest.raises(DataHubError, match="cannot append to data hub table 't'"):
        ingest(hub, "t", [mine])
    table = DeltaTable(path)
    assert table.version() == 0
    assert open_table(hub, "t").dataset.schema.names == ["id"]


def test_racing_create_of_the_same_columns_lands_both_with_their_versions(
        tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    path = str(table_path(hub, "t"))
    _while_streaming(monkeypatch, lambda: write_deltalake(path, pa.table({"id": [1, 2]})))
    result = ingest(hub, "t", [_parquet(tmp_path / "b.parquet", pa.table({"id": [3]}))])
    assert result.version == 1
    assert sorted(open_table(hub, "t").dataset.to_table()["id"].to_pylist()) == [1, 2, 3]


def test_reported_version_is_this_ingests_even_if_another_commits_after(
        tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    data = _parquet(tmp_path / "a.parquet", pa.table({"id": [1]}))
    ingest(hub, "t", [data])
    real = ingest_module.write_deltalake

    def write_then_another(*args, **kwargs):
        real(*args, **kwargs)
        real(args[0], pa.table({"id": [2]}), mode="append")  # a concurrent ingest, just after

    monkeypatch.setattr(ingest_module, "write_deltalake", write_then_another)
    assert ingest(hub, "t", [data]).version == 1


def _header_only_csv(folder: Path) -> Path:
    (folder / "x.csv").write_text("a,b\n")
    return folder / "x.csv"


@pytest.mark.parametrize("make", [
    pytest.param(_header_only_csv, id="header-only-csv"),
    pytest.param(lambda d: _parquet(d / "x.parquet", pa.table({"a": [1.0], "b": pa.nulls(1)})),
                 id="all-null-parquet-column"),
])
def test_a_column_with_no_type_is_refused_and_creates_no_table(tmp_path: Path, make) -> None:
    """Stored as type null, it refused every later append of real values."""
    hub = tmp_path / "hub"
    with pytest.raises(DataHubError, match=r"'b'.* have no type.*nothing was written") as caught:
        ingest(hub, "t", [make(tmp_path)])
    assert "x." in str(caught.value)
    assert not (table_path(hub, "t") / "_delta_log").exists()
    (tmp_path / "rows.csv").write_text("a,b\n1.5,2\n")
    assert ingest(hub, "t", [tmp_path / "rows.csv"]).rows == 1
    assert str(open_table(hub, "t").dataset.schema.field("b").type) == "int64"
