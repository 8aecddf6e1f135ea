"""Prepare's image decoding on one thread against one per core (`arf_trainer.datahub.workers`):
`ImageDecoder.decode` of the same batch of PNG frames, paired rounds, order alternating; the
decoded pixels must be equal on both sides.

Frames are the reach_pixels task's own renders (MuJoCo offscreen, random arm and target
positions) at each --sizes side, PNG at Pillow's default level (as the reach_pixels seed
writes them); the batch is --frames rows, as prepare hands the decoder one batch.

    MUJOCO_GL=egl .venv/bin/python bench/decode_threads.py [--frames 2000] [--sizes 64 224]
                                                           [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from PIL import Image

from arf_trainer.datahub import workers
from arf_trainer.datahub.decode import ImageDecoder
from arf_trainer.sim.reach_pixels import FrameRenderer


def _pngs(size: int, count: int) -> list[bytes]:
    rng = np.random.default_rng(size)
    renderer = FrameRenderer(size)
    try:
        out = []
        for q in np.column_stack([rng.uniform(-np.pi, np.pi, (count, 2)),
                                  rng.uniform(-0.2, 0.2, (count, 2))]):
            buffer = io.BytesIO()
            Image.fromarray(renderer.render(q)).save(buffer, format="PNG")
            out.append(buffer.getvalue())
        return out
    finally:
        renderer.close()


def _decode(decoder: ImageDecoder, column: pa.Array, pool: ThreadPoolExecutor
            ) -> tuple[float, pa.Array]:
    workers._pool = pool
    start = time.perf_counter()
    decoded = decoder.decode(column, where=str)
    return time.perf_counter() - start, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    threads = workers.worker_threads()
    pools = {1: ThreadPoolExecutor(1), threads: ThreadPoolExecutor(threads)}
    for size in args.sizes:
        column = pa.array(_pngs(size, args.frames), type=pa.binary())
        decoder = ImageDecoder("image", "png", (size, size, 3))
        for pool in pools.values():
            _decode(decoder, column, pool)  # warm
        ratios = []
        for round_ in range(args.rounds):
            order = (1, threads) if round_ % 2 == 0 else (threads, 1)
            seconds, pixels = {}, {}
            for n in order:
                seconds[n], pixels[n] = _decode(decoder, column, pools[n])
            assert pixels[1].equals(pixels[threads]), "the threads changed the pixels"
            ratios.append(seconds[1] / seconds[threads])
            print(f"{size}px round {round_ + 1}: 1 thread {seconds[1]:.3f} s, {threads} threads "
                  f"{seconds[threads]:.3f} s ({args.frames} frames): {ratios[-1]:.2f}x as fast",
                  flush=True)
        print(f"{size}px: {threads} threads vs 1, per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; median "
              f"{statistics.median(ratios):.2f}x as fast, same pixels")


if __name__ == "__main__":
    main()
