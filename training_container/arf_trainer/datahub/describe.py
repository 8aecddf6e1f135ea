"""What is in the hub: the tables (`arf datahub tables`) and one table's columns, rows,
versions and history (`arf datahub describe TABLE [--version N]`), as data and as text.

Row counts come from the Delta log's per-file statistics, so listing a large table reads no
data files; a file written without statistics is counted by scanning it.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from arf_trainer.datahub.arrow_types import type_name
from arf_trainer.datahub.maintenance import SMALL_FILE_BYTES, SMALL_FILES, small_files
from arf_trainer.datahub.table_damage import DamagedTableError
from arf_trainer.datahub.tables import (format_versions, list_tables, open_table, table_path,
                                       table_versions)
from arf_trainer.errors import DataHubError


def _files(table: DeltaTable) -> pa.Table:
    return pa.table(table.get_add_actions(flatten=True))


def _row_count(table: DeltaTable, files: pa.Table, dataset) -> int:
    if files.num_rows == 0:
        return 0
    counts = files.column("num_records")
    if counts.null_count:  # some file has no statistics: count by scanning
        return int(dataset.count_rows())
    return int(pc.sum(counts).as_py())


def _when(millis: int | None) -> str | None:
    if millis is None:
        return None
    return dt.datetime.fromtimestamp(millis / 1000, dt.UTC).isoformat(timespec="seconds")


def _history(table: DeltaTable, up_to: int) -> list[dict]:
    """The commits up to version `up_to`; `table` must be loaded at the latest version (delta-rs
    numbers the history of a table loaded at an older version from that version down, so
    every entry would carry another commit's number)."""
    entries = []
    for entry in table.history():
        version = int(entry.get("version", -1))
        if version > up_to:
            continue
        metrics = entry.get("operationMetrics") or {}
        params = entry.get("operationParameters") or {}
        sources = entry.get("arf.sources")
        entries.append({
            "version": version,
            "time": _when(entry.get("timestamp")),
            "operation": entry.get("operation"),
            "mode": str(params.get("mode", "")).lower() or None,
            "rows_added": metrics.get("num_added_rows"),
            "by": entry.get("arf.operation") or entry.get("engineInfo"),
            "sources": json.loads(sources) if sources else None,
        })
    return sorted(entries, key=lambda item: item["version"], reverse=True)


def describe_table(hub: Path, name: str, version: int | None = None) -> dict:
    """Columns (with their Arrow types), rows, files, versions and history of `name`.

    A `version` the table does not have is named with the versions it has, in the CLI's words
    (`--version N`; `open_table`'s own message speaks of a template's pin)."""
    if version is not None:
        versions = table_versions(hub, name)
        if isinstance(version, bool) or version not in versions:
            raise DataHubError(
                f"data hub table {name!r} has no version {version}; versions available: "
                f"{format_versions(versions)} (latest {versions[-1]}). Describe one of those "
                f"with `arf datahub describe {name} --version N`, or leave out --version for "
                "the latest")
    snapshot = open_table(hub, name, version)
    table = DeltaTable(str(table_path(hub, name)), version=snapshot.version)
    files = _files(table)
    versions = table_versions(hub, name)
    return {
        "table": name,
        "version": snapshot.version,
        "latest_version": versions[-1],
        "versions": versions,
        "rows": _row_count(table, files, snapshot.dataset),
        "files": files.num_rows,
        "bytes": int(pc.sum(files.column("size_bytes")).as_py() or 0),
        "small_files": small_files(table),
        "partition_columns": list(table.metadata().partition_columns),
        "columns": [{"name": field.name, "type": type_name(field.type)}
                    for field in snapshot.dataset.schema],
        "history": _history(DeltaTable(str(table_path(hub, name))), snapshot.version),
        "stored_videos": _stored_videos(table_path(hub, name)),
    }


def _stored_videos(path: Path) -> dict | None:
    """The table's video store (`arf datahub ingest --frames video`), all versions': files and
    bytes; None without one."""
    from arf_trainer.datahub.video_store import VIDEOS

    videos = list((path / VIDEOS).glob("*.mp4"))
    if not videos:
        return None
    return {"files": len(videos), "bytes": sum(f.stat().st_size for f in videos)}


def list_summaries(hub: Path) -> list[dict]:
    """One line per table: name, latest version, rows, columns; a damaged table (a commit or
    data file missing, a commit unreadable) as its name and `damaged`, the one-line why, so
    that it never hides the healthy ones."""
    summaries = []
    for name in list_tables(hub):
        try:
            snapshot = open_table(hub, name)
        except DamagedTableError as exc:
            summaries.append({"table": name, "damaged": exc.reason})
            continue
        table = DeltaTable(str(table_path(hub, name)))
        summaries.append({
            "table": name,
            "version": snapshot.version,
            "rows": _row_count(table, _files(table), snapshot.dataset),
            "columns": len(snapshot.dataset.schema),
        })
    return summaries


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def format_tables(hub: Path, summaries: list[dict]) -> str:
    if not summaries:
        return (f"no tables in the data hub at {hub}; add one with `arf datahub ingest TABLE "
                "FILE_OR_FOLDER...` (or the demo tables with `arf datahub seed`)")
    width = max(len(s["table"]) for s in summaries)
    lines = [f"{'TABLE':<{width}}  {'VERSION':>7}  {'ROWS':>14}  COLUMNS"]
    lines += [f"{s['table']:<{width}}  DAMAGED: {s['damaged']}" if s.get("damaged") else
              f"{s['table']:<{width}}  {s['version']:>7}  {s['rows']:>14,}  {s['columns']}"
              for s in summaries]
    damaged = [s["table"] for s in summaries if s.get("damaged")]
    if damaged:
        lines.append(f"{len(damaged)} damaged table{'s' if len(damaged) > 1 else ''} "
                     f"({', '.join(damaged)}): `arf datahub describe {damaged[0]}` says what is "
                     "missing and how to repair it")
    return "\n".join(lines)


def _compact_hint(info: dict) -> list[str]:
    """A line advising `arf datahub compact` when the latest version reads many small files
    (500 small appends scan ~3.8x slower than the same rows compacted: bench/datahub_compact.py)."""
    small = info["small_files"]
    if info["version"] != info["latest_version"] or small < SMALL_FILES:
        return []
    return [f"  {small} of its {info['files']} files are under {_size(SMALL_FILE_BYTES)}: "
            f"`arf datahub compact {info['table']}` makes them fewer and larger, and scans faster"]


def format_description(info: dict) -> str:
    versions = info["versions"]
    span = f"{versions[0]}-{versions[-1]}" if len(versions) > 1 else str(versions[0])
    lines = [
        f"table {info['table']}  version {info['version']} (latest {info['latest_version']}; "
        f"versions {span})",
        f"rows {info['rows']:,}  files {info['files']}  size {_size(info['bytes'])}  "
        f"partitioned by {', '.join(info['partition_columns']) or '-'}",
        *_compact_hint(info),
        *([f"stored videos {info['stored_videos']['files']}  size "
           f"{_size(info['stored_videos']['bytes'])}  (all versions'; frames decoded by "
           "dataset.decode format video)"] if info.get("stored_videos") else []),
        "columns:",
    ]
    width = max((len(c["name"]) for c in info["columns"]), default=4)
    lines += [f"  {c['name']:<{width}}  {c['type']}" for c in info["columns"]]
    lines.append("history (newest first):")
    for entry in info["history"]:
        added = "" if entry["rows_added"] is None else f"  +{entry['rows_added']:,} rows"
        sources = entry["sources"] or []
        source = f"  from {', '.join(sources[:3])}{' ...' if len(sources) > 3 else ''}" \
            if sources else ""
        lines.append(f"  {entry['version']:>4}  {entry['time']}  {entry['operation']} "
                     f"{entry['mode'] or ''}{added}  ({entry['by']}){source}")
    return "\n".join(lines)
