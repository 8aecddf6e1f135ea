"""The log janitor of `arf up` on real trees and as a real process: only old `*.log` files and
the folders they leave empty go; links, their targets, the root, `lost+found` and a folder
just made stay; what vanishes mid-sweep is no error; SIGTERM stops it at once with exit 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_supervisor import _wait

from arf_training import log_janitor
from arf_training.errors import ArfError
from arf_training.log_janitor import Swept, sweep
from arf_training.supervisor import Supervisor

NOW = time.time()
OLD = NOW - 20 * 86400  # past the default 15 days
CUTOFF = NOW - 15 * 86400


def _file(path: Path, when: float, text: str = "a log line\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (when, when))
    return path


def _age_folders(root: Path, when: float = OLD) -> None:
    """Every folder under `root` (links not followed) last changed at `when`."""
    for folder, _subfolders, _files in os.walk(root):
        os.utime(folder, (when, when))  # its parent's time does not change


def _tree(root: Path) -> set[str]:
    """What is under `root`, links listed but not followed."""
    return {os.path.relpath(os.path.join(folder, name), root)
            for folder, subfolders, files in os.walk(root) for name in subfolders + files}


@pytest.fixture
def outside(tmp_path) -> Path:
    """Old log files outside the root, which links inside it point at."""
    _file(tmp_path / "outside" / "target.log", OLD)
    _file(tmp_path / "outside" / "folder" / "inner.log", OLD)
    return tmp_path / "outside"


def test_a_sweep_deletes_old_log_files_and_the_folders_left_empty_nothing_else(tmp_path,
                                                                               outside):
    root = tmp_path / "logs"
    old_task = _file(root / "dag_id=d" / "run_id=old" / "task_id=t" / "attempt=1.log", OLD,
                     "x" * 1000)
    _file(root / "dag_id=d" / "run_id=new" / "task_id=t" / "attempt=1.log", NOW)
    parsed = _file(root / "dag_processor" / "2020-01-01" / "dags-folder" / "a.py.log", OLD, "yy")
    _file(root / "notes.txt", OLD)
    _file(root / "scheduler.log.1", OLD)
    (root / "lost+found").mkdir()
    (root / "gone-empty").mkdir()
    (root / "link.log").symlink_to(outside / "target.log")
    (root / "dag_id=d" / "linked-folder").symlink_to(outside / "folder")
    os.utime(root / "link.log", (OLD, OLD), follow_symlinks=False)
    _age_folders(root)
    (root / "just-made").mkdir()  # empty, but Airflow may be about to write into it

    swept = sweep(root, CUTOFF)

    assert (swept.files, swept.bytes, swept.failed) == (2, 1002, 0), swept
    assert not old_task.parent.exists() and not parsed.exists()
    # gone-empty, run_id=old/task_id=t and dag_processor/2020-01-01/dags-folder: the folders
    # that this sweep emptied too, since their time was old before it.
    assert swept.folders == 6
    assert _tree(root) == {
        "dag_id=d", "dag_id=d/run_id=new", "dag_id=d/run_id=new/task_id=t",
        "dag_id=d/run_id=new/task_id=t/attempt=1.log", "dag_id=d/linked-folder",
        "notes.txt", "scheduler.log.1", "lost+found", "link.log", "just-made"}
    assert (root / "link.log").is_symlink() and (root / "dag_id=d" / "linked-folder").is_symlink()
    assert _tree(outside) == {"target.log", "folder", "folder/inner.log"}
    assert "removed 2 log files (1002 bytes" in str(swept) and "could not" not in str(swept)


def test_the_root_stays_when_empty_and_a_missing_root_is_no_error(tmp_path):
    root = tmp_path / "logs"
    _file(root / "dag_id=d" / "attempt=1.log", OLD)
    _age_folders(tmp_path)
    swept = sweep(root, CUTOFF)
    assert (swept.files, swept.folders) == (1, 1)
    assert root.is_dir() and not any(root.iterdir())
    assert sweep(root, CUTOFF) == Swept() and root.is_dir()
    assert sweep(tmp_path / "no-logs-yet", CUTOFF) == Swept()


def test_a_folder_emptied_now_goes_only_if_nothing_was_added_to_it_lately(tmp_path):
    root = tmp_path / "logs"
    _file(root / "settled" / "attempt=1.log", OLD)
    _file(root / "busy" / "attempt=1.log", OLD)
    _age_folders(root)
    # A file was just added (and removed) there. Now, not NOW: the module's NOW is taken at
    # collection, more than SETTLED_S before this test runs in a full suite.
    now = time.time()
    os.utime(root / "busy", (now, now))
    swept = sweep(root, CUTOFF)
    assert (swept.files, swept.folders) == (2, 1)
    assert _tree(root) == {"busy"}
    # Once it has settled, the next sweep removes it.
    assert sweep(root, CUTOFF, settled=time.time() + 1).folders == 1 and _tree(root) == set()


def test_what_vanishes_or_turns_into_a_link_mid_sweep_is_skipped(tmp_path, outside):
    """Between the listing and the removal: a file and a folder deleted by someone else are
    no error, and a folder swapped for a link to outside is not followed (a path-based walk
    would delete the old log it points at)."""
    root = tmp_path / "logs"
    _file(root / "a-vanishing.log", OLD)
    _file(root / "b-vanishing-folder" / "attempt=1.log", OLD)
    _file(root / "c-swapped" / "attempt=1.log", OLD)
    _file(root / "d-stays" / "attempt=1.log", OLD)
    _age_folders(root)
    calls = []

    def meanwhile() -> bool:
        if not calls:  # asked before the root's first entry: its listing is read already
            (root / "a-vanishing.log").unlink()
            shutil.rmtree(root / "b-vanishing-folder")
            shutil.rmtree(root / "c-swapped")
            (root / "c-swapped").symlink_to(outside / "folder")
        calls.append(1)
        return False

    swept = sweep(root, CUTOFF, stop=meanwhile)
    assert swept.failed == 0, swept
    assert (swept.files, swept.folders) == (1, 1)
    assert _tree(root) == {"c-swapped"} and (root / "c-swapped").is_symlink()
    assert _tree(outside) == {"target.log", "folder", "folder/inner.log"}


def test_a_stopped_sweep_ends_there_and_the_next_one_finishes(tmp_path):
    root = tmp_path / "logs"
    for n in range(5):
        _file(root / f"attempt={n}.log", OLD)
    asked = []
    first = sweep(root, CUTOFF, stop=lambda: asked.append(1) or len(asked) > 2)
    assert first.files == 2 and len(list(root.iterdir())) == 3
    assert sweep(root, CUTOFF).files == 3 and not any(root.iterdir())


def test_folders_deeper_than_airflow_writes_are_not_walked(tmp_path, monkeypatch):
    monkeypatch.setattr(log_janitor, "MAX_DEPTH", 2)
    root = tmp_path / "logs"
    _file(root / "a" / "b" / "kept" / "deep.log", OLD)
    _file(root / "a" / "b" / "shallow.log", OLD)
    _age_folders(root)
    assert sweep(root, CUTOFF).files == 1
    assert _tree(root) == {"a", "a/b", "a/b/kept", "a/b/kept/deep.log"}


def _start(root: Path, out: Path, *args: str) -> subprocess.Popen:
    with out.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "arf_training.log_janitor", str(root), *args],
            stdout=output, stderr=subprocess.STDOUT, cwd=out.parent, env=dict(os.environ))


def _stop(proc: subprocess.Popen, out: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait(timeout=5) == 0, out.read_text()
    assert time.monotonic() - started < 3, "SIGTERM did not stop it at once"
    text = out.read_text()
    assert "SIGTERM received: stopped" in text and "Traceback" not in text, text
    return text


def test_the_janitor_process_sweeps_periodically_and_stops_on_sigterm_with_exit_0(tmp_path):
    root = tmp_path / "logs"
    first = _file(root / "dag_id=d" / "attempt=1.log", OLD)
    fresh = _file(root / "dag_id=d" / "attempt=2.log", NOW)
    out = tmp_path / "log-janitor.log"
    proc = _start(root, out, "--retention-days", "15", "--every-s", "0.2")
    try:
        _wait("the first sweep", lambda: not first.exists(), timeout=20)
        second = _file(root / "dag_processor" / "old.py.log", OLD)
        _wait("a later sweep", lambda: not second.exists())
        assert fresh.exists()
        text = _stop(proc, out)
    finally:
        proc.kill()
        proc.wait()
    assert "deleting the *.log files under" in text and "older than 15 days" in text
    assert "removed 1 log files" in text


def test_retention_0_keeps_every_log_and_still_stops_on_sigterm(tmp_path):
    root = tmp_path / "logs"
    old = _file(root / "attempt=1.log", OLD)
    out = tmp_path / "log-janitor.log"
    proc = _start(root, out, "--retention-days", "0", "--every-s", "0.2")
    try:
        _wait("its start line", lambda: "kept forever" in out.read_text(), timeout=20)
        time.sleep(0.5)
        assert old.exists()
        _stop(proc, out)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("args", [
    pytest.param(["--retention-days", "-1"], id="negative-days"),
    pytest.param(["--retention-days", "15", "--every-s", "0"], id="no-interval"),
])
def test_bad_arguments_are_refused(tmp_path, args):
    with pytest.raises(SystemExit) as exc:
        log_janitor.main([str(tmp_path), *args])
    assert exc.value.code == 2


def test_under_the_supervisor_it_starts_ready_logs_and_stops_cleanly(tmp_path, monkeypatch):
    """The stack's component as `arf up` runs it: its retention from the stack's environment,
    Airflow's log folder as the root, and the supervisor's stop ends it with its goodbye."""
    home = tmp_path / "airflow"
    _file(home / "logs" / "dag_id=d" / "attempt=1.log", OLD)
    _file(home / "logs" / "dag_id=d" / "attempt=2.log", NOW - 10 * 86400)  # past 5 days
    _age_folders(home / "logs")
    comp = log_janitor.component({"AIRFLOW_HOME": str(home), "ARF_LOG_RETENTION_DAYS": "5"})
    assert comp.command[-3:] == ["--retention-days", "5", str(home / "logs")]
    run = tmp_path / "run"
    run.mkdir()
    sup = Supervisor([comp], run, grace_s=5, log=lambda _line: None)
    try:
        assert sup.start_all()
        _wait("the first sweep", lambda: not (home / "logs" / "dag_id=d").exists(), timeout=20)
    finally:
        sup.stop_all()
    assert (home / "logs").is_dir()
    text = (run / "log-janitor.log").read_text()
    assert "older than 5 days" in text and "SIGTERM received: stopped" in text, text


@pytest.mark.parametrize("value", ["-1", "two weeks", "1.5", "36501"])
def test_a_bad_retention_is_refused_naming_the_variable(tmp_path, value):
    with pytest.raises(ArfError, match=rf"^ARF_LOG_RETENTION_DAYS='{value}' is not a number"):
        log_janitor.component({"AIRFLOW_HOME": str(tmp_path), "ARF_LOG_RETENTION_DAYS": value})


def test_logs_moved_by_base_log_folder_are_named_not_swept(tmp_path):
    """AIRFLOW__LOGGING__BASE_LOG_FOLDER moves Airflow's logs: the janitor says at its start that
    it leaves that folder alone (a mistaken value must not aim deletion elsewhere)."""
    home, moved = tmp_path / "airflow", tmp_path / "elsewhere"
    old = _file(moved / "dag_id=d" / "attempt=1.log", OLD)
    comp = log_janitor.component({"AIRFLOW_HOME": str(home), "ARF_LOG_RETENTION_DAYS": "5",
                                  log_janitor.BASE_LOG_FOLDER: str(moved)})
    assert comp.command[-5:] == ["--retention-days", "5", "--not-swept", str(moved),
                                 str(home / "logs")]
    same = log_janitor.component({"AIRFLOW_HOME": str(home), "ARF_LOG_RETENTION_DAYS": "5",
                                  log_janitor.BASE_LOG_FOLDER: str(home / "logs") + "/"})
    assert "--not-swept" not in same.command
    out = tmp_path / "log-janitor.log"
    proc = _start(home / "logs", out, "--retention-days", "5", "--not-swept", str(moved),
                  "--every-s", "0.2")
    try:
        _wait("its first sweep", lambda: "removed 0 log files" in out.read_text(), timeout=20)
        text = _stop(proc, out)
    finally:
        proc.kill()
        proc.wait()
    assert old.exists()
    assert f"Airflow writes its logs to {moved} (AIRFLOW__LOGGING__BASE_LOG_FOLDER), which " \
           "this janitor does not clean" in text, text
