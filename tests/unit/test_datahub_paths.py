"""Hub folders and table versions that cannot be used as asked: refused up front, by name.

A pinned version whose files a Delta VACUUM removed stays in the Delta log, so opening it
succeeded and the scan failed half-way with a bare `FileNotFoundError: Object at location ...
not found`; a hub path that is a file, or holds a '%', failed with tracebacks or worse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deltalake import DeltaTable
from test_prepare import step_env

from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.seed import seed_demo
from arf_trainer.datahub.tables import open_table, write_table
from arf_trainer.errors import DataHubError


def _vacuum_all_history(table: Path) -> None:
    DeltaTable(str(table)).vacuum(retention_hours=0, enforce_retention_duration=False,
                                  dry_run=False)


def test_a_pinned_vacuumed_version_is_refused_naming_it_and_the_latest(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    seed_demo(hub, episodes=2, seed=0)
    v0 = open_table(hub, "reach_demos", 0).dataset.to_table()
    # An overwrite makes v0's files unreferenced by the latest version; the vacuum deletes them.
    write_table(hub, "reach_demos", v0, mode="overwrite")
    _vacuum_all_history(hub / "reach_demos")
    latest = DeltaTable(str(hub / "reach_demos")).version()

    workspace = tmp_path / "ws"
    with pytest.raises(DataHubError) as caught:
        run_prepare(step_env(workspace, hub, dataset={"tables": {"reach_demos": 0}}))
    message = str(caught.value)
    assert "version 0 of data hub table 'reach_demos'" in message
    assert "VACUUM" in message and f"the latest is {latest}" in message
    assert not (workspace / "prepare" / "manifest.json").exists()

    # The latest version (the same rows, rewritten) still prepares.
    manifest = run_prepare(step_env(tmp_path / "ws2", hub))
    assert manifest["rows"] == 2 * 50
    assert manifest["tables"]["reach_demos"]["version"] == latest


def test_a_hub_path_with_spaces_and_non_ascii_opens(tmp_path: Path) -> None:
    """The file check resolves the scan's own paths (delta-rs's `file_uris` percent-encode
    the folder: checking those would refuse every table under such a path)."""
    hub = tmp_path / "my hub é"
    seed_demo(hub, episodes=1, seed=0)
    assert open_table(hub, "reach_demos").dataset.to_table().num_rows == 50



@pytest.mark.parametrize("command", [
    ["seed"], ["ingest", "t", "DATA"], ["seed-sites", "--site", "a=GOOD", "--site", "b=HUB"],
])
@pytest.mark.parametrize("hub", ["file", "under-a-file"])
def test_a_hub_that_cannot_be_a_folder_is_bad_input_named(tmp_path: Path, command: list[str],
                                                         hub: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    """It was a FileExistsError/NotADirectoryError traceback (exit 1)."""
    from arf_trainer.cli import main as cli_main

    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    where = blocker if hub == "file" else blocker / "hub"
    data = tmp_path / "rows.csv"
    data.write_text("a\n1\n")
    good = tmp_path / "good"
    args = [a.replace("DATA", str(data)).replace("HUB", str(where)).replace("GOOD", str(good))
            for a in command]
    hub_args = [] if command[0] == "seed-sites" else ["--hub", str(where)]
    assert cli_main(["datahub", *args, *hub_args]) == 2
    err = capsys.readouterr().err
    assert f"the data hub {where} is not a folder this process can write" in err
    assert ("it is a file" if hub == "file" else "Not a directory") in err
    assert blocker.read_text() == "not a folder"
    assert not list(good.glob("*/_delta_log"))  # no site was seeded before the bad one


def test_a_hub_path_with_a_percent_sign_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    """delta-rs decoded h%41 as hA: the write committed version 0 under one folder, then failed
    reading it back from the other and reported the table unchanged."""
    import pyarrow as pa

    hub = tmp_path / "h%41b"
    with pytest.raises(DataHubError, match="contains '%'.*Rename the folder"):
        write_table(hub, "t", pa.table({"x": [1.0]}))
    assert not hub.exists()
    with pytest.raises(DataHubError, match="contains '%'"):
        open_table(hub, "t")


def test_a_table_folder_without_a_commit_is_no_table_and_seeding_fills_it(tmp_path: Path) -> None:
    """A create killed before its first commit leaves an empty _delta_log: it was listed as a
    table, seeding skipped it, and reading it said it did not exist while listing it."""
    from arf_trainer.datahub.tables import list_tables

    hub = tmp_path / "hub"
    (hub / "digits" / "_delta_log").mkdir(parents=True)
    assert list_tables(hub) == []
    seed_demo(hub, episodes=1, seed=0)
    assert "digits" in list_tables(hub)
    assert open_table(hub, "digits").dataset.to_table().num_rows == 1797


def test_a_version_past_int64_is_refused_by_name(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    seed_demo(hub, episodes=1, seed=0)
    with pytest.raises(DataHubError, match="99999999999999999999 of table 'reach_demos' is not "
                                           "a valid table version"):
        open_table(hub, "reach_demos", 99999999999999999999)  # was an OverflowError


@pytest.mark.parametrize("version", [None, 0, 7])
def test_a_damaged_commit_file_is_named_with_the_fix(tmp_path: Path, version: int | None) -> None:
    """A commit file someone edited or cut short: every read (seeding, describe, a pinned
    version) was a delta-rs traceback ending in "Json error", or a missing-version message."""
    hub = tmp_path / "hub"
    seed_demo(hub, episodes=1, seed=0)
    log = hub / "reach_demos" / "_delta_log"
    with open(log / "00000000000000000000.json", "a") as handle:
        handle.write("garbage{\n")
    with pytest.raises(DataHubError) as caught:
        open_table(hub, "reach_demos", version)
    message = str(caught.value)
    assert f"the Delta log of data hub table 'reach_demos' ({log}) cannot be read" in message
    assert "restore" in message and "\n" not in message
    with pytest.raises(DataHubError, match="cannot be read"):
        seed_demo(hub, episodes=1, seed=0)


def test_ingest_into_a_table_with_a_damaged_log_is_named(tmp_path: Path) -> None:
    from arf_trainer.datahub.ingest import ingest

    hub = tmp_path / "hub"
    seed_demo(hub, episodes=1, seed=0)
    with open(hub / "digits" / "_delta_log" / "00000000000000000000.json", "a") as handle:
        handle.write("garbage{\n")
    source = tmp_path / "rows.csv"
    source.write_text("a,b\n1,2\n")
    with pytest.raises(DataHubError, match="the Delta log of data hub table 'digits' .* cannot "
                                           "be read"):
        ingest(hub, "digits", [source])
