"""A LeRobot dataset into the data hub: `arf datahub ingest` against the least work it must do.

The dataset: --episodes expert episodes of the Reach task (50 steps each), their frames
rendered at --size (MuJoCo, the reach_pixels camera), written as a LeRobot v3.0 dataset the
way lerobot records one (AV1 by SVT-AV1 with lerobot's `g=2, crf=30`, yuv420p; several
episodes per video file; meta/episodes with each one's from_timestamp).

Per round, order alternating:
- ingest: `ingest()` of the dataset folder into a fresh hub (every frame found by time,
  decoded, PNG-encoded, written to Delta with the other columns);
- bare: the floor of that work, written as a user would: PyAV decodes each video file front to
  back and Pillow encodes every frame as PNG (same zlib level), nothing else.
Printed: seconds and frames/s of both, the ratio, and sizes (videos vs the table). Also
PNG encoding at zlib level 1 (what ingest uses) against level 6 (Pillow's default).

    .venv/bin/python bench/lerobot_ingest.py [--episodes 40] [--size 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("SVT_LOG", "1")

from lerobot_dataset import write_v30  # noqa: E402 (tests/unit is on sys.path)

from arf_trainer.datahub import lerobot  # noqa: E402
from arf_trainer.datahub.ingest import ingest  # noqa: E402

STEPS = 50


def _rendered(episodes: int, size: int) -> dict[int, np.ndarray]:
    """The expert's episodes (seeds 0..episodes-1) as frames [STEPS, size, size, 3]."""
    from arf_trainer.sim import reach
    from arf_trainer.sim.reach_pixels import FrameRenderer, qpos_of

    renderer, env = FrameRenderer(size), reach.make_env()
    try:
        out = {}
        for seed in range(episodes):
            rollout = reach.rollout(reach.expert_policy, seed, env=env)
            out[seed] = np.stack([renderer.render(qpos_of(o))
                                  for o in rollout.observations[:STEPS]])
        return out
    finally:
        renderer.close()
        env.close()


def build_dataset(scratch: Path, episodes: int, size: int) -> tuple[dict[int, np.ndarray], Path]:
    """The expert's rendered episodes and the LeRobot v3.0 dataset of them in `scratch`, as
    lerobot records one (AV1, `g=2, crf=30`, 10 episodes a video file)."""
    frames = _rendered(episodes, size)
    dataset = write_v30(scratch / "dataset", [STEPS] * episodes, episodes_per_video=10,
                        pictures=lambda e, n: frames[e][:n], options={"g": "2", "crf": "30"})
    return frames, dataset


def _png(frame: np.ndarray, level: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def _bare(dataset: Path) -> int:
    import av

    count = 0
    for video in sorted((dataset / "videos").rglob("*.mp4")):
        with av.open(str(video)) as container:
            for frame in container.decode(container.streams.video[0]):
                _png(frame.to_ndarray(format="rgb24"), lerobot.PNG_LEVEL)
                count += 1
    return count


def _ingest(dataset: Path, scratch: Path) -> int:
    hub = scratch / "hub"
    shutil.rmtree(hub, ignore_errors=True)
    return ingest(hub, "so100", [dataset]).rows


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lerobot-bench-"))
    try:
        start = time.perf_counter()
        frames, dataset = build_dataset(scratch, args.episodes, args.size)
        print(f"dataset: {args.episodes} episodes x {STEPS} frames at {args.size}x{args.size}, "
              f"videos {_size(dataset / 'videos') / 1e6:.1f} MB, built in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        ratios = []
        for round_ in range(args.rounds):
            sides = ("ingest", "bare") if round_ % 2 == 0 else ("bare", "ingest")
            seconds, rows = {}, {}
            for side in sides:
                begin = time.perf_counter()
                rows[side] = _ingest(dataset, scratch) if side == "ingest" else _bare(dataset)
                seconds[side] = time.perf_counter() - begin
            assert rows["ingest"] == rows["bare"], rows
            ratios.append(seconds["ingest"] / seconds["bare"])
            print(f"round {round_ + 1}: ingest {seconds['ingest']:.2f} s "
                  f"({rows['ingest'] / seconds['ingest']:.0f} frames/s), bare "
                  f"{seconds['bare']:.2f} s ({rows['bare'] / seconds['bare']:.0f} frames/s): "
                  f"{ratios[-1]:.2f}x", flush=True)
        print(f"ingest / bare per round {', '.join(f'{r:.2f}' for r in ratios)}; median "
              f"{statistics.median(ratios):.2f}x; table {_size(scratch / 'hub') / 1e6:.1f} MB")
        sample = [f for e in list(frames)[:4] for f in frames[e]]
        for level in (1, 6):
            begin = time.perf_counter()
            size = sum(len(_png(f, level)) for f in sample)
            print(f"PNG level {level}: {(time.perf_counter() - begin) / len(sample) * 1e3:.2f} "
                  f"ms a frame, {size / len(sample) / 1e3:.1f} kB a frame")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
