"""What refusing damaged JPEGs costs prepare's decoding: `dataset.decode` of JPEG frames with
libjpeg's strict check (`decode._damaged_jpeg`, simplejpeg at 1/8 scale) against the same
decoder without it (Pillow alone, as before the check), paired rounds, order alternating.

Frames are the reach_pixels task's own renders (MuJoCo offscreen, random arm and target
positions) at each --sizes side, JPEG quality 90. Also counted, of --flips frames with one
random bit of their entropy-coded data flipped, and of as many cut short at a random point
(and as many cut short and closed with an end-of-image marker):
how many Pillow decodes without an error (what prepare trained on before the check) and how
many prepare refuses now.

    MUJOCO_GL=egl .venv/bin/python bench/jpeg_check.py [--frames 2000] [--sizes 64 224]
                                                       [--rounds 5] [--flips 500]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from arf_trainer.datahub import decode as decode_module
from arf_trainer.datahub.decode import ImageDecoder
from arf_trainer.errors import DecodeError
from arf_trainer.sim.reach_pixels import FrameRenderer


def _frames(size: int, count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    renderer = FrameRenderer(size)
    try:
        qpos = np.column_stack([rng.uniform(-np.pi, np.pi, (count, 2)),
                                rng.uniform(-0.2, 0.2, (count, 2))])
        out = []
        for q in qpos:
            buffer = io.BytesIO()
            Image.fromarray(renderer.render(q)).save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
        return out
    finally:
        renderer.close()


def _timed(decoder: ImageDecoder, column: pa.Array, checked: bool) -> float:
    original = decode_module._damaged_jpeg
    if not checked:
        decode_module._damaged_jpeg = lambda data: None  # the decoder as it was
    try:
        start = time.perf_counter()
        decoder.decode(column, where=str)
        return time.perf_counter() - start
    finally:
        decode_module._damaged_jpeg = original


def _flipped(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """One random bit of the entropy-coded data flipped."""
    scan = jpeg.index(b"\xff\xda") + 14  # past the SOS header of a 3-component scan
    at = int(rng.integers(scan, len(jpeg) - 2))
    return jpeg[:at] + bytes([jpeg[at] ^ (1 << int(rng.integers(8)))]) + jpeg[at + 1:]


def _cut(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """Cut at a random point of the entropy-coded data (an upload that stopped)."""
    scan = jpeg.index(b"\xff\xda") + 14
    return jpeg[:int(rng.integers(scan, len(jpeg) - 2))]


def _cut_and_closed(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """Cut short, then closed with an end-of-image marker (as tools that 'repair' files do)."""
    return _cut(jpeg, rng) + b"\xff\xd9"


def _damage_counts(decoder: ImageDecoder, jpegs: list[bytes], count: int,
                   damage: Any) -> dict[str, Any]:
    """Of `count` frames damaged by `damage`: how many Pillow decodes without an error (what
    prepare trained on before the check) and how many prepare refuses now."""
    rng = np.random.default_rng(1)
    refused = pillow_silent = 0
    for i in range(count):
        damaged = damage(jpegs[i % len(jpegs)], rng)
        try:
            with Image.open(io.BytesIO(damaged)) as img:
                img.convert("RGB")
            pillow_silent += 1
        except OSError:
            pass
        try:
            decoder.decode(pa.array([damaged], type=pa.binary()), where=str)
        except DecodeError:
            refused += 1
    return {"frames": count, "pillow_decoded_silently": pillow_silent, "refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flips", type=int, default=500)
    args = parser.parse_args()
    for size in args.sizes:
        jpegs = _frames(size, args.frames, seed=size)
        column = pa.array(jpegs, type=pa.binary())
        decoder = ImageDecoder("image", "jpeg", (size, size, 3))
        _timed(decoder, column, True)  # warm both paths (imports, caches)
        _timed(decoder, column, False)
        ratios = []
        for round_ in range(args.rounds):
            order = (True, False) if round_ % 2 == 0 else (False, True)
            seconds = {checked: _timed(decoder, column, checked) for checked in order}
            ratios.append(seconds[True] / seconds[False])
            print(f"{size}px round {round_ + 1}: checked {seconds[True]:.3f} s, Pillow alone "
                  f"{seconds[False]:.3f} s ({args.frames} frames, mean "
                  f"{sum(map(len, jpegs)) / len(jpegs):,.0f} bytes): {ratios[-1]:.2f}x",
                  flush=True)
        print(f"{size}px: checked / Pillow alone, per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")
        for name, damage in (("one-bit flip", _flipped), ("cut short", _cut),
                             ("cut short and closed", _cut_and_closed)):
            print(f"{size}px {name}: {_damage_counts(decoder, jpegs, args.flips, damage)}")


if __name__ == "__main__":
    main()
