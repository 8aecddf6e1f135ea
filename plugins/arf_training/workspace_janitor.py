"""The workspace janitor of `arf up` (opt-in): deletes the run folders nobody wrote to for
`ARF_WORKSPACE_RETENTION_DAYS` days.

A run's folder (`<workspace root>/<dag_id>/<run_id>/`: prepared shards, checkpoints, outputs,
step results) is what the retries and clears of its DagRun continue from. Nothing reads it once
the DagRun is over: the model, its lineage and the data's table versions are in MLflow and the
data hub, from which `arf training reproduce` re-runs it. Kept forever, the folders grow with
every run (a nightly fine-tune of a pixel policy adds its shards and checkpoints each night).

With `ARF_WORKSPACE_RETENTION_DAYS=N` (0, the default, keeps them forever) the log janitor also
sweeps the workspace root, as often as it sweeps the logs:

1. What goes: a run folder, or one a re-triggered run set aside (`arf_trainer.dag_run_dir`), in
   which nothing was modified for N days: its age is the newest modification time of the folder
   and of everything in it, links not followed. A training writes checkpoints, so a running
   DagRun is fresh; one that waits longer than N days and then goes on (a task cleared weeks
   later) starts that task's work afresh, with the same result from the same data. The claim
   locks (`<run_id>%claim`, empty files) stay: deleting a lock file that a step may be opening
   would let two steps hold "the" lock.
2. Never half a run and never a live one: the folder is taken under its claim lock, held
   exclusively (a step's claim, which touches the folder's marker under the lock, waits or has
   made it fresh), its age checked again, then renamed to `<name>%expired` (nothing writes
   into a run folder under that name) and deleted with `shutil.rmtree`, which follows no link
   and removes the link itself only. A link where a run or DAG folder belongs is left alone. An
   `%expired` folder left by a sweep that was stopped goes on the next one.
3. The root and the DAG folders stay.

On Kubernetes the workspace is a volume no stack process sees: a CronJob sweeps it once a day
(`helm_values/workspace-janitor.yaml`) with this module's one-shot command,
`python -m arf_training.workspace_janitor ROOT --retention-days N`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from arf_training.logrotate import MAX_RETENTION_DAYS, whole_setting

RETENTION_ENV = "ARF_WORKSPACE_RETENTION_DAYS"
EXPIRED = "%expired"  # `%` + lowercase: no run id's folder (stepspec._safe) is named so


def retention_days(env: dict[str, str]) -> int:
    """`ARF_WORKSPACE_RETENTION_DAYS` (0: forever, the default); `ArfError` for a bad one."""
    return whole_setting(env.get(RETENTION_ENV), RETENTION_ENV,
                         "a number of days to keep the run folders nobody writes to", 0, 0,
                         MAX_RETENTION_DAYS, f" (keep them forever) to {MAX_RETENTION_DAYS}, "
                         "e.g. 30")


def workspace_root(env: dict[str, str]) -> Path:
    return Path(env.get("ARF_WORKSPACE_ROOT") or Path(env["ARF_HOME"]) / "workspace")


@dataclass
class Removals:
    """What a sweep could not remove (its subclasses count what it did), for its log line."""

    bytes: int = 0
    failed: int = 0
    first_error: str = ""

    def fail(self, exc: OSError) -> None:
        self.failed += 1
        self.first_error = self.first_error or str(exc)

    def failures(self) -> str:
        return (f"; {self.failed} could not be removed, the first: {self.first_error}"
                if self.failed else "")


@dataclass
class Expired(Removals):
    """What one workspace sweep removed, and what it could not."""

    runs: int = 0

    def __str__(self) -> str:
        return (f"removed {self.runs} run folders unchanged for the retention time "
                f"({self.bytes / 1024 ** 2:.1f} MiB)" + self.failures())


def sweep(root: Path, older_than: float, *,
          stop: Callable[[], bool] = lambda: False) -> Expired:
    """Delete the run folders under `root` in which nothing changed since `older_than` (epoch
    seconds). `stop` is asked before each run folder."""
    expired = Expired()
    for dag in _folders(root):
        for entry in sorted(dag.iterdir()):
            if stop():
                return expired
            try:
                _sweep_entry(entry, older_than, expired)
            except FileNotFoundError:
                pass  # gone since the listing
            except OSError as exc:
                expired.fail(exc)
    return expired


def _sweep_entry(entry: Path, older_than: float, expired: Expired) -> None:
    if entry.name.endswith(EXPIRED) and not entry.is_symlink():
        _remove(entry, expired)  # a sweep stopped between its rename and its removal
    elif entry.is_dir() and not entry.is_symlink() and _newest(entry) < older_than:
        from arf_trainer.dag_run_dir import ASIDE, locked  # stdlib only

        gone = entry.with_name(entry.name + EXPIRED)
        if ASIDE in entry.name:  # set aside: no step claims it any more
            os.rename(entry, gone)
        else:
            with locked(entry):  # the steps' claim lock: a step going on keeps its folder
                if _newest(entry) >= older_than:
                    return  # a step claimed it meanwhile
                os.rename(entry, gone)
        _remove(gone, expired)


def _remove(folder: Path, expired: Expired) -> None:
    size = sum(st.st_size for st in _stats(folder))
    shutil.rmtree(folder)
    expired.runs += 1
    expired.bytes += size


def _newest(folder: Path) -> float:
    return max(st.st_mtime for st in _stats(folder))


def _stats(folder: Path) -> Iterator[os.stat_result]:
    """The stat of `folder` and of everything in it, links not followed (a link's own)."""
    pending = [folder]
    yield folder.lstat()
    while pending:
        with os.scandir(pending.pop()) as listing:
            for item in listing:
                yield item.stat(follow_symlinks=False)
                if item.is_dir(follow_symlinks=False):
                    pending.append(Path(item.path))


def _folders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []  # no run yet


def main(argv: list[str] | None = None) -> int:
    """One sweep of a workspace root (the Kubernetes CronJob's command): exit 0, or 1 when a
    folder could not be removed (the Job then shows failed; the next run tries again)."""
    parser = argparse.ArgumentParser(
        prog="python -m arf_training.workspace_janitor",
        description="delete the run folders under ROOT in which nothing changed for "
                    "--retention-days days (one sweep)")
    parser.add_argument("root", type=Path, help="the run workspace root (ARF_WORKSPACE_ROOT)")
    parser.add_argument("--retention-days", type=int, required=True,
                        help=f"1 to {MAX_RETENTION_DAYS}")
    args = parser.parse_args(argv)
    if not 1 <= args.retention_days <= MAX_RETENTION_DAYS:
        parser.error(f"--retention-days must be 1 to {MAX_RETENTION_DAYS} days, not "
                     f"{args.retention_days}; to keep every run folder, do not run the janitor")
    if args.root.exists() and not args.root.is_dir():
        parser.error(f"{args.root} is not a folder: give the run workspace root, as mounted "
                     "(e.g. /workspace/runs, ARF_WORKSPACE_ROOT)")
    started = time.monotonic()
    expired = sweep(args.root, time.time() - args.retention_days * 24 * 3600)
    found = "" if args.root.exists() else " (it does not exist: no run has written there yet)"
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} workspace-janitor: {args.root}{found}: "
          f"{expired} in {time.monotonic() - started:.1f} s", flush=True)
    return 1 if expired.failed else 0


if __name__ == "__main__":
    sys.exit(main())
