"""`arf datahub restore TABLE --version N` on real Delta tables: an older version's rows become
the latest again, as a new version, and nothing is lost (arf_trainer.datahub.maintenance)."""

from __future__ import annotations

import json
import subprocess
from argparse import Namespace
from pathlib import Path

import pyarrow as pa
import pytest

from arf_trainer.datahub.describe import describe_table
from arf_trainer.datahub.maintenance import describe_restore, restore
from arf_trainer.datahub.tables import open_table, write_table
from arf_trainer.errors import DataHubError

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / ".venv" / "bin" / "arf-trainer"


def _batch(start: int, rows: int = 4) -> pa.Table:
    ids = list(range(start, start + rows))
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "level": pa.array([(i * 7) % 256 for i in ids], pa.uint8()),
        "joints": pa.array([[i + k / 8 for k in range(7)] for i in ids],
                           pa.list_(pa.float32(), 7)),
    })


def _rows(hub: Path, version: int | None = None) -> pa.Table:
    return open_table(hub, "eps", version).dataset.to_table().sort_by("id")


def test_restore_undoes_a_bad_append_and_keeps_it_readable(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    write_table(hub, "eps", _batch(0))
    write_table(hub, "eps", _batch(4))   # version 1: good
    write_table(hub, "eps", _batch(100))  # version 2: the bad append
    good = _rows(hub, 1)
    summary = restore(hub, "eps", 1)
    assert (summary["restored"], summary["version_after"], summary["rows"]) == (True, 3, 8)
    assert _rows(hub).equals(good)  # same rows, same types (uint8, float[7])
    assert _rows(hub).schema == good.schema
    assert _rows(hub, 2).num_rows == 12  # the bad version stays readable
    history = describe_table(hub, "eps")["history"]
    assert history[0]["operation"] == "RESTORE"
    assert describe_restore(summary) == ("eps: version 3 has the rows of version 1 (8 rows); "
                                         "the versions it replaces (2) stay readable")


def test_restore_brings_back_the_columns_an_overwrite_replaced(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    write_table(hub, "eps", _batch(0))
    write_table(hub, "eps", pa.table({"other": ["a", "b"]}), mode="overwrite")
    assert _rows(hub, 0).schema != open_table(hub, "eps").dataset.schema
    restore(hub, "eps", 0)
    assert _rows(hub).equals(_rows(hub, 0))
    write_table(hub, "eps", _batch(8))  # appends with version 0's columns work again
    assert _rows(hub).num_rows == 8


def test_restoring_the_latest_writes_nothing_and_bad_versions_are_named(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    write_table(hub, "eps", _batch(0))
    write_table(hub, "eps", _batch(4))
    summary = restore(hub, "eps", 1)
    assert not summary["restored"] and open_table(hub, "eps").version == 1
    assert describe_restore(summary) == "eps: version 1 is already the latest; nothing to restore"
    with pytest.raises(DataHubError, match=r"has no version 7 to restore; versions: 0, 1 \(latest"):
        restore(hub, "eps", 7)
    with pytest.raises(DataHubError, match="has no version -1 to restore"):
        restore(hub, "eps", -1)
    with pytest.raises(DataHubError, match="does not exist"):
        restore(hub, "nope", 0)
    assert open_table(hub, "eps").version == 1


def test_the_command_lines(tmp_path: Path, monkeypatch, capfd) -> None:
    from arf_training.cli import main as arf_main
    from arf_training.cli_datahub import trainer_command

    args = Namespace(sub="restore", table="eps", version=3, json=True)
    assert trainer_command(args, "/h")[1:] == [
        "datahub", "restore", "--hub", "/h", "eps", "--version", "3", "--json"]
    hub = tmp_path / "hub"
    for start in (0, 4, 8):
        write_table(hub, "eps", _batch(start))
    done = subprocess.run([str(TRAINER), "datahub", "restore", "--hub", str(hub), "eps",
                           "--version", "0", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version_after"] == 3 and _rows(hub).num_rows == 4
    monkeypatch.setenv("ARF_DATAHUB_URI", str(hub))
    assert arf_main(["datahub", "restore", "eps", "--version", "2"]) == 0
    assert "eps: version 4 has the rows of version 2 (12 rows)" in capfd.readouterr().out
    assert arf_main(["datahub", "restore", "eps", "--version", "9"]) == 2
    assert "has no version 9" in capfd.readouterr().err
