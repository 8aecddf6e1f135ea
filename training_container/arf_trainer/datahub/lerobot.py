"""LeRobot datasets in: `arf datahub ingest TABLE DATASET_FOLDER` on a LeRobotDataset folder.

A folder with `meta/info.json` is read as a LeRobot dataset (codebase v2.0, v2.1 or v3.0, as
`lerobot` writes and the Hugging Face Hub serves them), not as loose Parquet files. One table
row per frame, the dataset's own column names (`observation.state`, `action`, ...), and:

- Each video feature (`dtype: video`, a camera) becomes a column of that name holding the
  frame as PNG bytes: decoded from the episode's MP4 at the row's time (`timestamp`, plus the
  episode's `from_timestamp` in a v3.0 file of many episodes) within LeRobot's tolerance
  (`video_frames`). PNG is lossless, so prepare's `dataset.decode` gives back exactly the
  pixels the video decoder produced; frames are never resized. With `--frames video` the
  column holds the frame's reference instead, {video: sha256, timestamp}, and the MP4 is
  stored once, unchanged, in the table's `_videos` folder (`video_store`): every frame is
  still decoded and checked here, and prepare decodes the same frame (format video).
- Each image feature (`dtype: image`, stored in the Parquet as {bytes, path}) becomes a column
  of its encoded bytes (PNG or JPEG as recorded), for `dataset.decode` as well.
- Vector features (`shape: [6]`) become fixed-size arrays (`FLOAT[6]`), so they can be
  features or targets without a CAST.
- `task`: the task text of the row's `task_index` (meta/tasks.parquet, or tasks.jsonl).

Data files are read in order (`data/**.parquet`, sorted), batch by batch; every error names
the file and what to fix. The table's history records the data files read. What meta/ says
(info.json, tasks, episodes) and which data files there are is read and checked first, in
`arf_trainer.datahub.lerobot_meta`; this module converts the rows.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from arf_trainer.datahub import workers
from arf_trainer.datahub.lerobot_meta import INFO, LeRobotMeta
from arf_trainer.datahub.video_frames import TOLERANCE_S, VideoFrames
from arf_trainer.datahub.video_store import FRAME_REF, store
from arf_trainer.errors import DataHubError

FRAME_BATCH_BYTES = 64 << 20  # decoded pixels held per batch, before PNG encoding
# zlib level of the PNG frames (the pixels are the same at any level): 1 encodes 1.25-1.5x as
# fast as Pillow's default 6, for files 9-43 % larger (bench/lerobot_ingest.py).
PNG_LEVEL = 1


def _fixed(dtype: pa.DataType, shape: tuple[int, ...]) -> pa.DataType:
    """A list column of `shape` as nested fixed-size lists (what FLOAT[6] is to the hub)."""
    if not shape or not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
                         or pa.types.is_fixed_size_list(dtype)):
        return dtype
    inner = _fixed(dtype.value_type, shape[1:])
    return pa.list_(pa.field("item", inner), shape[0])


def table_schema(meta: LeRobotMeta, path: Path) -> pa.Schema:
    """The table's columns for data file `path`: its own (converted) plus the cameras', then
    `task`."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataHubError(f"{path}: not a readable Parquet file: {exc}") from exc
    fields = []
    for field in schema:
        if field.name in meta.image_keys:
            fields.append(pa.field(field.name, pa.binary()))
        elif field.name in meta.features:
            fields.append(pa.field(field.name, _fixed(field.type, meta.shape(field.name))))
        else:
            fields.append(pa.field(field.name, field.type))
    camera = FRAME_REF if meta.video_store is not None else pa.binary()
    fields += [pa.field(key, camera) for key in meta.video_keys if key not in schema.names]
    if meta.tasks and "task_index" in schema.names and "task" not in schema.names:
        fields.append(pa.field("task", pa.string()))
    return pa.schema(fields)


