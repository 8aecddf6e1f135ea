"""Table maintenance: compaction (Delta OPTIMIZE), VACUUM and RESTORE of data hub tables.

Every append (an ingest, an evaluation recording its failures, a nightly correction) adds small
files and a log entry, and an overwrite leaves the replaced files on disk. `compact` rewrites
the latest version's small files into fewer large ones as a new version (every older version
stays readable); `vacuum` deletes the files that no version of the last `retain_days` days
uses, which makes the older versions unreadable for good, and the stored videos no row names any
more (`video_gc`); `restore` makes an older version's
rows the latest again, as a new version (undoing a bad ingest without losing it).

All three hold the table's writers' lock (`tables.table_lock`, the one the failure tables'
appends hold), so a read-check-append never interleaves with them. `arf datahub ingest` takes no
lock: delta-rs's commit check lets its blind append and a compaction both land.

The failure loop's own appends (one small file per evaluation or night) compact as they go:
`compact_if_fragmented`, called by an appender that already holds the lock, compacts once the
latest version has `SMALL_FILES` small files, as Delta's auto-compaction does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import DeltaError

from arf_trainer.datahub import video_gc
from arf_trainer.datahub.tables import (format_versions, latest_table, open_table, table_lock,
                                       table_path, table_versions)
from arf_trainer.errors import DataHubError

MAX_RETAIN_DAYS = 36500
MAX_TARGET_SIZE_MB = 10240
_DAY_MS = 86_400_000
# Delta's auto-compaction threshold (delta.autoOptimize's minNumFiles, 50 files); "small" as
# `arf datahub describe` counts it when it advises a compaction.
SMALL_FILES, SMALL_FILE_BYTES = 50, 16 * 2**20

log = logging.getLogger(__name__)


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _snapshot(table: DeltaTable) -> tuple[int, int, int]:
    """(files, rows, bytes) of the version `table` is at, from the log's add actions."""
    adds = table.get_add_actions(flatten=True)
    rows = adds.column("num_records").to_pylist()
    return (len(rows), sum(r or 0 for r in rows),
            sum(adds.column("size_bytes").to_pylist()))


def compact(hub: Path, name: str, target_size_mb: int | None = None) -> dict:
    """Rewrite the small files of `name`'s latest version into files of about `target_size_mb`
    (delta-rs's default: 100 MB), per partition, as one new version with the same rows."""
    if target_size_mb is not None and not _whole(target_size_mb, 1, MAX_TARGET_SIZE_MB):
        raise DataHubError(
            f"--target-size-mb {target_size_mb!r} for data hub table {name!r} is not allowed: "
            f"give whole megabytes from 1 to {MAX_TARGET_SIZE_MB}, or leave it out (100 MB)")
    latest_table(hub, name)  # an unknown table is named before the lock creates <hub>/.locks
    with table_lock(hub, name):
        return _compact(hub, name, target_size_mb, "compact")


def small_files(table: DeltaTable) -> int:
    """How many of the files `table`'s version reads are under SMALL_FILE_BYTES."""
    sizes = table.get_add_actions(flatten=True).column("size_bytes").to_pylist()
    return sum(size < SMALL_FILE_BYTES for size in sizes)


def compact_if_fragmented(hub: Path, name: str) -> int | None:
    """Compact `name` when its latest version reads SMALL_FILES or more small files; the
    compacted version, or None. The caller holds `table_lock(hub, name)` (a second flock from
    this process would wait on itself). A compaction that fails is logged and changes nothing:
    the append before it has landed, and the next append tries again."""
    if small_files(latest_table(hub, name)) < SMALL_FILES:
        return None
    try:
        summary = _compact(hub, name, None, "auto-compact")
    except DataHubError as exc:
        log.warning("%s; it stays as it is until the next append compacts it", exc)
        return None
    log.info("%s", describe_compact(summary))
    return summary["version_after"] if summary["compacted"] else None


def _compact(hub: Path, name: str, target_size_mb: int | None, operation: str) -> dict:
    table = latest_table(hub, name)
    before, (files, rows, size) = table.version(), _snapshot(table)
    commit = CommitProperties(custom_metadata={"arf.operation": operation})
    try:
        metrics = table.optimize.compact(
            target_size=target_size_mb * 2**20 if target_size_mb else None,
            commit_properties=commit)
    except DeltaError as exc:
        try:  # data files gone from disk fail every try the same way: name them instead
            open_table(hub, name)
        except DataHubError as missing:
            raise DataHubError(
                f"could not compact data hub table {name!r} (it is unchanged): {missing}"
            ) from exc
        raise DataHubError(
            f"could not compact data hub table {name!r}: {exc}. The table is unchanged; "
            "run the compaction again") from exc
    after = latest_table(hub, name)
    files_after, rows_after, size_after = _snapshot(after)
    return {"table": name, "compacted": metrics["numFilesAdded"] > 0,
            "version_before": int(before), "version_after": int(after.version()),
            "files_before": files, "files_after": files_after, "rows": rows_after,
            "rows_before": rows, "bytes_before": size, "bytes_after": size_after}


