"""Tiny LeRobot datasets on disk, written the way `lerobot` lays them out (v2.1: a Parquet and
an MP4 per episode; v3.0: many episodes per file, found through meta/episodes), for the
ingest tests.

Every frame says which it is: frame i of episode e is one flat grey level, `level(e, i)`, so a
test can tell from the decoded pixels whether a row got its own frame (a lossy codec keeps a
flat frame's level within a few units; neighbouring frames differ by 12). A second camera
(`WRIST`, `wrist=True`), as SO-100 and ALOHA datasets have, records frames of another size at
the inverted level, `255 - level(e, i)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FPS, SIDE, STATE = 10, 64, 6
TOP, WRIST = "observation.images.top", "observation.images.wrist"
WRIST_SHAPE = (48, 64)
TASKS = ["pick the cube", "place the cube"]


def level(episode: int, frame: int) -> int:
    return 20 + 12 * frame + 5 * episode


def frames(episode: int, length: int, channels: int = 3) -> np.ndarray:
    return np.stack([np.full((SIDE, SIDE, channels), level(episode, i), dtype=np.uint8)
                     for i in range(length)])


def wrist_frames(episode: int, length: int) -> np.ndarray:
    return np.stack([np.full((*WRIST_SHAPE, 3), 255 - level(episode, i), dtype=np.uint8)
                     for i in range(length)])


def encode(path: Path, pictures: np.ndarray, options: dict[str, str] | None = None) -> None:
    """`pictures` [N, H, W, 3] as an MP4 at FPS in AV1 by SVT-AV1 (LeRobot's default codec;
    lerobot itself passes options {"g": "2", "crf": "30"})."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libsvtav1", rate=FPS, options=options or {})
        stream.width, stream.height = pictures.shape[2], pictures.shape[1]
        stream.pix_fmt = "yuv420p"
        for picture in pictures:
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _rows(episode: int, length: int, first_index: int) -> pa.Table:
    rng = np.random.default_rng(episode)
    vectors = pa.list_(pa.float32())
    return pa.table({
        "observation.state": pa.array(list(rng.normal(size=(length, STATE)).astype(np.float32)),
                                      vectors),
        "action": pa.array(list(rng.normal(size=(length, 2)).astype(np.float32)), vectors),
        "timestamp": pa.array(np.arange(length, dtype=np.float32) / FPS),
        "frame_index": pa.array(np.arange(length, dtype=np.int64)),
        "episode_index": pa.array(np.full(length, episode, dtype=np.int64)),
        "index": pa.array(np.arange(first_index, first_index + length, dtype=np.int64)),
        "task_index": pa.array(np.full(length, episode % 2, dtype=np.int64)),
    })


def _info(version: str, data_path: str, video_path: str, lengths: list[int],
          side: int = SIDE, wrist: bool = False) -> dict:
    cameras = {TOP: [side, side, 3], **({WRIST: [*WRIST_SHAPE, 3]} if wrist else {})}
    features = {
        **{name: {"dtype": "video", "shape": shape, "names": ["height", "width", "channels"]}
           for name, shape in cameras.items()},
        "observation.state": {"dtype": "float32", "shape": [STATE]},
        "action": {"dtype": "float32", "shape": [2]},
        **{name: {"dtype": dtype, "shape": [1]} for name, dtype in (
            ("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
            ("index", "int64"), ("task_index", "int64"))},
    }
    return {"codebase_version": version, "robot_type": "so100", "fps": FPS,
            "total_episodes": len(lengths), "total_frames": sum(lengths), "chunks_size": 1000,
            "data_path": data_path, "video_path": video_path, "features": features}


def write_v21(root: Path, lengths: list[int], wrist: bool = False) -> Path:
    """A v2.1 dataset: data/chunk-000/episode_{e:06d}.parquet and one MP4 per episode and
    camera."""
    first = 0
    cameras = {TOP: frames, **({WRIST: wrist_frames} if wrist else {})}
    for episode, length in enumerate(lengths):
        data = root / "data" / "chunk-000" / f"episode_{episode:06d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_rows(episode, length, first), data)
        for camera, pictures in cameras.items():
            encode(root / "videos" / "chunk-000" / camera / f"episode_{episode:06d}.mp4",
                   pictures(episode, length))
        first += length
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    info = _info("v2.1", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                 "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
                 lengths, wrist=wrist)
    (meta / "info.json").write_text(json.dumps(info, indent=4))
    (meta / "tasks.jsonl").write_text("".join(
        json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    return root


def write_v30(root: Path, lengths: list[int], episodes_per_video: int = 2,
              pictures: Callable[[int, int], np.ndarray] = frames,
              options: dict[str, str] | None = None, wrist: bool = False) -> Path:
    """A v3.0 dataset: all rows in data/chunk-000/file-000.parquet, the episodes' frames
    (`pictures(episode, length)`; the wrist camera's `wrist_frames`) concatenated
    `episodes_per_video` to a file per camera, and meta/episodes giving each one's file and
    from_timestamp."""
    side = pictures(0, 1).shape[1]
    cameras = {TOP: pictures, **({WRIST: wrist_frames} if wrist else {})}
    tables, meta_rows, first = [], [], 0
    groups = [list(range(s, min(s + episodes_per_video, len(lengths))))
              for s in range(0, len(lengths), episodes_per_video)]
    for file_index, group in enumerate(groups):
        offset = 0.0
        for camera, draw in cameras.items():
            encode(root / "videos" / camera / "chunk-000" / f"file-{file_index:03d}.mp4",
                   np.concatenate([draw(e, lengths[e]) for e in group]), options)
        for episode in group:
            tables.append(_rows(episode, lengths[episode], first))
            row = {"episode_index": episode, "length": lengths[episode],
                   "data/chunk_index": 0, "data/file_index": 0}
            for camera in cameras:
                row.update({f"videos/{camera}/chunk_index": 0,
                            f"videos/{camera}/file_index": file_index,
                            f"videos/{camera}/from_timestamp": offset,
                            f"videos/{camera}/to_timestamp": offset + lengths[episode] / FPS})
            meta_rows.append(row)
            offset += lengths[episode] / FPS
            first += lengths[episode]
    data = root / "data" / "chunk-000" / "file-000.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), data)
    episodes = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    episodes.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(meta_rows), episodes)
    # As lerobot writes it: a pandas frame indexed by the task text (index unnamed).
    pd.DataFrame({"task_index": range(len(TASKS))}, index=TASKS).to_parquet(
        root / "meta" / "tasks.parquet")
    info = _info("v3.0", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                 "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
                 lengths, side, wrist)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return root
