"""`arf datahub ingest --type COLUMN=TYPE`: a column's type given instead of inferred from the
first 4 MiB of a CSV (arf_trainer.datahub.column_types). Real files, real Delta tables."""

from __future__ import annotations

import datetime as dt
import subprocess
from argparse import Namespace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arf_trainer.datahub import sources
from arf_trainer.datahub.column_types import parse_types
from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.tables import open_table
from arf_trainer.errors import DataHubError

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / ".venv" / "bin" / "arf-trainer"


def _late_float_csv(path: Path, rows: int = 200) -> Path:
    """An integer column whose first non-integer value comes after the first block."""
    lines = ["episode,torque,note"] + [f"{i // 10},{i},ok" for i in range(rows)]
    path.write_text("\n".join([*lines, f"{rows // 10},1.5,late"]) + "\n")
    return path


def _table(hub: Path) -> pa.Table:
    return open_table(hub, "eps").dataset.to_table()


def test_a_late_value_of_another_type_fails_and_names_the_fix(tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 256)  # the type from the first rows only
    csv = _late_float_csv(tmp_path / "eps.csv")
    with pytest.raises(DataHubError, match=r"eps\.csv: line 202: column 'torque': .*'1\.5'.*"
                                           r"--type torque=TYPE \(e\.g\. float64 or string"):
        ingest(tmp_path / "hub", "eps", [csv])
    assert not (tmp_path / "hub" / "eps" / "_delta_log").exists()
    result = ingest(tmp_path / "hub", "eps", [csv], types=parse_types(["torque=float64"]))
    table = _table(tmp_path / "hub")
    assert result.rows == 201 and table.schema.field("torque").type == pa.float64()
    assert table.schema.field("episode").type == pa.int64()  # the others still inferred
    assert sorted(table.column("torque").to_pylist())[-2:] == [198.0, 199.0]


def test_parquet_columns_are_cast_and_a_value_that_does_not_fit_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"day": ["2026-12-01", "2026-12-02"], "x": [1, 2]}),
                   tmp_path / "a.parquet")
    ingest(tmp_path / "hub", "eps", [tmp_path / "a.parquet"],
           types=parse_types(["day=date", "x=float32"]))
    table = _table(tmp_path / "hub")
    assert table.column("day").to_pylist() == [dt.date(2026, 12, 1), dt.date(2026, 12, 2)]
    assert table.schema.field("x").type == pa.float32()
    pq.write_table(pa.table({"day": ["tomorrow"], "x": [3]}), tmp_path / "b.parquet")
    with pytest.raises(DataHubError, match=r"b\.parquet: column 'day' \(string\) cannot be read "
                                           r"as date32\[day\] given by --type"):
        ingest(tmp_path / "hub", "eps", [tmp_path / "b.parquet"],
               types=parse_types(["day=date", "x=float32"]))
    assert open_table(tmp_path / "hub", "eps").version == 0


def test_a_type_against_the_tables_is_refused_on_an_append(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "a.parquet")
    ingest(tmp_path / "hub", "eps", [tmp_path / "a.parquet"])
    with pytest.raises(DataHubError, match="column 'x' is string in the input but int64"):
        ingest(tmp_path / "hub", "eps", [tmp_path / "a.parquet"],
               types=parse_types(["x=string"]))


def test_a_partition_folder_can_be_typed(tmp_path: Path) -> None:
    (tmp_path / "src" / "day=2026-12-01").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1.0]}), tmp_path / "src/day=2026-12-01/p.parquet")
    ingest(tmp_path / "hub", "eps", [tmp_path / "src"], types=parse_types(["day=date"]))
    assert _table(tmp_path / "hub").column("day").to_pylist() == [dt.date(2026, 12, 1)]


@pytest.mark.parametrize(("specs", "message"), [
    (["torque"], "give COLUMN=TYPE"),
    (["torque=float64", "torque=string"], "names column 'torque' twice"),
    (["torque=decimal"], "'decimal' is not a type name; use one of int64, float64"),
])
def test_bad_type_specs_are_named(specs: list[str], message: str) -> None:
    with pytest.raises(DataHubError, match=message):
        parse_types(specs)


def test_a_type_for_a_column_the_input_lacks_is_refused(tmp_path: Path) -> None:
    csv = _late_float_csv(tmp_path / "eps.csv")
    with pytest.raises(DataHubError, match=r"--type names 'torq', which .*eps\.csv does not "
                                           r"have; its columns: episode, torque, note"):
        ingest(tmp_path / "hub", "eps", [csv], types=parse_types(["torq=float64"]))


def test_the_command_lines(tmp_path: Path) -> None:
    from arf_training.cli_datahub import trainer_command

    args = Namespace(sub="ingest", table="eps", paths=["x.csv"], mode="append", partition_by=[],
                     types=["torque=float64", "day=date"], json=False, frames="png")
    assert trainer_command(args, "/h")[-4:] == ["--type", "torque=float64", "--type", "day=date"]
    csv = _late_float_csv(tmp_path / "eps.csv")
    done = subprocess.run([str(TRAINER), "datahub", "ingest", "--hub", str(tmp_path / "hub"),
                           "eps", str(csv), "--type", "torque=double"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _table(tmp_path / "hub").schema.field("torque").type == pa.float64()
    done = subprocess.run([str(TRAINER), "datahub", "ingest", "--hub", str(tmp_path / "hub"),
                           "eps", str(csv), "--type", "torque"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "give COLUMN=TYPE" in done.stderr