def describe_compact(summary: dict) -> str:
    """The one line `arf datahub compact` prints."""
    name, files = summary["table"], summary["files_before"]
    if not summary["compacted"]:
        return (f"{name}: nothing to compact (version {summary['version_before']}, {files:,} "
                f"file{'s' if files != 1 else ''}, no partition with two small files); "
                "no new version")
    return (f"{name}: compacted {files:,} files into {summary['files_after']:,} "
            f"({summary['rows']:,} rows, {_mb(summary['bytes_before'])} -> "
            f"{_mb(summary['bytes_after'])}); version {summary['version_before']} -> "
            f"{summary['version_after']} (every older version stays readable)")


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size / 1e3:,.1f} kB"


def vacuum(hub: Path, name: str, retain_days: int, dry_run: bool = False) -> dict:
    """Delete the data files of `name` that no version of the last `retain_days` days uses,
    then the table's stored videos that no data file of the hub names (`video_gc`).

    Versions superseded before then become unreadable (a pinned template or `arf training
    reproduce` of a run that read one fails, naming the VACUUM). `dry_run` reports the same
    and deletes nothing.
    """
    if not _whole(retain_days, 1, MAX_RETAIN_DAYS):
        raise DataHubError(
            f"--retain-days {retain_days!r} for data hub table {name!r} is not allowed: give "
            f"whole days from 1 to {MAX_RETAIN_DAYS} (e.g. --retain-days 30); versions "
            "superseded before then become unreadable")
    path = table_path(hub, name)
    latest_table(hub, name)
    with table_lock(hub, name):
        table = latest_table(hub, name)
        before = int(table.version())  # the object moves on to the vacuum's commits
        # full=True also deletes files no log entry names (a killed ingest's, and replaced
        # files whose tombstone a checkpoint dropped after the 7-day deletedFileRetention:
        # lite mode would keep those forever). It judges those by mtime, which can predate
        # the window, so the versions live in the window are named to keep their files.
        # Files of a write in flight are recent: >= 1 day of retention spares them.
        options = {"retention_hours": retain_days * 24, "enforce_retention_duration": False,
                   "full": True, "keep_versions": _live_versions(table, retain_days)}
        removed, size = _delete(table, path, options, dry_run)
        readable, unreadable = _readability(path, set(removed))
        after = int(latest_table(hub, name).version())  # + VACUUM START and END if it deleted
        # After the data files: the rows that named a video are gone only once their files are.
        videos = video_gc.unreferenced(hub, name, retain_days, leaving=removed)
        video_bytes = sum(_size(v) or 0 for v in videos)
        for video in [] if dry_run else videos:
            video.unlink(missing_ok=True)
    return {"table": name, "retain_days": retain_days, "dry_run": dry_run,
            "version_before": before, "version_after": after,
            "files_removed": len(removed), "bytes_removed": size,
            "removed": removed, "readable_versions": format_versions(readable),
            "unreadable_versions": format_versions(unreadable),
            "videos_removed": [str(v.relative_to(path)) for v in videos],
            "video_bytes_removed": video_bytes}


def _delete(table: DeltaTable, path: Path, options: dict,
            dry_run: bool) -> tuple[list[str], int]:
    """The files the vacuum deletes (would delete) and their bytes.

    delta-rs lists an expired tombstone even once its file is gone, and a vacuum of only such
    files still commits a VACUUM START and END: only what is on disk counts, and with nothing
    there no vacuum runs. (Its list is relative to the table folder, as on disk.)"""
    sizes = {f: _size(path / f) for f in table.vacuum(dry_run=True, **options)}
    planned = sorted(f for f, size in sizes.items() if size is not None)
    if planned and not dry_run:
        table.vacuum(dry_run=False, commit_properties=CommitProperties(
            custom_metadata={"arf.operation": "vacuum"}), **options)
    removed = [f for f in planned if dry_run or not (path / f).exists()]
    return removed, sum(sizes[f] for f in removed)


