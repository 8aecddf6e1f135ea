"""Random shifts of training frames (hyperparameter `random_shift` of recipe bc_pixels).

A policy trained on a few hundred demonstrations from a fixed camera can fit the exact pixels
of each frame. Shifting every frame by a few pixels, a new shift each time it is seen, makes it
learn from where things are relative to each other instead: DrQ's augmentation (Kostrikov et
al. 2020; pad by k replicating the border, crop back at a random offset), which diffusion
policy's and robomimic's crop randomizers resemble. Training only: validation and serving see
the frames as they are.

Reproducible by construction: the shifts of a step are drawn from a generator seeded with
(run seed, rank, step, camera), not from a stream that a checkpoint would have to carry, so a
re-run draws the same shifts and a run resumed at step s draws step s's. The frames are
gathered by integer indices (no interpolation), the same on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_STREAM = 7  # keeps these draws apart from other per-step streams of the same seed


def shifts(batch: int, shift: int, key: Sequence[int]) -> np.ndarray:
    """[2, batch] row and column offsets in [-shift, shift], the same for the same key."""
    rng = np.random.default_rng([_STREAM, *(int(k) for k in key)])
    return rng.integers(-shift, shift + 1, size=(2, batch))


def random_shift(frames: torch.Tensor, shift: int, key: Sequence[int]) -> torch.Tensor:
    """Each frame of `frames` (uint8 [B, H, W, C], any device) moved by its own offset of up
    to `shift` pixels along each side, the border pixels repeated into the uncovered part."""
    b, h, w = (int(side) for side in frames.shape[:3])
    offsets = torch.from_numpy(shifts(b, shift, key))
    rows = (torch.arange(h)[None, :] + offsets[0][:, None]).clamp_(0, h - 1)
    cols = (torch.arange(w)[None, :] + offsets[1][:, None]).clamp_(0, w - 1)
    device = frames.device
    index = torch.arange(b, device=device)[:, None, None]
    return frames[index, rows.to(device)[:, :, None], cols.to(device)[:, None, :]]
