"""The opt-in workspace janitor: run folders nobody wrote to for the retention time go whole,
live ones, links and what is outside stay. Real folders, ages set with os.utime."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from arf_trainer.dag_run_dir import ASIDE, LOCK, claim, locked
from arf_training import log_janitor, workspace_janitor
from arf_training.errors import ArfError

NOW = time.time()
OLD = NOW - 40 * 86400
RETENTION = NOW - 30 * 86400


def _run(root: Path, name: str, age: float, *, fresh_file: bool = False,
         claimed: bool = True) -> Path:
    """A run folder with a checkpoint and a result, everything last changed at `age`."""
    folder = root / name
    if claimed:
        claim(folder, "2026-10-01T00:00:00+00:00")
    (folder / "train" / "checkpoints").mkdir(parents=True)
    (folder / "train" / "checkpoints" / "step-10.pt").write_bytes(b"x" * 1000)
    (folder / "train" / "result.json").write_text("{}")
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (age, age), follow_symlinks=False)
    if fresh_file:  # deep inside: a training that still writes
        later = folder / "train" / "checkpoints" / "step-20.pt"
        later.write_bytes(b"y")
        os.utime(folder / "train" / "checkpoints", (age, age))
        os.utime(later, (NOW, NOW))
    return folder


def test_only_run_folders_unchanged_for_the_retention_time_go(tmp_path: Path):
    root = tmp_path / "workspace"
    old = _run(root / "digits_smoke", "ci-1", OLD)
    aside = _run(root / "digits_smoke", f"ci-1{ASIDE}20260901T000000", OLD, claimed=False)
    live = _run(root / "digits_smoke", "ci-2", OLD, fresh_file=True)
    recent = _run(root / "reach_bc", "manual__1", NOW - 86400)
    expired = workspace_janitor.sweep(root, RETENTION)
    assert (expired.runs, expired.failed) == (2, 0), expired
    assert expired.bytes >= 2000
    assert not old.exists() and not aside.exists()
    assert live.is_dir() and recent.is_dir()
    assert (root / "digits_smoke").is_dir() and root.is_dir()  # the DAG folders stay
    assert (root / "digits_smoke" / f"ci-1{LOCK}").is_file()  # locks stay (see the module)
    assert not list((root / "digits_smoke").glob(f"*{ASIDE}*{LOCK}"))  # none made for asides
    assert "removed 2 run folders" in str(expired)


def test_links_are_neither_followed_nor_what_they_point_to_removed(tmp_path: Path):
    root, outside = tmp_path / "workspace", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    os.utime(outside, (OLD, OLD))
    run = _run(root / "digits_smoke", "ci-1", OLD)
    (run / "train" / "link-to-outside").symlink_to(outside)
    os.utime(run / "train" / "link-to-outside", (OLD, OLD), follow_symlinks=False)
    os.utime(run / "train", (OLD, OLD))
    (root / "digits_smoke" / "linked-run").symlink_to(outside)
    (root / "linked-dag").symlink_to(outside)
    expired = workspace_janitor.sweep(root, RETENTION)
    assert expired.runs == 1 and not run.exists()
    assert (outside / "precious.txt").read_text() == "keep"
    assert (root / "digits_smoke" / "linked-run").is_symlink()


def test_a_folder_claimed_while_the_janitor_waits_for_its_lock_stays(tmp_path: Path):
    """A step of a DagRun that goes on after the retention time holds the claim lock: the
    janitor waits for it, then finds the folder fresh."""
    root = tmp_path / "workspace"
    run = _run(root / "digits_smoke", "ci-1", OLD)
    done = threading.Event()
    with locked(run):
        worker = threading.Thread(target=lambda: (workspace_janitor.sweep(root, RETENTION),
                                                  done.set()))
        worker.start()
        time.sleep(0.5)
        assert not done.is_set() and run.is_dir()  # waiting for the lock
        (run / "train" / "step.log").write_text("resumed")  # what the step writes meanwhile
    worker.join(10)
    assert done.is_set() and run.is_dir()


def test_a_stopped_sweeps_renamed_folder_goes_on_the_next(tmp_path: Path):
    root = tmp_path / "workspace"
    left = _run(root / "digits_smoke", f"ci-1{workspace_janitor.EXPIRED}", NOW)
    assert workspace_janitor.sweep(root, RETENTION).runs == 1 and not left.exists()
    assert workspace_janitor.sweep(tmp_path / "none", RETENTION).runs == 0  # no run yet


@pytest.mark.parametrize("value", ["-1", "a month", "36501"])
def test_a_bad_retention_is_refused_naming_the_variable(tmp_path: Path, value: str):
    with pytest.raises(ArfError, match=rf"^ARF_WORKSPACE_RETENTION_DAYS='{value}' is not a"):
        log_janitor.component({"AIRFLOW_HOME": str(tmp_path), "ARF_HOME": str(tmp_path),
                               "ARF_WORKSPACE_RETENTION_DAYS": value})


def test_the_stacks_janitor_sweeps_the_workspace_only_when_asked(tmp_path: Path):
    env = {"AIRFLOW_HOME": str(tmp_path / "airflow"), "ARF_HOME": str(tmp_path)}
    assert "--workspace-root" not in log_janitor.component(env).command  # default: forever
    root = tmp_path / "workspace"
    command = log_janitor.component({**env, "ARF_WORKSPACE_RETENTION_DAYS": "30"}).command
    assert command[command.index("--workspace-root") + 1] == str(root)
    assert command[command.index("--workspace-retention-days") + 1] == "30"
    old = _run(root / "digits_smoke", "ci-1", OLD)
    kept = _run(root / "digits_smoke", "ci-2", NOW)
    out = tmp_path / "log-janitor.log"
    # Logs kept forever, workspaces swept: the process sweeps the workspace all the same.
    args = list(command[3:-1])
    args[args.index("--retention-days") + 1] = "0"
    with out.open("wb") as output:
        proc = subprocess.Popen([sys.executable, "-m", "arf_training.log_janitor", *args,
                                 "--every-s", "0.2", str(tmp_path / "airflow" / "logs")],
                                stdout=output, stderr=subprocess.STDOUT)
    try:
        # Its line, written after the removal: a stop between the two would lose the line.
        deadline = time.monotonic() + 30
        while "workspace: removed" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    assert not old.exists() and kept.is_dir()
    text = out.read_text()
    assert "in which nothing changed for 30 days (ARF_WORKSPACE_RETENTION_DAYS)" in text, text
    assert "workspace: removed 1 run folders" in text, text


def test_a_step_that_claims_an_old_folder_makes_it_fresh(tmp_path: Path):
    """A DagRun that goes on after the retention time (a task cleared weeks later): its step's
    claim finds the folder its own and touches the marker under the lock, so the janitor, which
    checks the age under the same lock, keeps it."""
    root = tmp_path / "workspace"
    run = _run(root / "digits_smoke", "ci-1", OLD)
    assert claim(run, "2026-10-01T00:00:00+00:00") is None  # the fast path: its own folder
    assert workspace_janitor.sweep(root, RETENTION).runs == 0 and run.is_dir()
