"""`arf datahub compact` and `arf datahub vacuum` on real Delta tables
(arf_trainer.datahub.maintenance).

Vacuum decides by time, so the tests make commits look days old the way a later clock would
see them: `_age` moves each commit's commitInfo timestamp (a version's time), its tombstones'
`remove.deletionTimestamp` (what delta-rs's vacuum reads for a replaced file) and its data
files' mtime and `add.modificationTime` (what a full vacuum reads for a file no log entry names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from test_prepare import step_env

from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.maintenance import compact, vacuum
from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.tables import open_table, write_table
from arf_trainer.errors import DataHubError

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / ".venv" / "bin" / "arf-trainer"
DAY_MS = 86_400_000


def _batch(start: int, rows: int = 4) -> pa.Table:
    ids = list(range(start, start + rows))
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "robot": pa.array([i % 3 for i in ids], pa.int32()),
        "level": pa.array([(i * 7) % 256 for i in ids], pa.uint8()),
        "joints": pa.array([[i + k / 8 for k in range(7)] for i in ids],
                           pa.list_(pa.float32(), 7)),
    })


def _appended(hub: Path, name: str, appends: int) -> None:
    for i in range(appends):
        write_table(hub, name, _batch(i * 4))


def _rows(hub: Path, name: str, version: int | None = None) -> pa.Table:
    return open_table(hub, name, version).dataset.to_table().sort_by("id")


def _files(table: Path) -> set[str]:
    return {str(p.relative_to(table)) for p in table.rglob("*.parquet")
            if "_delta_log" not in p.parts}


def _age(table: Path, days: float, versions: range | list[int] | None = None) -> None:
    """Make the commits of `versions` (default all) look `days` older."""
    shift = int(days * DAY_MS)
    for log in sorted((table / "_delta_log").glob("*.json")):
        if versions is not None and int(log.stem) not in versions:
            continue
        actions = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        for action in actions:
            if "commitInfo" in action:
                action["commitInfo"]["timestamp"] -= shift
            if "remove" in action:
                action["remove"]["deletionTimestamp"] -= shift
            if "add" in action:
                action["add"]["modificationTime"] -= shift
                data = table / unquote(action["add"]["path"])
                os.utime(data, (data.stat().st_mtime - shift / 1000,) * 2)
        log.write_text("".join(json.dumps(action) + "\n" for action in actions))


# --- compact ----------------------------------------------------------------------------------

def test_compact_many_small_appends_keeps_rows_types_and_old_versions(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _appended(hub, "eps", 30)
    before = _rows(hub, "eps")
    schema = open_table(hub, "eps").dataset.schema
    assert schema.field("joints").type == pa.list_(pa.float32(), 7)

    summary = compact(hub, "eps")
    assert summary["compacted"] and summary["rows"] == summary["rows_before"] == 120
    assert (summary["version_before"], summary["version_after"]) == (29, 30)
    assert (summary["files_before"], summary["files_after"]) == (30, 1)
    assert len(DeltaTable(str(hub / "eps")).file_uris()) == 1
    assert DeltaTable(str(hub / "eps")).history(1)[0]["operation"] == "OPTIMIZE"
    after = open_table(hub, "eps")
    assert after.version == 30
    assert after.dataset.schema.field("joints").type == pa.list_(pa.float32(), 7)
    assert after.dataset.schema.field("level").type == pa.uint8()
    assert after.dataset.schema.remove_metadata() == schema.remove_metadata()
    assert _rows(hub, "eps").equals(before)
    assert _rows(hub, "eps", 29).equals(before)  # the pinned version still reads the same rows
    assert _rows(hub, "eps", 3).num_rows == 16


def test_describe_advises_compaction_of_many_small_files_only(tmp_path: Path) -> None:
    from arf_trainer.datahub.describe import describe_table, format_description

    hub = tmp_path / "hub"
    _appended(hub, "eps", 49)
    advice = "`arf datahub compact eps` makes them fewer and larger"
    assert advice not in format_description(describe_table(hub, "eps"))  # 49 files
    _appended(hub, "eps", 1)
    text = format_description(describe_table(hub, "eps"))
    assert "50 of its 50 files are under 16.0 MB" in text and advice in text
    compact(hub, "eps")
    assert advice not in format_description(describe_table(hub, "eps"))
    assert advice not in format_description(describe_table(hub, "eps", 49))  # not the latest


def test_compact_with_nothing_to_compact_writes_no_version(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    write_table(hub, "one", _batch(0, 50))
    summary = compact(hub, "one")
    assert not summary["compacted"]
    assert summary["version_before"] == summary["version_after"] == 0
    assert DeltaTable(str(hub / "one")).version() == 0
    _appended(hub, "eps", 3)
    assert compact(hub, "eps")["compacted"]
    again = compact(hub, "eps")  # compacting twice is a no-op
    assert not again["compacted"] and again["version_after"] == again["version_before"] == 3


def test_compact_a_partitioned_table_per_partition(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    for i in range(6):
        pq.write_table(_batch(i * 6, 6), tmp_path / f"b{i}.parquet")
        ingest(hub, "eps", [tmp_path / f"b{i}.parquet"], partition_by=["robot"])
    before = _rows(hub, "eps")
    table = hub / "eps"
    assert len(_files(table)) == 18  # 6 ingests x 3 robots
    summary = compact(hub, "eps")
    assert (summary["files_before"], summary["files_after"]) == (18, 3)
    live = DeltaTable(str(table)).get_add_actions(flatten=True)
    assert sorted(live.column("partition.robot").to_pylist()) == [0, 1, 2]
    assert sorted(p.split("/")[0] for p in live.column("path").to_pylist()) == [
        "robot=0", "robot=1", "robot=2"]
    assert DeltaTable(str(table)).metadata().partition_columns == ["robot"]
    assert _rows(hub, "eps").equals(before)
    assert _rows(hub, "eps", 5).equals(before)


CONCURRENT = """
import sys, time
from pathlib import Path
import pyarrow.parquet as pq
from test_datahub_maintenance import _batch
from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.maintenance import compact
from arf_trainer.datahub.tables import table_lock, write_table

