"""The `reach_pixels` demo table: the scripted expert's reach demonstrations seen by a camera.

One row per step, the same episodes as `reach_demos` for the same `seed` and `episodes` (the
same initial states, exploration noise and expert labels, `arf_trainer.datahub.seed`), observed
as `arf_trainer.sim.reach_pixels` renders them:

    episode INT64, step INT32,
    image   BLOB (an RGB frame of frame_size x frame_size pixels as PNG bytes, rows top-down),
    cos_q0, cos_q1, sin_q0, sin_q1, qdot_0, qdot_1 FLOAT32 (the joint state; no target in it),
    act_0, act_1 FLOAT32 (the expert's clean action), success BOOL (the whole episode's),
    seed INT64, frame_size INT32, collected_at TIMESTAMP(us, UTC)

Frames are stored as PNG, not as `UTINYINT[H][W][3]` arrays: DuckDB holds a nested array as
vectors of vectors, so 10,000 64x64 frames (123 MB) took 1.77 GB to read back and could not be
sorted in a 256 MiB DuckDB limit, where the PNG bytes pass through as BLOBs. PNG is lossless:
`reach_pixels_bc` declares `dataset.decode.image: {format: png, shape: [64, 64, 3]}`, and
prepare writes the decoded uint8 [H, W, 3] column, the same shards as the arrays gave
(`arf_trainer.datahub.decode`).

Seeded only on request (`arf-trainer datahub seed --pixels`): rendering costs a few ms a frame,
so 200 episodes (10,000 frames) take a minute or two on a CPU. Idempotent like the other demo
tables; `force` appends new episodes.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arf_trainer.datahub.tables import list_tables, open_table, write_table

log = logging.getLogger(__name__)

PIXELS_TABLE = "reach_pixels"


def image_column(frames: np.ndarray) -> pa.Array:
    """[N, H, W, C] uint8 frames as an Arrow column of nested fixed-size uint8 lists."""
    values: pa.Array = pa.array(frames.reshape(-1))
    for size in reversed(frames.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def png_column(frames: np.ndarray) -> pa.Array:
    """[N, H, W, 3] uint8 frames as a BLOB column of PNG images (lossless; zlib level 6)."""
    from PIL import Image

    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG", compress_level=6)
        encoded.append(buffer.getvalue())
    return pa.array(encoded, type=pa.binary())


def pixel_rows(episodes: int, seed: int, first_episode: int, collected_at: dt.datetime,
               frame_size: int) -> pa.Table:
    """The rows of `episodes` expert episodes (see the module doc), episode ids from
    `first_episode`."""
    from arf_trainer.datahub.seed import EXPLORATION_NOISE
    from arf_trainer.sim import reach, reach_pixels

    # The streams of arf_trainer.datahub.seed._reach_rows: the same episodes as reach_demos.
    env_stream, noise_stream = np.random.SeedSequence(seed).spawn(2)
    episode_seeds = env_stream.generate_state(episodes, dtype=np.uint32)
    noise_rng = np.random.default_rng(noise_stream)
    steps = reach.EPISODE_STEPS
    n = episodes * steps
    frames = np.empty((n, frame_size, frame_size, 3), dtype=np.uint8)
    obs = np.empty((n, reach.OBS_DIM), dtype=np.float32)
    act = np.empty((n, reach.ACT_DIM), dtype=np.float32)
    success = np.empty(n, dtype=bool)
    env, renderer = reach.make_env(), reach_pixels.FrameRenderer(frame_size)
    try:
        for i, episode_seed in enumerate(episode_seeds):
            # The expert acts on the full observation (it needs the target); the frames
            # record what a pixel policy will see.
            done = reach_pixels.rollout(lambda _frame, obs: reach.expert_action(obs),
                                        int(episode_seed), renderer, env=env,
                                        action_noise=EXPLORATION_NOISE, noise_rng=noise_rng)
            rows = slice(i * steps, (i + 1) * steps)
            frames[rows], success[rows] = done.frames, done.rollout.success
            obs[rows], act[rows] = done.rollout.observations, done.rollout.actions
    finally:
        renderer.close()
        env.close()
    state = reach_pixels.state_of(obs)
    columns: dict[str, pa.Array] = {
        "episode": pa.array(np.repeat(np.arange(first_episode, first_episode + episodes,
                                                dtype=np.int64), steps)),
        "step": pa.array(np.tile(np.arange(steps, dtype=np.int32), episodes)),
        "image": png_column(frames),
    }
    columns.update({name: pa.array(state[:, j])
                    for j, name in enumerate(reach_pixels.STATE_COLUMNS)})
    columns.update({f"act_{j}": pa.array(act[:, j]) for j in range(reach.ACT_DIM)})
    columns["success"] = pa.array(success)
    columns["seed"] = pa.array(np.full(n, seed, dtype=np.int64))
    columns["frame_size"] = pa.array(np.full(n, frame_size, dtype=np.int32))
    columns["collected_at"] = pa.array([collected_at] * n, type=pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


def check_pixels(hub: Path, frame_size: object, force: bool) -> int:
    """`frame_size`, checked against the range and, when `force` appends to an existing
    `reach_pixels`, against the frame size already there (frames of two sizes cannot train
    together). Run before anything is written: by `seed_demo` before its other tables too."""
    from arf_trainer.errors import DataHubError
    from arf_trainer.sim.reach_pixels import check_frame_size

    try:
        size = check_frame_size(frame_size, "--frame-size")
    except ValueError as exc:
        raise DataHubError(str(exc)) from None
    if force and PIXELS_TABLE in list_tables(hub):
        snapshot = open_table(hub, PIXELS_TABLE)
        sizes = pc.unique(snapshot.dataset.to_table(columns=["frame_size"])["frame_size"])
        if sizes.to_pylist() not in ([], [size]):
            raise DataHubError(
                f"table {PIXELS_TABLE!r} holds {sizes.to_pylist()}-pixel frames; appending "
                f"{size}-pixel ones would mix shapes: seed with --frame-size "
                f"{sizes[0].as_py()}, or start a new hub")
    return size


def seed_pixels(hub: Path, episodes: int, seed: int, force: bool, frame_size: int,
                collected_at: dt.datetime | None = None) -> dict[str, Any]:
    """Create (or with `force`, append to) `reach_pixels`; the summary entry of the table:
    {"rows", "version", "action", "frame_size", "seconds"}. `collected_at` as in `seed_demo`."""
    from arf_trainer.datahub.seed import check_collected_at

    check_pixels(hub, frame_size, force)
    collected_at = check_collected_at(collected_at)
    exists = PIXELS_TABLE in list_tables(hub)
    started = time.perf_counter()
    converted = exists and _frames_as_arrays(hub)
    if converted:
        _convert_to_png(hub)  # seeded by an earlier version: same frames, a new version
    if exists and not force:
        action = "converted" if converted else "unchanged"
    else:
        first = 0
        if exists:
            snapshot = open_table(hub, PIXELS_TABLE)
            latest = pc.max(snapshot.dataset.to_table(columns=["episode"])["episode"]).as_py()
            first = 0 if latest is None else int(latest) + 1
        data = pixel_rows(episodes, seed, first, collected_at, frame_size)
        write_table(hub, PIXELS_TABLE, data, mode="append")
        action = "appended" if exists else "created"
        rate = float(np.mean(data["success"].to_numpy(zero_copy_only=False)))
        log.info("%s %d rendered expert episodes (%dx%d frames, seed %d, %.0f%% successful) to "
                 "%s in %.1f s", action, episodes, frame_size, frame_size, seed, 100 * rate,
                 PIXELS_TABLE, time.perf_counter() - started)
    snapshot = open_table(hub, PIXELS_TABLE)
    return {"rows": snapshot.dataset.count_rows(), "version": snapshot.version, "action": action,
            "frame_size": frame_size, "seconds": round(time.perf_counter() - started, 1)}


def _frames_as_arrays(hub: Path) -> bool:
    return not pa.types.is_binary(open_table(hub, PIXELS_TABLE).dataset.schema.field("image").type)


def _convert_to_png(hub: Path) -> None:
    """Rewrite a `reach_pixels` table whose frames are uint8 arrays (as earlier versions seeded
    it) with the same frames as PNG, as a new table version (the old one stays readable)."""
    table = open_table(hub, PIXELS_TABLE).dataset.to_table()
    size = int(table["frame_size"][0].as_py())
    image = table["image"].combine_chunks()
    for _ in range(3):
        image = image.flatten()
    frames = image.to_numpy(zero_copy_only=False).reshape(-1, size, size, 3)
    column = table.schema.get_field_index("image")
    write_table(hub, PIXELS_TABLE, table.set_column(column, "image", png_column(frames)),
                mode="overwrite")
    log.info("converted the %d frames of %s from uint8 arrays to PNG (reach_pixels_bc decodes "
             "PNG)", len(table), PIXELS_TABLE)
