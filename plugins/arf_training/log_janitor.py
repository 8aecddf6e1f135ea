"""The log janitor of `arf up`: deletes Airflow's own old log files, as Airflow's image does.

Airflow never deletes a log file it wrote: one per task try
(`dag_id=.../run_id=.../task_id=.../attempt=N.log`) and, in 3.x, one per DAG file and day of
parsing (`dag_processor/<date>/<bundle>/<file>.log`, about 3 MB a day here, whatever
`dag_processor_log_target` says). Its answer lies outside Airflow: the official image's
`clean-logs` (the Helm chart's log groomer) deletes the `*.log` files older than
`AIRFLOW__LOG_RETENTION_DAYS` (15) every 15 minutes, then the empty folders. This is that, for
the embedded stack, as one more supervised component (`python -m arf_training.log_janitor`):

1. What goes: regular files named `*.log` under `<AIRFLOW_HOME>/logs` last modified more than
   `ARF_LOG_RETENTION_DAYS` days ago (0 keeps them forever: the janitor then only waits for its
   stop), then the folders that are left empty. A log still being written is fresh, so it stays.
2. Nothing outside the root: the walk goes through folder descriptors, each subfolder opened
   with `O_NOFOLLOW` relative to its parent's, and removes by name relative to that descriptor
   (`unlinkat`), so a symbolic link is neither followed nor deleted (what it points to is not
   ours, wherever it is), not even one swapped in for a folder during the sweep, whose
   path-based check-then-open would follow it. The root stays, even when empty (it may itself
   be a link, to a bigger disk: it is the folder given), and so does a mounted volume's
   `lost+found`. The walk stops `MAX_DEPTH` folders down: a descriptor per level stays open,
   and no recursion can overflow.
3. Races with Airflow are the normal case, not errors: what vanishes between the listing and the
   removal (Airflow deleting, a folder removed by hand) is skipped, and a folder is removed only
   if nothing was added to it for `SETTLED_S` (its time as this sweep found it), since Airflow
   creates a task's folder and then its file, and a folder removed in between would fail that
   task's log.
4. Cheap: one listing per folder and a `stat` per `*.log` file, never a file's contents, at a
   lower CPU and disk priority than the stack (nice 10).
5. SIGTERM or SIGINT stops it at once, mid-sweep too, with exit code 0: each removal is whole on
   its own, so a sweep cut short leaves nothing half-done, and the next one finishes its work.

One line per sweep in its output (the supervisor's `log-janitor.log`): what was removed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arf_training import workspace_janitor
from arf_training.logrotate import LogLimits
from arf_training.supervisor import Component

EVERY_S = 15 * 60.0  # as often as Airflow's log groomer
# Where Airflow writes its logs when a user moves them. Not swept: a mistaken value would aim
# the deletion at another folder; the janitor says so instead.
BASE_LOG_FOLDER = "AIRFLOW__LOGGING__BASE_LOG_FOLDER"
SETTLED_S = 5 * 60.0
DAY_S = 24 * 3600
# Airflow's deepest: dag_id=/run_id=/task_id=/map_index=/attempt=N.log, or dag_processor/<date>/
# <bundle>/ and the DAG file's own folders. Deeper is not Airflow's: kept, and not walked.
MAX_DEPTH = 32
_SUBFOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# Not ours to remove, or not a folder any more: something arrived meanwhile, a mount point,
# a link or a file swapped in for the folder since the listing.
_KEEP_FOLDER = {errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY, errno.ENOTDIR, errno.ELOOP}


def component(env: dict[str, str]) -> Component:
    """The stack's janitor for the Airflow of `env` (the stack's environment; a bad
    `ARF_LOG_RETENTION_DAYS` in it raises `ArfError`). Its own environment is the caller's: it
    needs none of the stack's secrets (metadata database URI, JWT secret) that `env` adds.
    Ready once started: nothing waits for it."""
    days = LogLimits.from_env(env).retention_days
    root = Path(env["AIRFLOW_HOME"]) / "logs"
    command = [sys.executable, "-m", "arf_training.log_janitor", "--retention-days", str(days)]
    elsewhere = env.get(BASE_LOG_FOLDER)
    if elsewhere and Path(elsewhere).resolve() != root.resolve():
        command += ["--not-swept", elsewhere]
    workspace_days = workspace_janitor.retention_days(env)
    if workspace_days:
        command += ["--workspace-root", str(workspace_janitor.workspace_root(env)),
                    "--workspace-retention-days", str(workspace_days)]
    return Component("log-janitor", [*command, str(root)], dict(os.environ), ready=lambda: True)


@dataclass
class Swept(workspace_janitor.Removals):
    """What one sweep of the logs removed, and what it could not."""

    files: int = 0
    folders: int = 0

    def __str__(self) -> str:
        return (f"removed {self.files} log files ({self.bytes} bytes, "
                f"{self.bytes / 1024 ** 2:.1f} MiB) and {self.folders} empty folders"
                + self.failures())


@dataclass
class _Sweep:
    """One sweep's settings and tally, handed down the walk."""

    older_than: float
    settled: float
    stop: Callable[[], bool]
    swept: Swept


