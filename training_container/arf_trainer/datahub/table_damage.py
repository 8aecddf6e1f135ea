"""Diagnosis of a damaged data hub table: its Delta log or its data files.

A table whose `_delta_log` lost a commit file (or holds one cut short), or whose data files
were deleted from disk, makes delta-rs fail with a raw message (`Generic delta kernel error`,
`Object at location ... not found`, Rust debug dumps such as `ParsedLogPath { ... }`) that says
neither which table nor what to do. The functions here look at the log and the files to name
what is damaged, the versions it costs and the repair (a backup, moving commits aside,
`arf datahub restore` to the newest complete version, or ingesting again), as a
`DamagedTableError` whose one-line `reason` `arf datahub tables` shows beside the table. A
pinned version whose files a VACUUM removed is told apart from files deleted by hand.

`arf_trainer.datahub.tables` calls these when delta-rs cannot open or scan a table; they take
the table's folder, never the hub, so they need nothing from it.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from arf_trainer.errors import DataHubError

# A Delta log's commit files: `<version, 20 digits>.json`; checkpoints `<version>.checkpoint...`.
_COMMIT_FILE = re.compile(r"^(\d{20})\.json\Z")
_CHECKPOINT_FILE = re.compile(r"^(\d{20})\.checkpoint\b")
# Rust debug output delta-rs puts in its messages (`ParsedLogPath { location: FileMeta { ...`).
_RUST_DEBUG = re.compile(r"\s*\b[A-Z]\w* \{.*")


class DamagedTableError(DataHubError):
    """A table whose Delta log or data files are damaged: a commit file or a data file is
    missing, or a commit cannot be parsed. `reason` is the one-line why (what `arf datahub
    tables` shows beside the table); the message adds where and how to repair it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def format_versions(versions: list[int]) -> str:
    """[0, 1, ..., 41, 44, 45] as '0-41, 44, 45' (runs of three or more joined; version lists
    can be long, and a vacuum leaves gaps); 'none' for []."""
    runs: list[list[int]] = []
    for v in versions:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r))
                     for r in runs) or "none"


