"""Damaged tables and odd input at the data hub's edges: a commit file or a data file deleted by
hand, versions that do not exist, table names a query or the `arf` parser cannot take, a hub
path that is a file. Each is named with what is wrong and how to repair it, never a Rust debug
dump, and a damaged table never hides the healthy ones (arf_trainer.datahub.tables, describe,
maintenance, hub_cli; arf_training.cli_datahub)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from arf_trainer.cli import main as trainer_main
from arf_trainer.datahub.describe import describe_table, list_summaries
from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.maintenance import compact, restore, vacuum
from arf_trainer.datahub.tables import open_table, write_table
from arf_trainer.errors import DataHubError


def _batch(start: int, rows: int = 3) -> pa.Table:
    ids = list(range(start, start + rows))
    return pa.table({"id": pa.array(ids, pa.int64()), "x": pa.array([i / 2 for i in ids])})


def _appended(hub: Path, name: str, appends: int) -> Path:
    for i in range(appends):
        write_table(hub, name, _batch(i * 3))
    return hub / name


def _commit(table: Path, version: int) -> Path:
    return table / "_delta_log" / f"{version:020d}.json"


def _added_file(table: Path, version: int) -> Path:
    """The data file that `version` (one append) added."""
    def paths(at: int) -> set[str]:
        adds = DeltaTable(str(table), version=at).get_add_actions(flatten=True)
        return set(adds.column("path").to_pylist())

    (added,) = paths(version) - (paths(version - 1) if version else set())
    return table / added


def _gapped(hub: Path) -> Path:
    """Table 'gap', versions 0-4, whose commit of version 3 was deleted."""
    table = _appended(hub, "gap", 5)
    _commit(table, 3).unlink()
    return table


def _csv(tmp_path: Path) -> Path:
    source = tmp_path / "rows.csv"
    source.write_text("id,x\n1,0.5\n")
    return source


# 1. One damaged table must not hide the healthy ones.
def test_tables_lists_the_healthy_tables_beside_a_damaged_one(tmp_path: Path, capsys) -> None:
    hub = tmp_path / "hub"
    _appended(hub, "base", 2)
    _gapped(hub)
    assert list_summaries(hub) == [
        {"table": "base", "version": 1, "rows": 6, "columns": 2},
        {"table": "gap", "damaged": f"commit file {3:020d}.json (version 3) missing: versions "
                                    "3, 4 cannot be read"}]
    assert trainer_main(["datahub", "tables", "--hub", str(hub)]) == 1
    out = capsys.readouterr().out
    assert "base        1               6  2" in out
    assert f"gap   DAMAGED: commit file {3:020d}.json (version 3) missing" in out
    assert "1 damaged table (gap): `arf datahub describe gap`" in out


# 2. A gap in the log is named (file, versions, repair), not dumped as Rust debug output.
@pytest.mark.parametrize("command", [
    pytest.param(lambda hub, src: describe_table(hub, "gap"), id="describe"),
    pytest.param(lambda hub, src: compact(hub, "gap"), id="compact"),
    pytest.param(lambda hub, src: restore(hub, "gap", 1), id="restore"),
    pytest.param(lambda hub, src: vacuum(hub, "gap", 1), id="vacuum"),
    pytest.param(lambda hub, src: ingest(hub, "gap", [src]), id="ingest"),
    pytest.param(lambda hub, src: open_table(hub, "gap", 4), id="open-a-later-version"),
])
def test_a_missing_commit_file_is_named_with_the_repair(tmp_path: Path, command) -> None:
    hub = tmp_path / "hub"
    table = _gapped(hub)
    with pytest.raises(DataHubError) as caught:
        command(hub, _csv(tmp_path))
    message = str(caught.value)
    assert "ParsedLogPath" not in message and "{" not in message and "\n" not in message
    assert (f"the Delta log of data hub table 'gap' ({table / '_delta_log'}) cannot be read: "
            f"commit file {3:020d}.json (version 3) missing: versions 3, 4 cannot be read. "
            "Put the missing file back from a backup") in message
    assert f"moving the commit files after version 2 ({4:020d}.json ...) out of" in message


def test_the_advised_repair_of_a_gap_works(tmp_path: Path) -> None:
    """What the message advises without a backup: the commits after the gap moved aside."""
    hub = tmp_path / "hub"
    table = _gapped(hub)
    _commit(table, 4).rename(tmp_path / "aside.json")
    assert open_table(hub, "gap").version == 2
    assert write_table(hub, "gap", _batch(100)) == 3


# 3. A data file deleted by hand is not blamed on a VACUUM.
def test_a_data_file_deleted_by_hand_is_not_blamed_on_a_vacuum(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    table = _appended(hub, "t", 4)
    gone = _added_file(table, 2)
    gone.unlink()
    with pytest.raises(DataHubError) as caught:
        describe_table(hub, "t")
    message = str(caught.value)
    assert "VACUUM of the table removed" not in message and "Pin a version" not in message
    assert (f"version 3 of data hub table 't' refers to data files that no longer exist "
            f"(1 missing, e.g. {gone.name}) in {table}: they were deleted from disk, not by a "
            "VACUUM") in message
    assert "`arf datahub restore t --version 1`" in message
    # ... and that advice works: version 1's files are all there.
    assert restore(hub, "t", 1)["version_after"] == 4
    assert open_table(hub, "t").dataset.count_rows() == 6
    assert list_summaries(hub)[0]["version"] == 4


def test_a_vacuum_is_blamed_only_when_the_log_records_one(tmp_path: Path) -> None:
    """A vacuum after version 2 removed version 0's files: that is named. The file missing from
    version 2, the latest's too, went by hand: a vacuum never removes the latest's files."""
    hub = tmp_path / "hub"
    table = _appended(hub, "t", 2)
    write_table(hub, "t", _batch(10), mode="overwrite")  # version 2
    DeltaTable(str(table)).vacuum(retention_hours=0, enforce_retention_duration=False,
                                  dry_run=False)  # versions 3 and 4: VACUUM START, END
    assert DeltaTable(str(table)).history(1)[0]["operation"] == "VACUUM END"
    with pytest.raises(DataHubError, match="a VACUUM of the table removed them"):
        open_table(hub, "t", 0)
    gone = _added_file(table, 2)
    gone.unlink()
    with pytest.raises(DataHubError, match="deleted from disk, not by a VACUUM"):
        open_table(hub, "t", 2)
    assert list_summaries(hub) == [{"table": "t", "damaged": "1 data file of version 4 missing "
                                    f"from disk (e.g. {gone.name})"}]


def test_compact_with_files_missing_names_them_instead_of_advising_a_retry(
        tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    table = _appended(hub, "t", 3)
    _added_file(table, 2).unlink()
    with pytest.raises(DataHubError) as caught:
        compact(hub, "t")
    message = str(caught.value)
    assert "run the compaction again" not in message
    assert "could not compact data hub table 't' (it is unchanged)" in message
    assert "deleted from disk, not by a VACUUM" in message
    assert DeltaTable(str(table)).version() == 2


# 4. A missing first commit is named as that, not as a missing table.
def test_a_missing_first_commit_is_not_a_missing_table(tmp_path: Path, capsys) -> None:
    hub = tmp_path / "hub"
    table = _appended(hub, "dmg", 3)
    _commit(table, 0).unlink()
    for read in (lambda v: describe_table(hub, "dmg", v), lambda v: open_table(hub, "dmg", v)):
        for version in (0, None, 2):
            with pytest.raises(DataHubError) as caught:
                read(version)
            assert "does not exist" not in str(caught.value)
            assert (f"its first commit, {0:020d}.json (version 0: the table's columns), is "
                    "missing, so no version of the table can be read") in str(caught.value)
    assert trainer_main(["datahub", "describe", "--hub", str(hub), "dmg", "--version", "0"]) == 2
    assert f"{0:020d}.json" in capsys.readouterr().err


# 5. The CLI speaks of --version, not of a template's pin; a template's pin keeps its words.
@pytest.mark.parametrize("version", [99, -1])
def test_describe_of_a_version_not_there_speaks_cli(tmp_path: Path, version: int) -> None:
    hub = tmp_path / "hub"
    _appended(hub, "base", 4)
    with pytest.raises(DataHubError) as caught:
        describe_table(hub, "base", version)
    message = str(caught.value)
    assert (f"data hub table 'base' has no version {version}; versions available: 0-3 "
            "(latest 3). Describe one of those with `arf datahub describe base --version N`, "
            "or leave out --version for the latest") == message
    assert "dataset.tables" not in message and "pin" not in message
    with pytest.raises(DataHubError, match="Pin one of those in dataset.tables"):
        open_table(hub, "base", 99)  # what prepare and lint report for a template's pin


# 6. Table names: the length limit stated; SQL keywords refused for new tables.
def test_a_too_long_table_name_states_the_limit(tmp_path: Path) -> None:
    with pytest.raises(DataHubError) as caught:
        ingest(tmp_path / "hub", "a" * 300, [_csv(tmp_path)])
    assert "(300 characters) is not allowed" in str(caught.value)
    assert "of at most 128 characters" in str(caught.value)
    assert "a" * 100 not in str(caught.value)


@pytest.mark.parametrize("name", ["select", "order", "join"])
def test_an_sql_keyword_is_refused_as_a_new_table_name(tmp_path: Path, name: str,
                                                       capsys) -> None:
    hub = tmp_path / "hub"
    args = ["datahub", "ingest", "--hub", str(hub), name, str(_csv(tmp_path))]
    assert trainer_main(args) == 2
    assert (f"table name {name!r} is an SQL keyword: a dataset query could not name it "
            f"(`SELECT * FROM {name}` does not parse)") in capsys.readouterr().err
    assert not (hub / name).exists()
    write_table(hub, name, _batch(0))  # one made before the rule: appends keep working
    assert trainer_main(args) == 0
    assert open_table(hub, name).dataset.count_rows() == 4


# 7. `arf datahub` refuses a table name its container would read as an option.
@pytest.mark.parametrize("argv", [
    pytest.param(["ingest", "--", "--hub=/tmp/x", "t", "f.parquet"], id="ingest"),
    pytest.param(["describe", "--", "--json"], id="describe"),
    pytest.param(["compact", "--", "-t"], id="compact"),
])
def test_arf_refuses_a_table_name_that_looks_like_an_option(tmp_path: Path, monkeypatch,
                                                           capfd, argv) -> None:
    from arf_training.cli import main as arf_main

    monkeypatch.setenv("ARF_DATAHUB_URI", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert arf_main(["datahub", *argv]) == 2
    err = capfd.readouterr().err
    table = argv[2]
    assert f"arf datahub: error: table name {table!r} starts with '-'" in err
    assert "usage:" not in err
    assert not (tmp_path / "hub").exists()


# 8. A hub path that is a file is named, not read as an empty hub.
def test_a_hub_that_is_a_file_is_named_by_tables(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "passwd"
    blocker.write_text("root:x:0:0\n")
    assert trainer_main(["datahub", "tables", "--hub", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"the data hub {blocker} is not a folder this process can write or read " \
           "(it is a file)" in err
    assert list_summaries(tmp_path / "nothing") == []  # a hub not made yet: no tables