def sweep(root: Path, older_than: float, *, stop: Callable[[], bool] = lambda: False,
          settled: float | None = None) -> Swept:
    """Delete the `*.log` files under `root` last modified before `older_than` (epoch
    seconds), then the folders left empty that nothing was added to since `settled` (default:
    `SETTLED_S` ago). `stop` is asked before each entry; when it says so, the sweep ends there."""
    run = _Sweep(older_than, time.time() - SETTLED_S if settled is None else settled, stop,
                 Swept())
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return run.swept  # Airflow has written no log yet
    except OSError as exc:
        run.swept.fail(exc)
        return run.swept
    try:
        _sweep_folder(fd, run, MAX_DEPTH)
    finally:
        os.close(fd)
    return run.swept


def _sweep_folder(fd: int, run: _Sweep, depth: int) -> bool:
    """Sweep the folder open as `fd`; whether it is empty afterwards. Its listing is read whole
    first, so that no listing stays open while the subfolders are swept."""
    try:
        with os.scandir(fd) as listing:
            entries = list(listing)
    except OSError as exc:
        run.swept.fail(exc)
        return False
    kept = 0
    for entry in entries:
        if run.stop():
            return False
        try:
            kept += not _sweep_entry(fd, entry, run, depth)
        except FileNotFoundError:
            pass  # vanished since the listing: what we meant to do is done
        except OSError as exc:
            run.swept.fail(exc)
            kept += 1
    return kept == 0


def _sweep_entry(fd: int, entry: os.DirEntry, run: _Sweep, depth: int) -> bool:
    """Remove one entry of the folder `fd` if it is due; whether it is gone."""
    if entry.is_dir(follow_symlinks=False):
        return _sweep_subfolder(fd, entry.name, run, depth)
    if not (entry.name.endswith(".log") and entry.is_file(follow_symlinks=False)):
        return False  # a symbolic link (or anything else) is not ours to delete
    st = entry.stat(follow_symlinks=False)
    if st.st_mtime >= run.older_than:
        return False
    os.unlink(entry.name, dir_fd=fd)  # by name in `fd`: a link in the path is never followed
    run.swept.files += 1
    run.swept.bytes += st.st_size
    return True