def batches(meta: LeRobotMeta, path: Path, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The rows of data file `path` in `schema` (from `table_schema`), frames decoded."""
    missing = [c for c in ("episode_index", "timestamp")
               if meta.video_keys and c not in pq.read_schema(path).names]
    if missing:
        raise DataHubError(f"{path}: no {', '.join(missing)} column, which finds each row's "
                           "video frame")
    pixels = sum(int(np.prod(meta.shape(k))) for k in meta.video_keys)
    rows = max(8, FRAME_BATCH_BYTES // pixels) if pixels else 65_536
    videos = _Videos(meta)
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield _converted(meta, path, batch, schema, videos)
    except (pa.ArrowException, OSError) as exc:
        raise DataHubError(f"{path}: could not read this LeRobot data file: {exc}; nothing "
                           "was written") from exc
    finally:
        videos.close()


def _converted(meta: LeRobotMeta, path: Path, batch: pa.RecordBatch, schema: pa.Schema,
               videos: _Videos) -> pa.RecordBatch:
    columns = []
    for field in schema:
        if field.name in meta.video_keys and field.name not in batch.schema.names:
            columns.append(videos.column(field.name, batch))
        elif field.name == "task" and "task" not in batch.schema.names:
            columns.append(_task_column(meta, path, batch["task_index"]))
        elif field.name in meta.image_keys:
            columns.append(_image_bytes(path, field.name, batch[field.name]))
        else:
            try:
                columns.append(batch[field.name].cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataHubError(
                    f"{path}: column {field.name!r} does not fit meta/info.json's shape "
                    f"{list(meta.shape(field.name))} ({exc}); fix the feature's shape in "
                    "info.json or the data") from exc
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _task_column(meta: LeRobotMeta, path: Path, indexes: pa.Array) -> pa.Array:
    unknown = sorted({i for i in indexes.to_pylist() if i not in meta.tasks})
    if unknown:
        raise DataHubError(f"{path}: task_index {unknown[:5]} not in the dataset's tasks "
                           f"(meta/tasks.*: {sorted(meta.tasks)[:10]})")
    return pa.array([meta.tasks[i] for i in indexes.to_pylist()], type=pa.string())


def _image_bytes(path: Path, key: str, column: pa.Array) -> pa.Array:
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column.cast(pa.binary())
    if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
        raise DataHubError(f"{path}: image column {key!r} is {column.type}, not the "
                           "{bytes, path} struct lerobot writes")
    data = pc.struct_field(column, "bytes")
    if data.null_count:
        raise DataHubError(f"{path}: image column {key!r} has rows without embedded bytes "
                           "(images kept as separate files); embed them with lerobot first")
    return data.cast(pa.binary())


class _Videos:
    """The open video of each camera: one file at a time, reopened when the rows move on."""

    def __init__(self, meta: LeRobotMeta):
        self.meta = meta
        self.open: dict[str, tuple[Path, VideoFrames]] = {}
        self.stored: dict[Path, str] = {}  # video file -> its sha256 in the video store

    def _stored(self, video: Path) -> str:
        sha = self.stored.get(video)
        if sha is None:
            sha = self.stored[video] = store(self.meta.video_store, video)
        return sha

    def column(self, key: str, batch: pa.RecordBatch) -> pa.Array:
        """Camera `key`'s frame of each row of `batch`, PNG-encoded, or with a video store its
        reference {video, timestamp} (the frame decoded all the same: checked, not kept)."""
        shape = self.meta.shape(key)
        decoded, references = [], []
        frames = (batch["frame_index"].to_pylist() if "frame_index" in batch.schema.names
                  else [None] * batch.num_rows)
        for episode, timestamp, index in zip(batch["episode_index"].to_pylist(),
                                             batch["timestamp"].to_pylist(), frames, strict=True):
            video, offset = self._where(key, int(episode))
            at = offset + float(timestamp)
            try:
                frame = self._frames(key, video, shape).frame(at)
            except DataHubError as exc:
                raise DataHubError(f"episode {episode}, frame_index {index}, timestamp "
                                   f"{timestamp:.6f} s, camera {key!r}: {exc}") from exc
            if self.meta.video_store is not None:
                references.append({"video": self._stored(video), "timestamp": at})
            else:
                decoded.append(frame if shape[2] == 3 else frame[..., 0])
        if self.meta.video_store is not None:
            return pa.array(references, type=FRAME_REF)
        # Decoding is sequential (one decoder per file); the encodings are independent and
        # run side by side (`workers`: the bytes do not depend on the number of threads).
        return pa.array(list(workers.pool().map(_png, decoded)), type=pa.binary())

    def _where(self, key: str, episode: int) -> tuple[Path, float]:
        """The video file holding `episode`'s frames of camera `key`, and its time offset."""
        meta = self.meta
        names: dict[str, Any] = {"video_key": key, "episode_index": episode,
                                 "episode_chunk": episode // meta.chunks_size}
        offset = 0.0
        if meta.version == "v3.0":
            if episode not in meta.episodes:
                raise DataHubError(f"{meta.root}: episode {episode} is not in meta/episodes, "
                                   f"so its {key} frames cannot be found")
            chunk, file, offset = meta.episodes[episode][key]
            names.update(chunk_index=chunk, file_index=file)
        try:
            relative = str(meta.video_path).format(**names)
        except (KeyError, IndexError, ValueError) as exc:
            raise DataHubError(f"{meta.root / INFO}: video_path {meta.video_path!r} names "
                               f"{exc}, which this ingest does not know") from exc
        # Lexically, not resolved: a Hugging Face cache's files are links into its blobs folder.
        if os.path.isabs(relative) or os.path.normpath(relative).split(os.sep)[0] == "..":
            raise DataHubError(
                f"{meta.root / INFO}: video_path {meta.video_path!r} gives {relative!r} for "
                f"camera {key!r}, episode {episode}: outside the dataset folder. A LeRobot "
                "dataset's video paths are relative to its folder (videos/...); fix info.json")
        path = meta.root / relative
        if not path.is_file():
            raise DataHubError(f"{path}: the video of camera {key!r}, episode {episode}, is "
                               "missing; download the dataset's videos folder too")
        return path, offset

    def _frames(self, key: str, path: Path, shape: tuple[int, ...]) -> VideoFrames:
        held = self.open.get(key)
        if held is None or held[0] != path:
            if held is not None:
                held[1].close()
            held = (path, VideoFrames(path, (shape[0], shape[1], shape[2]), TOLERANCE_S))
            self.open[key] = held
        return held[1]

    def close(self) -> None:
        for _, frames in self.open.values():
            frames.close()
        self.open.clear()


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()
