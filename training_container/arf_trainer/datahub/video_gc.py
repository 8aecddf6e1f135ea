"""The stored videos a vacuum removes: those no row of the hub names any more.

Delta's vacuum leaves a table's `_videos` folder alone (`video_store`), so without this the
videos of overwritten, restored-away or vacuumed versions would stay for good. After the Delta
files are vacuumed, `arf datahub vacuum TABLE` also removes a video of TABLE's store when

- no data file left on disk in any table of the hub names it (a row of another table may name
  it: the decoder looks in every table's store), and
- it was stored, or reused by an ingest, before the retention window: an ingest stores its
  videos before it commits its rows, and `video_store.store` refreshes the time of a video it
  reuses, so the videos of an ingest in flight are never taken.

Counting every data file on disk, not only those of readable versions, keeps a video that a
killed ingest's leftover file names until Delta's vacuum takes that file: it errs on keeping.
One case it cannot see: rows naming TABLE's videos that an ingest into another table copies
from elsewhere (a Parquet file of frame references) while the vacuum scans. Such rows name
videos that no table's rows named for the whole retention window.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from arf_trainer.datahub.tables import list_tables
from arf_trainer.datahub.video_store import INCOMING, VIDEOS, is_frame_ref
from arf_trainer.errors import DataHubError


def unreferenced(hub: Path, table: str, retain_days: int,
                 leaving: Iterable[str] = ()) -> list[Path]:
    """TABLE's stored videos (and a stopped ingest's partial copies) that the vacuum removes.

    `leaving`: TABLE's data files (relative to its folder) that count as gone already, the
    ones a dry run would have deleted."""
    store = hub / table / VIDEOS
    if not store.is_dir():
        return []
    cutoff = time.time() - retain_days * 86_400
    old = [f for f in sorted(store.iterdir()) if f.is_file() and f.stat().st_mtime < cutoff]
    if not old:
        return []
    named = referenced(hub, {table: set(leaving)})
    return [f for f in old if f.name.startswith(INCOMING) or f.stem not in named]


def referenced(hub: Path, leaving: dict[str, set[str]]) -> set[str]:
    """Every video hash that a data file on disk in one of the hub's tables names."""
    found: set[str] = set()
    for name in list_tables(hub):
        for data in _data_files(hub / name):
            if str(data.relative_to(hub / name)) not in leaving.get(name, ()):
                found |= _file_references(data)
    return found


def _data_files(table: Path) -> Iterator[Path]:
    """The table's Parquet files, partition folders included; not its log, store or temp
    files (Delta's and ours start with `_` or `.`)."""
    for path in sorted(table.rglob("*.parquet")):
        parts = path.relative_to(table).parts
        if not any(part.startswith(("_", ".")) for part in parts):
            yield path


def _file_references(path: Path) -> set[str]:
    try:
        schema = pq.read_schema(path)
        columns = [f.name for f in schema if _holds_references(f.type)]
        if not columns:
            return set()
        data = pq.read_table(path, columns=columns)
    except FileNotFoundError:  # a concurrent vacuum of that table took it: it names nothing
        return set()
    except (OSError, pa.ArrowException) as exc:
        raise DataHubError(
            f"cannot read data file {path} to see which stored videos its rows name ({exc}); "
            "no video was removed. Repair or remove that file and run the vacuum again") from exc
    found: set[str] = set()
    for column in data.columns:
        for chunk in column.chunks:
            found |= _hashes(chunk)
    return found


def _holds_references(dtype: pa.DataType) -> bool:
    if is_frame_ref(dtype):
        return True
    if pa.types.is_struct(dtype):
        return any(_holds_references(dtype.field(i).type) for i in range(dtype.num_fields))
    if pa.types.is_map(dtype):
        return _holds_references(dtype.key_type) or _holds_references(dtype.item_type)
    if _is_list(dtype):
        return _holds_references(dtype.value_type)
    return False


def _hashes(array: pa.Array) -> set[str]:
    """The `video` values of every frame reference in `array`, however deep it is nested."""
    dtype = array.type
    if is_frame_ref(dtype):
        return {v for v in array.field("video").unique().to_pylist() if v is not None}
    if pa.types.is_struct(dtype):
        return set().union(*(_hashes(array.field(i)) for i in range(dtype.num_fields)
                             if _holds_references(dtype.field(i).type)))
    if pa.types.is_map(dtype):
        return _hashes(array.keys) | _hashes(array.items)
    if _is_list(dtype):
        return _hashes(array.flatten())
    return set()


def _is_list(dtype: pa.DataType) -> bool:
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
            or pa.types.is_fixed_size_list(dtype))