def _sweep_subfolder(fd: int, name: str, run: _Sweep, depth: int) -> bool:
    if name == "lost+found" or depth <= 0:
        return False
    try:
        sub = os.open(name, _SUBFOLDER, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or a file since the listing
            return False
        raise
    try:
        # Its time before this sweep's removals change it: whether anyone else just added to it.
        changed = os.fstat(sub).st_mtime
        empty = _sweep_folder(sub, run, depth - 1)
    finally:
        os.close(sub)
    if not empty or changed >= run.settled:
        return False
    try:
        os.rmdir(name, dir_fd=fd)  # by name too: a link swapped in fails (ENOTDIR)
    except OSError as exc:
        if exc.errno in _KEEP_FOLDER:
            return False
        raise
    run.swept.folders += 1
    return True


class _Stopped(BaseException):
    """Raised by the SIGTERM/SIGINT handler; a BaseException so that no `except OSError` or
    `except Exception` on its way up mistakes it for a failed removal."""


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} log-janitor: {message}", flush=True)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m arf_training.log_janitor",
                                     description="delete Airflow's old log files, periodically")
    parser.add_argument("root", type=Path, help="Airflow's log folder (kept, even when empty)")
    parser.add_argument("--retention-days", type=int, required=True,
                        help="delete *.log files older than this; 0 keeps them forever")
    parser.add_argument("--every-s", type=float, default=EVERY_S, help="seconds between sweeps")
    parser.add_argument("--workspace-root", type=Path, help="also delete the run folders here "
                        "unchanged for --workspace-retention-days (arf_training.workspace_janitor)")
    parser.add_argument("--workspace-retention-days", type=int, default=0)
    parser.add_argument("--not-swept", type=Path, help=f"the folder {BASE_LOG_FOLDER} names, "
                        "which this janitor leaves alone (said once at its start)")
    args = parser.parse_args(argv)
    if args.retention_days < 0:
        parser.error("--retention-days must be 0 (keep forever) or more")
    if not args.every_s > 0:
        parser.error("--every-s must be more than 0")
    if args.workspace_root and args.workspace_retention_days <= 0:
        parser.error("--workspace-root needs --workspace-retention-days of 1 or more")
    return args


def _announce(args: argparse.Namespace) -> None:
    if args.retention_days:
        _say(f"every {args.every_s:g} s: deleting the *.log files under {args.root} older "
             f"than {args.retention_days} days, then the folders left empty")
    else:
        _say(f"ARF_LOG_RETENTION_DAYS=0: the log files under {args.root} are kept forever")
    if args.workspace_root:
        _say(f"every {args.every_s:g} s: deleting the run folders under {args.workspace_root} "
             f"in which nothing changed for {args.workspace_retention_days} days "
             f"({workspace_janitor.RETENTION_ENV})")


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    stopping: list[int] = []

    def stop(signum: int, _frame) -> None:
        if not stopping:  # once: a second signal must not interrupt the goodbye
            stopping.append(signum)
            raise _Stopped(signal.Signals(signum).name)

    try:  # the handlers inside: a signal right after the first one is installed is caught too
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if args.not_swept:
            _say(f"WARNING: Airflow writes its logs to {args.not_swept} ({BASE_LOG_FOLDER}), "
                 f"which this janitor does not clean: it deletes only under {args.root}, so "
                 "that a mistaken value cannot aim it at another folder. Bound that folder "
                 f"with your own tool, or unset {BASE_LOG_FOLDER} to keep the logs in "
                 f"{args.root}")
        with contextlib.suppress(OSError):
            os.nice(10)  # the stack first: a sweep of a large tree is never urgent
        _announce(args)
        while True:
            if args.retention_days:
                started = time.monotonic()
                swept = sweep(args.root, time.time() - args.retention_days * DAY_S)
                _say(f"{swept} in {time.monotonic() - started:.1f} s")
            if args.workspace_root:
                started = time.monotonic()
                expired = workspace_janitor.sweep(
                    args.workspace_root, time.time() - args.workspace_retention_days * DAY_S)
                _say(f"workspace: {expired} in {time.monotonic() - started:.1f} s")
            time.sleep(args.every_s if args.retention_days or args.workspace_root else 3600)
    except _Stopped as signame:
        _say(f"{signame} received: stopped")
        return 0


if __name__ == "__main__":
    sys.exit(main())