what, hub, start = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
if what == "append":
    for i in range(100, 116):
        if i % 2:  # as the failure tables append: under the table's lock
            with table_lock(hub, "eps"):
                write_table(hub, "eps", _batch(i * 4))
        else:  # as `arf datahub ingest` appends: no lock, Delta's commit check
            path = hub.parent / f"in{i}.parquet"
            pq.write_table(_batch(i * 4), path)
            ingest(hub, "eps", [path])
else:
    print(sum(compact(hub, "eps")["compacted"] for _ in range(4)))
"""


def test_append_and_compaction_at_once_both_land(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _appended(hub, "eps", 20)
    start = time.time() + 4.0  # past both interpreters' imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(REPO / "training_container"),
         os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, what, str(hub), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for what in ("append", "compact")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert int(outs[1][0].strip().splitlines()[-1]) >= 1
    expected = pa.concat_tables([_batch(i * 4) for i in [*range(20), *range(100, 116)]])
    assert _rows(hub, "eps").equals(expected.sort_by("id"))
    operations = [h["operation"] for h in DeltaTable(str(hub / "eps")).history()]
    assert operations.count("OPTIMIZE") >= 1 and operations.count("WRITE") == 36


# --- vacuum -----------------------------------------------------------------------------------

def _overwritten(hub: Path) -> Path:
    """eps: versions 0-9 appends, 10 an overwrite with the same rows (all files replaced)."""
    _appended(hub, "eps", 10)
    write_table(hub, "eps", _rows(hub, "eps"), mode="overwrite")
    return hub / "eps"


def test_vacuum_dry_run_reports_and_deletes_nothing(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    table = _overwritten(hub)
    _age(table, 3)
    files = _files(table)
    summary = vacuum(hub, "eps", 1, dry_run=True)
    assert summary["files_removed"] == 10 and summary["bytes_removed"] > 0
    assert set(summary["removed"]) < files
    assert summary["unreadable_versions"] == "0-9" and summary["readable_versions"] == "10"
    assert _files(table) == files
    assert DeltaTable(str(table)).version() == 10  # no commit either
    assert _rows(hub, "eps", 0).num_rows == 4


def test_vacuum_removes_replaced_files_and_old_versions_fail_clearly(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    table = _overwritten(hub)
    latest = _rows(hub, "eps")
    _age(table, 3)
    assert vacuum(hub, "eps", 5)["files_removed"] == 0  # 3 days old: inside a 5-day window
    planned = vacuum(hub, "eps", 1, dry_run=True)
    summary = vacuum(hub, "eps", 1)
    assert summary["removed"] == planned["removed"] and summary["files_removed"] == 10
    assert not set(summary["removed"]) & _files(table)
    # delta-rs commits a VACUUM START and a VACUUM END (no data actions: still readable).
    assert (summary["version_before"], summary["version_after"]) == (10, 12)
    assert [h["operation"] for h in DeltaTable(str(table)).history(2)] == [
        "VACUUM END", "VACUUM START"]
    assert summary["unreadable_versions"] == "0-9"
    assert summary["readable_versions"] == "10-12"
    assert _rows(hub, "eps").equals(latest)
    with pytest.raises(DataHubError, match="a VACUUM of the table removed them"):
        open_table(hub, "eps", 4)
    # What `arf training reproduce` re-runs: prepare with the recorded pin.
    with pytest.raises(DataHubError, match="version 9 of data hub table 'eps'.*VACUUM"):
        run_prepare(step_env(tmp_path / "ws", hub,
                             dataset={"query": "SELECT * FROM eps", "tables": {"eps": 9}}))
    again = vacuum(hub, "eps", 1)  # the tombstones are still in the log, their files gone:
    assert again["files_removed"] == 0 and again["version_after"] == 12  # no empty commits


def test_vacuum_under_a_running_query_names_the_vacuum(tmp_path: Path) -> None:
    """The prepare step opens its snapshots, then streams: a vacuum in between removes the
    pinned version's files under it; the step names the VACUUM, not Arrow's "No such file"."""
    from arf_trainer.datahub.query import run_query
    from arf_trainer.datahub.stream import QuerySource

    hub = tmp_path / "hub"
    table = _overwritten(hub)
    source = QuerySource(hub, "SELECT * FROM eps", {"eps": 9}, parameters=None,
                         what="dataset.query", memory_limit="1GB", timeout_s=60,
                         spill_dir=tmp_path / "spill")
    assert source.count() == 40
    _age(table, 3)
    assert vacuum(hub, "eps", 1)["unreadable_versions"] == "0-9"
    with pytest.raises(DataHubError, match=r"version 9 of data hub table 'eps' refers to data "
                       r"files that no longer exist \(10 missing.*VACUUM of the table removed "
                       r"them while this run read the version.*the latest is 12"):
        with source.stream(["id"], 16) as (_, batches):
            list(batches)
    assert run_query(hub, "SELECT count(*) AS n FROM eps")[0]["n"].to_pylist() == [40]  # the latest reads on


def test_vacuum_removes_files_whose_tombstone_a_checkpoint_dropped(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    table = _overwritten(hub)
    _age(table, 10)
    DeltaTable(str(table)).create_checkpoint()  # as delta-rs does every 100 commits
    # The checkpoint drops tombstones older than 7 days: a lite vacuum never sees them again.
    assert DeltaTable(str(table)).vacuum(retention_hours=24, enforce_retention_duration=False,
                                         dry_run=True) == []
    assert vacuum(hub, "eps", 1)["files_removed"] == 10
    assert len(_files(table)) == 1


def test_vacuum_keeps_every_version_live_inside_the_window(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    table = _overwritten(hub)
    _age(table, 40, range(10))  # files written 40 days ago,
    _age(table, 10, [10])  # replaced 10 days ago: version 9 was the latest until then
    DeltaTable(str(table)).create_checkpoint()
    files = _files(table)
    summary = vacuum(hub, "eps", 30)
    assert summary["files_removed"] == 0 and summary["unreadable_versions"] == "none"
    assert _files(table) == files
    assert _rows(hub, "eps", 9).num_rows == 40
    assert vacuum(hub, "eps", 9)["unreadable_versions"] == "0-9"


@pytest.mark.parametrize("days", [0, -1, 36501, True, 1.5, "7"])
def test_vacuum_refuses_bad_retain_days(tmp_path: Path, days) -> None:
    hub = tmp_path / "hub"
    table = _overwritten(hub)
    _age(table, 3)
    with pytest.raises(DataHubError) as caught:
        vacuum(hub, "eps", days)
    assert f"--retain-days {days!r} for data hub table 'eps'" in str(caught.value)
    assert "from 1 to 36500" in str(caught.value)
    assert len(_files(table)) == 11 and DeltaTable(str(table)).version() == 10


def test_compact_refuses_bad_target_size(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _appended(hub, "eps", 2)
    with pytest.raises(DataHubError, match="--target-size-mb 0 for data hub table 'eps'"):
        compact(hub, "eps", 0)
    assert DeltaTable(str(hub / "eps")).version() == 1


def test_unknown_table_is_named_as_open_table_names_it(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _appended(hub, "eps", 1)
    with pytest.raises(DataHubError) as expected:
        open_table(hub, "nope")
    for run in (lambda: compact(hub, "nope"), lambda: vacuum(hub, "nope", 7)):
        with pytest.raises(DataHubError) as caught:
            run()
        assert str(caught.value) == str(expected.value)
    with pytest.raises(DataHubError, match="does not exist in"):
        compact(tmp_path / "no_hub", "eps")
    assert not (tmp_path / "no_hub").exists()


# --- the command lines ------------------------------------------------------------------------

def _trainer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRAINER), "datahub", *args], capture_output=True, text=True,
                          timeout=120)


def test_trainer_cli_compact_and_vacuum(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    table = _overwritten(hub)
    _appended(hub, "eps", 2)
    done = _trainer("compact", "--hub", str(hub), "eps", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["files_before"], summary["files_after"], summary["rows"]) == (3, 1, 48)
    done = _trainer("compact", "--hub", str(hub), "eps")
    assert done.stdout.startswith("eps: nothing to compact (version 13, 1 file")
    _age(table, 3)
    done = _trainer("vacuum", "--hub", str(hub), "eps", "--retain-days", "1", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("eps: would remove 13 files (")
    assert "versions 0-12 would be no longer readable" in done.stdout
    assert "13 would stay readable; nothing was deleted" in done.stdout
    done = _trainer("vacuum", "--hub", str(hub), "eps", "--retain-days", "0")
    assert done.returncode == 2
    assert "--retain-days 0 for data hub table 'eps' is not allowed" in done.stderr
    done = _trainer("vacuum", "--hub", str(hub), "eps", "--retain-days", "1", "--json")
    assert json.loads(done.stdout)["files_removed"] == 13 and len(_files(table)) == 1


def test_arf_cli_builds_and_runs_the_trainer_commands(tmp_path: Path, monkeypatch,
                                                      capfd) -> None:
    from arf_training.cli import main as arf_main
    from arf_training.cli_datahub import trainer_command

    args = Namespace(sub="vacuum", table="eps", retain_days=30, dry_run=True, json=True)
    assert trainer_command(args, "/h")[1:] == [
        "datahub", "vacuum", "--hub", "/h", "eps", "--retain-days", "30", "--dry-run", "--json"]
    args = Namespace(sub="compact", table="eps", target_size_mb=64, json=False)
    assert trainer_command(args, "/h")[1:] == [
        "datahub", "compact", "--hub", "/h", "eps", "--target-size-mb", "64"]
    hub = tmp_path / "hub"
    monkeypatch.setenv("ARF_DATAHUB_URI", str(hub))
    _appended(hub, "eps", 3)
    assert arf_main(["datahub", "compact", "eps", "--target-size-mb", "8"]) == 0
    assert "eps: compacted 3 files into 1 (12 rows" in capfd.readouterr().out
    assert arf_main(["datahub", "vacuum", "eps", "--retain-days", "99999"]) == 2
    assert "--retain-days 99999" in capfd.readouterr().err
    assert arf_main(["datahub", "vacuum", "eps", "--retain-days", "1", "--dry-run"]) == 0
    assert "would remove 0 files" in capfd.readouterr().out
