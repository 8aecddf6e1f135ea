"""LeRobot cameras stored as PNG frames or as their videos (`arf datahub ingest --frames png |
video`): space, ingest time and prepare time, side by side on one dataset.

The dataset is bench/lerobot_ingest.py's: --episodes expert Reach episodes (50 frames each)
rendered at --size, written as a LeRobot v3.0 dataset as lerobot records one (AV1 by
SVT-AV1, `g=2, crf=30`, 10 episodes a video file).

Per round, the two sides in alternating order:
- png: ingest with `--frames png` (every frame decoded and PNG-encoded into the table), then
  prepare with `dataset.decode` format png (each PNG decoded into the shards);
- video: ingest with `--frames video` (every frame decoded and checked, the MP4s stored once),
  then prepare with format video (each frame decoded from the stored video).
Printed per round: each side's ingest and prepare seconds and their ratios (video / png); then
the stored bytes of each (Delta table + videos) against the videos, and whether both prepares
gave the same fingerprint (the same pixels in the shards).

    .venv/bin/python bench/lerobot_videos.py [--episodes 40] [--size 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("SVT_LOG", "1")

from lerobot_dataset import TOP  # noqa: E402 (tests/unit is on sys.path)
from lerobot_ingest import STEPS, _size, build_dataset  # noqa: E402
from test_prepare import _manifest, step_env  # noqa: E402

from arf_trainer.datahub.ingest import ingest  # noqa: E402
from arf_trainer.datahub.prepare import run_prepare  # noqa: E402


def _side(frames: str, dataset: Path, scratch: Path, size: int) -> dict:
    hub, workspace = scratch / f"hub-{frames}", scratch / f"ws-{frames}"
    shutil.rmtree(hub, ignore_errors=True)
    shutil.rmtree(workspace, ignore_errors=True)
    begin = time.perf_counter()
    rows = ingest(hub, "so100", [dataset], frames=frames).rows
    ingested = time.perf_counter() - begin
    query = {"query": f'SELECT episode_index, frame_index, "{TOP}", "observation.state", '
                      "action FROM so100",
             "decode": {TOP: {"format": frames, "shape": [size, size, 3]}},
             "features": [TOP, "observation.state"], "targets": ["action"],
             "order_by": ["episode_index", "frame_index"], "split_by": "episode_index",
             "validation_split": 0.1}
    begin = time.perf_counter()
    run_prepare(step_env(workspace, hub, "reach_pixels_bc", dataset=query))
    prepared = time.perf_counter() - begin
    manifest = _manifest(workspace)
    assert manifest["rows"] == rows, (manifest["rows"], rows)
    return {"ingest": ingested, "prepare": prepared, "rows": rows, "stored": _size(hub),
            "fingerprint": manifest["fingerprint"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lerobot-videos-"))
    try:
        _, dataset = build_dataset(scratch, args.episodes, args.size)
        videos = _size(dataset / "videos")
        print(f"dataset: {args.episodes} episodes x {STEPS} frames at {args.size}x{args.size}, "
              f"videos {videos / 1e6:.2f} MB", flush=True)
        ratios: dict[str, list[float]] = {"ingest": [], "prepare": []}
        last: dict[str, dict] = {}
        for round_ in range(args.rounds):
            order = ("png", "video") if round_ % 2 == 0 else ("video", "png")
            for side in order:
                last[side] = _side(side, dataset, scratch, args.size)
            for step in ratios:
                ratios[step].append(last["video"][step] / last["png"][step])
            print(f"round {round_ + 1}: " + "; ".join(
                f"{step} png {last['png'][step]:.2f} s, video {last['video'][step]:.2f} s "
                f"({ratios[step][-1]:.2f}x)" for step in ratios), flush=True)
        for step, values in ratios.items():
            print(f"{step} time, video / png, per round {', '.join(f'{r:.2f}' for r in values)}"
                  f"; median {statistics.median(values):.2f}x")
        for side in ("png", "video"):
            stored = last[side]["stored"]
            print(f"stored with --frames {side}: {stored / 1e6:.2f} MB "
                  f"({stored / videos:.2f}x the videos); "
                  f"{last[side]['rows'] / last[side]['prepare']:.0f} frames/s prepared")
        same = last["png"]["fingerprint"] == last["video"]["fingerprint"]
        print(f"same prepared data (fingerprint) from both: {same}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
