"""Camera frames made smaller by a whole factor, the same way in prepare and in the model.

`dataset.decode.<column>.downscale: k` stores each frame k times smaller a side in the shards
(a 480x640 camera at k = 5 is 96x128: 1/25 of the bytes and of the encoder's work), and the
bc_pixels model takes the camera's full frames when served and makes them smaller itself. For
the policy to see in service exactly what it saw in training, both sides run the same
arithmetic: each output pixel is the mean of a k x k block, in integers, rounded half up,
``(sum + k*k // 2) // (k*k)``. Integer sums are exact, so numpy (prepare, `block_mean`) and
torch (the model, on any device: `block_mean_torch`) give the same bytes; a float resize
(Pillow's BOX, torch's area interpolation) rounds differently between the two, and a frame one
level off is a frame the policy never trained on. A whole factor is required so that every
block is whole: no pixel is weighed twice or dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_factor(height: int, width: int, factor: Any, field: str) -> int:
    """`factor` as an int dividing `height` and `width`, or a ValueError naming `field`."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{field}={factor!r} must be a whole number from 1 (k: each frame "
                         "becomes k times smaller a side), e.g. 2")
    if height % factor or width % factor:
        fitting = [k for k in range(2, min(height, width) + 1)
                   if height % k == 0 and width % k == 0][:6]
        raise ValueError(f"{field}={factor} must divide the frame's height and width "
                         f"({height}x{width}) so that every {factor}x{factor} block is whole; "
                         f"factors that fit: {fitting or 'none but 1'}")
    return factor


def block_mean(frames: np.ndarray, factor: int) -> np.ndarray:
    """uint8 frames [N, H, W, C] -> [N, H/k, W/k, C]: each k x k block's mean, rounded half up."""
    if factor == 1:
        return frames
    n, height, width, channels = frames.shape
    blocks = frames.reshape(n, height // factor, factor, width // factor, factor, channels)
    area = factor * factor
    sums = blocks.sum(axis=(2, 4), dtype=np.int32)
    return ((sums + area // 2) // area).astype(np.uint8)


def block_mean_torch(frames: Any, factor: int) -> Any:
    """`block_mean` of a uint8 torch tensor [B, H, W, C], on its device."""
    import torch

    if factor == 1:
        return frames
    _, height, width, channels = frames.shape
    blocks = frames.reshape(-1, height // factor, factor, width // factor, factor, channels)
    area = factor * factor
    sums = blocks.sum(dim=(2, 4), dtype=torch.int32)
    return torch.div(sums + area // 2, area, rounding_mode="floor").to(torch.uint8)
