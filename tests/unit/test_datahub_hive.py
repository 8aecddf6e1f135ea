"""`arf datahub ingest` of Hive-partitioned folders (`column=value/`), as Spark, Athena and
`pyarrow.dataset.write_dataset(partitioning="hive")` write them: the folder values become
columns. Real files, real Delta tables."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.tables import open_table
from arf_trainer.errors import DataHubError

ROWS = pa.table({
    "robot_id": pa.array([7, 7, 12, 12, 7], pa.int64()),
    "site": ["lab a/1", "lab a/1", "north", None, "north"],  # '/' and ' ' are URI-encoded
    "step": pa.array([0, 1, 0, 1, 2], pa.int32()),
    "x": [0.5, 1.5, 2.5, 3.5, 4.5],
})


def _write_hive(folder: Path, table: pa.Table, columns: list[str]) -> None:
    pads.write_dataset(table, folder, format="parquet", partitioning=pads.partitioning(
        pa.schema([table.schema.field(c) for c in columns]), flavor="hive"))


def _read(hub: Path, name: str = "eps") -> pa.Table:
    return open_table(hub, name).dataset.to_table()


def test_partition_folders_become_columns(tmp_path: Path) -> None:
    _write_hive(tmp_path / "src", ROWS, ["robot_id", "site"])
    assert any("site=lab%20a%2F1" in str(p) for p in (tmp_path / "src").rglob("*.parquet"))
    assert any("__HIVE_DEFAULT_PARTITION__" in str(p) for p in (tmp_path / "src").rglob("*"))
    result = ingest(tmp_path / "hub", "eps", [tmp_path / "src"])
    assert result.rows == 5
    table = _read(tmp_path / "hub")
    assert table.schema.field("robot_id").type == pa.int64()  # every value an integer
    assert table.schema.field("site").type == pa.string()
    got = table.select(ROWS.column_names).sort_by([("robot_id", "ascending"),
                                                   ("step", "ascending")])
    assert got.to_pylist() == ROWS.sort_by([("robot_id", "ascending"),
                                            ("step", "ascending")]).to_pylist()


def test_an_append_casts_folder_values_to_the_tables_types(tmp_path: Path) -> None:
    hub, day = tmp_path / "hub", pa.array([dt.date(2026, 12, 1)] * 2, pa.date32())
    pq.write_table(pa.table({"day": day, "step": [0, 1], "x": [0.0, 1.0]}), tmp_path / "a.parquet")
    ingest(hub, "eps", [tmp_path / "a.parquet"])
    _write_hive(tmp_path / "more", pa.table({"day": ["2026-12-02", "2026-12-03"], "step": [2, 3],
                                             "x": [2.0, 3.0]}), ["day"])
    assert ingest(hub, "eps", [tmp_path / "more"]).version == 1
    days = _read(hub).sort_by("step").column("day").to_pylist()
    assert days == [dt.date(2026, 12, d) for d in (1, 1, 2, 3)]
    (tmp_path / "bad" / "day=yesterday").mkdir(parents=True)
    pq.write_table(pa.table({"step": [4], "x": [4.0]}), tmp_path / "bad/day=yesterday/p.parquet")
    with pytest.raises(DataHubError, match=r"day=yesterday does not fit the column's type date32"):
        ingest(hub, "eps", [tmp_path / "bad"])
    assert open_table(hub, "eps").version == 1 and _read(hub).num_rows == 4  # unchanged


def test_a_value_that_is_not_an_integer_makes_the_column_a_string(tmp_path: Path) -> None:
    for robot in ("7", "12", "r9"):
        (tmp_path / "src" / f"robot={robot}").mkdir(parents=True)
        pq.write_table(pa.table({"x": [1.0]}), tmp_path / "src" / f"robot={robot}" / "p.parquet")
    ingest(tmp_path / "hub", "eps", [tmp_path / "src"])
    table = _read(tmp_path / "hub")
    assert table.schema.field("robot").type == pa.string()
    assert sorted(table.column("robot").to_pylist()) == ["12", "7", "r9"]


def test_files_under_different_partition_columns_are_refused(tmp_path: Path) -> None:
    (tmp_path / "src" / "robot=7" / "day=1").mkdir(parents=True)
    (tmp_path / "src" / "robot=8").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1.0]}), tmp_path / "src/robot=7/day=1/p.parquet")
    pq.write_table(pa.table({"x": [2.0]}), tmp_path / "src/robot=8/p.parquet")
    with pytest.raises(DataHubError, match=r"different partition folders.*robot=8/p.parquet "
                                           r"under \['robot'\]"):
        ingest(tmp_path / "hub", "eps", [tmp_path / "src"])
    assert not (tmp_path / "hub" / "eps").exists()


def test_a_column_in_the_file_and_the_folder_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src" / "robot=7").mkdir(parents=True)
    pq.write_table(pa.table({"robot": [7], "x": [1.0]}), tmp_path / "src/robot=7/p.parquet")
    with pytest.raises(DataHubError, match="column 'robot' is both in the file and in its "
                                           "folder name"):
        ingest(tmp_path / "hub", "eps", [tmp_path / "src"])


def test_two_inputs_must_agree_on_their_partition_columns(tmp_path: Path) -> None:
    _write_hive(tmp_path / "a", ROWS, ["robot_id"])
    pq.write_table(ROWS, tmp_path / "flat.parquet")  # robot_id in the file instead
    with pytest.raises(DataHubError, match="partition folders none instead of"):
        ingest(tmp_path / "hub", "eps", [tmp_path / "a", tmp_path / "flat.parquet"])


def test_a_partition_column_can_partition_the_table(tmp_path: Path) -> None:
    _write_hive(tmp_path / "src", ROWS, ["robot_id"])
    ingest(tmp_path / "hub", "eps", [tmp_path / "src"], partition_by=["robot_id"])
    assert sorted(p.name for p in (tmp_path / "hub" / "eps").iterdir()
                  if p.name.startswith("robot_id=")) == ["robot_id=12", "robot_id=7"]
    assert _read(tmp_path / "hub").num_rows == 5