def _short(exc: Exception) -> str:
    """delta-rs's message in one line: its first (a Rust backtrace follows under
    RUST_BACKTRACE), without the Rust debug dumps some carry (`ParsedLogPath { ... }`)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = _RUST_DEBUG.sub("", first).rstrip(" .:")
    return first if len(first) <= 200 else first[:200] + "..."


def _commit_name(version: int) -> str:
    return f"{version:020d}.json"


def missing_commits(path: Path) -> tuple[list[int], int] | None:
    """(the commit versions missing from the Delta log of the table at `path`, its last
    version), or None when none is missing. Commits before the latest checkpoint are not
    needed (the checkpoint holds their state), so only the ones after it count."""
    try:
        names = [entry.name for entry in (path / "_delta_log").iterdir()]
    except OSError:
        return None
    commits = {int(m[1]) for n in names if (m := _COMMIT_FILE.match(n))}
    checkpoints = [int(m[1]) for n in names if (m := _CHECKPOINT_FILE.match(n))]
    if not commits:
        return None
    first = max(checkpoints) + 1 if checkpoints else 0
    last = max(commits)
    missing = [v for v in range(first, last + 1) if v not in commits]
    return (missing, last) if missing else None


def damaged_log(path: Path, name: str, exc: Exception) -> DamagedTableError:
    """The error for table `name` (at `path`) whose Delta log delta-rs could not read (`exc`):
    a commit file missing (named, with the versions it costs and what recovers them), or else
    one it could not parse."""
    log_dir = path / "_delta_log"
    gap = missing_commits(path)
    where = f"the Delta log of data hub table {name!r} ({log_dir}) cannot be read"
    if gap and gap[0][0] == 0:
        reason = (f"its first commit, {_commit_name(0)} (version 0: the table's columns), is "
                  "missing")
        return DamagedTableError(
            f"{where}: {reason}, so no version of the table can be read. Put that file back "
            "from a backup, or move the table's folder aside and ingest the table again",
            reason)
    if gap:
        (first, *more), last = gap
        files = ", ".join(_commit_name(v) for v in (first, *more)[:3]) + (
            " ..." if len(more) > 2 else "")
        reason = (f"commit file{'s' if more else ''} {files} (version{'s' if more else ''} "
                  f"{format_versions([first, *more])}) missing: versions "
                  f"{format_versions(list(range(first, last + 1)))} cannot be read")
        return DamagedTableError(
            f"{where}: {reason}. Put the missing file{'s' if more else ''} back from a backup. "
            f"Without one, moving the commit files after version {first - 1} "
            f"({_commit_name(first + 1)} ...) out of {log_dir} makes version {first - 1} the "
            f"latest again (the rows versions {format_versions(list(range(first, last + 1)))} "
            "wrote are then left out); `arf datahub restore` cannot help while the latest "
            "version cannot be read", reason)
    reason = f"a commit file cannot be read ({_short(exc)})"
    return DamagedTableError(
        f"{where}: {_short(exc)}. A commit file there is damaged (edited, or cut short by a "
        "full disk); restore the table's folder from a backup, or move it aside and ingest "
        "(or seed) the table again", reason)

def files_gone(path: Path, name: str, version: int, files: list[str], *,
               while_reading: bool = False) -> DataHubError | None:
    """The error naming why some of `files` (the data files of `version` of table `name`, at
    `path`, relative to that folder) are gone, or None while every file is there: the VACUUM
    that removed them when the log records one after that version (one never removes the
    latest version's files), or else files deleted from disk by hand (a `DamagedTableError`
    naming the newest version still complete). `while_reading`: the files went while a query
    read the version."""
    missing = [f for f in files if not (path / f).is_file()]
    if not missing:
        return None
    what = (f"version {version} of data hub table {name!r} refers to data files that no "
            f"longer exist ({len(missing)} missing, e.g. {Path(missing[0]).name})")
    try:
        latest = DeltaTable(str(path))
        history = latest.history()
        latest_files = {unquote(p) for p in
                        latest.get_add_actions(flatten=True).column("path").to_pylist()}
    except DeltaError as exc:
        raise damaged_log(path, name, exc) from exc
    vacuums = [e for e in history if str(e.get("operation", "")).startswith("VACUUM")
               and int(e.get("version", -1)) > version]
    if vacuums and not latest_files.intersection(missing):
        when = "removed them while this run read the version" if while_reading else \
            "removed them"
        return DataHubError(
            f"{what}: a VACUUM of the table {when}. Pin a version written after the vacuum "
            f"(the latest is {latest.version()}), or drop the pin to read the latest")
    return DamagedTableError(
        f"{what} in {path}: they were deleted from disk, not by a VACUUM (the log records "
        f"none that could have removed them). {_recovery(path, name, int(latest.version()))}",
        f"{len(missing)} data file{'s' if len(missing) != 1 else ''} of version {version} "
        f"missing from disk (e.g. {Path(missing[0]).name})")


def _recovery(path: Path, name: str, latest: int, look_back: int = 200) -> str:
    """How to get table `name` readable again when data files are gone from disk: the newest
    version whose files are all there (of the last `look_back`), to read or restore."""
    def complete(table: DeltaTable) -> bool:
        adds = table.get_add_actions(flatten=True).column("path").to_pylist()
        return all((path / unquote(p)).is_file() for p in adds)

    backup = "Put the files back from a backup"
    try:
        table = DeltaTable(str(path))
        if complete(table):
            return f"{backup}, or read the latest version ({latest}), whose files are all there"
        for version in range(latest - 1, max(-1, latest - 1 - look_back), -1):
            table.load_as_version(version)
            if complete(table):
                return (f"{backup}, or make version {version}, the newest whose files are all "
                        f"there, the latest again with `arf datahub restore {name} --version "
                        f"{version}` (versions after it stay in the history)")
    except DeltaError:
        pass
    return (f"{backup}; no recent version has all its files, so failing a backup move the "
            "table's folder aside and ingest the table again")