def _live_versions(table: DeltaTable, retain_days: int) -> list[int]:
    """The versions that were the latest at some time in the last `retain_days` days: each
    version until the next commit (timestamps from the commits' commitInfo, as delta-rs's
    tombstones use), and the latest."""
    cutoff = time.time() * 1000 - retain_days * _DAY_MS
    stamps = sorted((int(e["version"]), int(e["timestamp"])) for e in table.history()
                    if "version" in e and "timestamp" in e)
    live = [v for (v, _), (_, nxt) in zip(stamps, stamps[1:]) if nxt >= cutoff]
    return live + [int(table.version())]


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _version_files(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Each version still in the log with the files it reads, relative to the table folder.

    One snapshot moved forward version by version: delta-rs then replays each commit once.
    The add actions' paths are percent-encoded once more than the folders on disk."""
    latest = DeltaTable(str(path))
    versions = sorted(int(e["version"]) for e in latest.history() if "version" in e)
    snapshot = DeltaTable(str(path), version=versions[0])
    for version in versions:
        snapshot.load_as_version(version)
        adds = snapshot.get_add_actions(flatten=True).column("path").to_pylist()
        yield version, [unquote(p) for p in adds]


def _readability(path: Path, removed: set[str]) -> tuple[list[int], list[int]]:
    """(readable, unreadable) versions: a version is readable while every file it reads is
    on disk and not in `removed` (what a dry run would delete)."""
    exists: dict[str, bool] = {}
    readable, unreadable = [], []
    for version, files in _version_files(path):
        ok = all(f not in removed and exists.setdefault(f, (path / f).is_file()) for f in files)
        (readable if ok else unreadable).append(version)
    return readable, unreadable


def describe_vacuum(summary: dict) -> str:
    """The one line `arf datahub vacuum` prints."""
    dry, days = summary["dry_run"], summary["retain_days"]
    gone, kept = summary["unreadable_versions"], summary["readable_versions"]
    verb = "would remove" if dry else "removed"
    line = (f"{summary['table']}: {verb} {summary['files_removed']:,} files "
            f"({_mb(summary['bytes_removed'])}) that no version of the last {days} "
            f"day{'s' if days != 1 else ''} reads; ")
    videos = summary.get("videos_removed") or []
    if videos:
        line += (f"{verb} {len(videos):,} stored video{'s' if len(videos) != 1 else ''} "
                 f"({_mb(summary['video_bytes_removed'])}) that no row of the hub names; ")
    if gone == "none":
        return line + f"every version stays readable ({kept})"
    return line + (f"versions {gone} {'would be' if dry else 'are'} no longer readable "
                   f"(`arf training reproduce` of runs that read them fails); {kept} "
                   f"{'would stay' if dry else 'stay'} readable"
                   + ("; nothing was deleted (--dry-run)" if dry else ""))


def restore(hub: Path, name: str, version: int) -> dict:
    """Make `version`'s rows (and columns) the latest again, as one new version; every version
    stays readable. For a bad append or overwrite: templates that read the latest, and the
    nightly runs, see the restored rows from then on."""
    versions = table_versions(hub, name)  # an unknown table is named as open_table names it
    if not _whole(version, 0, 2**63 - 1) or version not in versions:
        raise DataHubError(
            f"data hub table {name!r} has no version {version!r} to restore; versions: "
            f"{format_versions(versions)} (latest {versions[-1]}). `arf datahub describe {name}` "
            "shows what each one wrote")
    snapshot = open_table(hub, name, version)  # names a version whose files a vacuum removed
    with table_lock(hub, name):
        table = latest_table(hub, name)
        before = int(table.version())
        if before == version:
            return {"table": name, "restored": False, "version": version,
                    "version_before": before, "version_after": before}
        commit = CommitProperties(custom_metadata={"arf.operation": "restore",
                                                   "arf.restored_version": str(version)})
        try:
            table.restore(version, commit_properties=commit)
        except DeltaError as exc:
            raise DataHubError(
                f"could not restore data hub table {name!r} to version {version}: {exc}. The "
                "table is unchanged") from exc
        after = int(latest_table(hub, name).version())
    return {"table": name, "restored": True, "version": version, "version_before": before,
            "version_after": after, "rows": snapshot.dataset.count_rows()}


def describe_restore(summary: dict) -> str:
    """The one line `arf datahub restore` prints."""
    name, version = summary["table"], summary["version"]
    if not summary["restored"]:
        return f"{name}: version {version} is already the latest; nothing to restore"
    return (f"{name}: version {summary['version_after']} has the rows of version {version} "
            f"({summary['rows']:,} rows); the versions it replaces "
            f"({format_versions(list(range(version + 1, summary['version_before'] + 1)))}) "
            "stay readable")
