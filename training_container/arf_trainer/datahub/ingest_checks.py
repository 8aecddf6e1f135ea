"""Checks an ingest makes so that bad input fails with its name instead of landing altered.

Each guards against a silent change found in review: a file read twice (its rows doubled), a
table created over a folder of the user's own files (which a later vacuum would delete), values
Delta would alter on the way in (nanoseconds truncated to microseconds, an empty partition
value turned into null), and a commit of no rows (an empty version, or an emptied table).
The batch checks are vectorised (one Arrow kernel per column and batch), so the happy path
stays as fast as the write.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from arf_trainer.errors import DataHubError

# What an ingest stopped before its commit leaves in a new table's folder: data files named by
# delta-rs (under partition folders too) and, for `--frames video`, the content-addressed
# `_videos` store. Anything else there is someone's own files.
_DELTA_DATA = re.compile(r"part-\d+-[0-9a-f-]{36}-c\d+(\.[a-z0-9]+)*\.parquet\Z")


def check_distinct(sources: Sequence) -> None:
    """No file (or Delta table) is read twice: `f.parquet f.parquet`, or a file named and also
    reached through its folder, would otherwise add its rows twice."""
    seen: dict[str, Path] = {}
    for source in sources:
        real = os.path.realpath(source.path)
        if real in seen:
            same = "" if str(seen[real]) == str(source.path) else f" (also as {seen[real]})"
            raise DataHubError(
                f"{source.path}{same} is named twice in this ingest (directly, or through a "
                "folder or link that holds it); its rows would be written twice. Name each "
                "file once (nothing was written)")
        seen[real] = source.path


def _leftover(entry: Path) -> bool:
    if entry.is_dir():
        # _delta_log: another ingest created the table meanwhile (its append check follows).
        return entry.name in ("_videos", "_delta_log") or ("=" in entry.name and all(
            _leftover(child) for child in entry.iterdir()))
    return bool(_DELTA_DATA.match(entry.name))


def check_table_folder(path: Path, name: str) -> None:
    """A new table's folder is absent, empty, or holds only what a stopped ingest left."""
    if not path.is_dir():
        return
    foreign = sorted(str(e.name) for e in path.iterdir() if not _leftover(e))
    if foreign:
        raise DataHubError(
            f"cannot create data hub table {name!r}: its folder {path} already holds files "
            f"that are not a Delta table ({', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}); the hub would take them over and a later "
            "vacuum would delete them. Choose another table name, or move those files out of "
            "the folder (nothing was written)")


def check_batch(batch: pa.RecordBatch, where: str, partitions: Sequence[str],
                before: int) -> None:
    """Values Delta would store altered: sub-microsecond instants (delta-rs truncates to
    microseconds), and empty strings in a partition column (delta-rs writes them as null)."""
    for field, column in zip(batch.schema, batch.columns):
        if pa.types.is_timestamp(field.type) and field.type.unit == "ns":
            try:
                column.cast(pa.timestamp("us", field.type.tz), safe=True)
            except pa.ArrowInvalid as exc:
                raise DataHubError(
                    f"{where}: column {field.name!r} holds instants finer than a microsecond "
                    f"({field.type}); the hub stores microseconds and would cut the rest off. "
                    "Round the values to microseconds before ingesting (pandas "
                    "`.dt.floor('us')`, DuckDB `date_trunc`), or keep the exact nanoseconds "
                    f"as a number with --type {field.name}=int64 (nothing was written)") from exc
        if field.name in partitions and (pa.types.is_string(field.type)
                                         or pa.types.is_large_string(field.type)):
            empty = pc.equal(column, "")
            if pc.any(empty).as_py():
                row = pc.index(empty, True).as_py()
                raise DataHubError(
                    f"{where}: partition column {field.name!r} has an empty value (data row "
                    f"{before + row + 1}); a partition folder cannot hold an empty string "
                    "and Delta would read it back as null. Fill the value in, or leave "
                    f"{field.name!r} out of --partition-by (nothing was written)")


def storable_error(batch: pa.RecordBatch, storable: pa.Schema, where: str,
                   exc: Exception) -> DataHubError:
    """A failed cast to the stored types, naming the column (found by casting each again)."""
    for field in storable:
        column = batch.column(field.name)
        if column.type == field.type:
            continue
        try:
            column.cast(field.type)
        except pa.ArrowException as inner:
            return DataHubError(
                f"{where}: column {field.name!r} ({column.type}) has a value the hub cannot "
                f"store as {field.type}: {inner}. Fix or drop the value, or read the column "
                f"as another type with --type {field.name}=TYPE (e.g. string or float64) "
                "(nothing was written)")
    return DataHubError(f"{where}: {exc} (nothing was written)")


def no_rows(sources: Sequence, mode: str) -> DataHubError:
    """An ingest whose files hold no rows: an append would commit an empty version, and an
    overwrite would empty the table without anyone asking for that."""
    named = ", ".join(str(s.path) for s in sources[:5]) + (" ..." if len(sources) > 5 else "")
    extra = ("; an overwrite with no rows would silently empty the table, and the hub has "
             "no command to empty one: overwrite it with the rows it should hold"
             if mode == "overwrite" else "")
    return DataHubError(f"no rows in {named}; nothing written (the table is at its previous "
                        f"version){extra}")
