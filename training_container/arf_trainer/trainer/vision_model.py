"""The bc_pixels model (recipes_vision.py trains it): camera frames plus a state vector in,
actions out; self-contained for serving like the MLP recipes.

    PixelPolicy.forward(image uint8 [B, H, W, 3], state float32 [B, S],
                        [image_1 uint8 [B, H1, W1, 3], ... up to MAX_CAMERAS])
        -> actions float32 [B, A]

    each camera's frame -> its own encoder: conv 5x5/2 (16) -> conv 3x3/2 (32) -> conv 3x3 (32),
          ReLU between -> spatial softmax: the expected (x, y) image position of each channel
    [keypoints of every camera, standardized state] -> MLP (hidden_size x num_layers)
          -> de-standardized action

Cameras come in the order of `dataset.features`, each of its own size. Frames stay uint8 up to
here; the model scales them to [-0.5, 0.5] itself, once, and refuses frames of another dtype
(a float copy would be scaled again, silently). A camera whose frames prepare stored smaller
(`dataset.decode.<c>.downscale`) is taken either at that size (training) or at the camera's
(serving), which the model makes smaller by the same integer arithmetic (`arf_trainer.
downscale`), so a served policy sees exactly the frames it trained on.

Why spatial softmax: the policy must find a small target in the frame; a keypoint layer turns
"where is it" into coordinates directly (Levine et al. 2016, robomimic's default encoder), which
a flattening head would have to learn from many more parameters and demonstrations. Why one
encoder per camera, not one shared: a wrist and a scene camera see different things at
different scales (robomimic's default too), and the keypoints say which camera they came from
by their place in the head's input.

A one-camera model is the model from before several cameras: inputs (image, state), the first
camera's encoder ``net.encoder`` and the others' ``net.extra_encoders`` made after it, so its
parameters, their names and initial values, its checkpoints, registered champions (fine-tunes
load them) and bitwise re-runs are unchanged. More cameras come after the state.

channels_last: the frames arrive NHWC, so ``image.permute(0, 3, 1, 2)`` is already a
channels_last NCHW view; the convolutions run on it without a layout copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

CONV_CHANNELS = (16, 32, 32)
IMAGE_KEY, STATE_KEY = "image", "state"
# PixelPolicy.forward's camera parameters: ALOHA's four (two wrists, high, low) fit.
MAX_CAMERAS = 4


def camera_key(index: int) -> str:
    """The model's name of its `index`-th camera input: image, image_1, image_2, ... (the first
    keeps the one-camera models' name, which registered models and the evaluator use)."""
    return IMAGE_KEY if index == 0 else f"{IMAGE_KEY}_{index}"


class SpatialSoftmax(nn.Module):
    """[B, C, H, W] feature maps -> [B, 2C]: each channel's softmax-weighted (x, y) position,
    in [-1, 1] image coordinates."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        weights = torch.softmax(features.reshape(b, c, h * w), dim=-1).reshape(b, c, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=features.dtype)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=features.dtype)
        x = (weights.sum(dim=2) * xs).sum(dim=-1)
        y = (weights.sum(dim=3) * ys).sum(dim=-1)
        return torch.cat([x, y], dim=1)


def _encoder() -> nn.Sequential:
    c1, c2, c3 = CONV_CHANNELS
    # A 64x64 frame: 32x32 -> 16x16 -> 16x16 maps, ~7 MFLOP a frame forward; the last map
    # keeps 16x16 positions for the keypoints (the target is ~3 pixels wide).
    return nn.Sequential(
        nn.Conv2d(3, c1, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c3, 3, stride=1, padding=1),
        SpatialSoftmax())


class PixelNet(nn.Module):
    """The trained core: {image, image_1, ... uint8 NHWC, standardized state} -> standardized
    action. A camera stored `downscale` k times smaller (`arf_trainer.downscale`) is taken
    either as stored (training) or at the camera's full size (serving), which the net makes
    smaller itself, by the same integer block mean prepare used."""

    def __init__(self, state_width: int, n_outputs: int, hidden_size: int,
                 num_layers: int, frames: Sequence[tuple[int, int, int]] = ()) -> None:
        super().__init__()
        # Per camera: (stored height, stored width, downscale); empty: one camera whose frames
        # are taken as they come (the bare loops of bench/).
        self.frames = [tuple(f) for f in frames]
        cameras = self.cameras = max(1, len(self.frames))
        self.encoder = _encoder()
        if cameras > 1:  # absent for one camera: its parameters stay as they always were
            self.extra_encoders = nn.ModuleList(_encoder() for _ in range(cameras - 1))
        layers: list[nn.Module] = []
        width = 2 * CONV_CHANNELS[-1] * cameras + state_width
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            width = hidden_size
        layers.append(nn.Linear(width, n_outputs))
        self.head = nn.Sequential(*layers)

    def encoders(self) -> list[nn.Module]:
        return [self.encoder, *(self.extra_encoders if self.cameras > 1 else ())]

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        keypoints = []
        for index, encoder in enumerate(self.encoders()):
            image = x[camera_key(index)]
            if image.dtype != torch.uint8:
                # Scaled here, once: a float frame (already in [0, 1], or 0..255 as float)
                # would be scaled again and give an action for a near-uniform frame, without
                # an error.
                raise TypeError(f"bc_pixels takes frames as uint8 [B, H, W, 3] (0..255, "
                                f"scaled by the model itself), got {image.dtype} "
                                f"{list(image.shape)} for {camera_key(index)!r}: pass the "
                                "camera's uint8 frames, not a scaled float copy")
            image = self._stored(index, image)
            # NHWC uint8 -> a channels_last NCHW view, scaled in the model (frames stay uint8
            # in storage and on the way here).
            keypoints.append(encoder(image.permute(0, 3, 1, 2).float() * (1.0 / 255.0) - 0.5))
        return self.head(torch.cat([*keypoints, x[STATE_KEY]], dim=1))

    def _stored(self, index: int, image: torch.Tensor) -> torch.Tensor:
        """Camera `index`'s frames at the size the encoder trained on."""
        if not self.frames:
            return image
        height, width, factor = self.frames[index]
        size = (int(image.shape[1]), int(image.shape[2]))
        if size == (height, width):
            return image
        if factor > 1 and size == (height * factor, width * factor):
            from arf_trainer.downscale import block_mean_torch

            return block_mean_torch(image, factor)
        full = f" or the camera's {height * factor}x{width * factor}" if factor > 1 else ""
        raise TypeError(f"bc_pixels input {camera_key(index)!r} holds {size[0]}x{size[1]} "
                        f"frames (height x width); this model takes {height}x{width}{full}")


class PixelPolicy(nn.Module):
    """Raw frames and state in, actions in data units out (normalization as buffers)."""

    def __init__(self, state_width: int, n_outputs: int, hidden_size: int,
                 num_layers: int, state_positions: Sequence[int] = (),
                 frames: Sequence[tuple[int, int, int]] = ()) -> None:
        super().__init__()
        # Where the state values sit in the flattened feature vector that the loaders compute
        # statistics over (frames included); not state: only used to pick those statistics.
        self.state_positions = list(state_positions)
        self.register_buffer("state_mean", torch.zeros(state_width))
        self.register_buffer("state_std", torch.ones(state_width))
        self.register_buffer("output_mean", torch.zeros(n_outputs))
        self.register_buffer("output_std", torch.ones(n_outputs))
        self.net = PixelNet(state_width, n_outputs, hidden_size, num_layers, frames)

    def forward(self, image: Any, state: torch.Tensor | None = None,
                image_1: torch.Tensor | None = None, image_2: torch.Tensor | None = None,
                image_3: torch.Tensor | None = None) -> torch.Tensor:
        """model(image, state, [image_1, ...]), or model(batch dict) as the training loop's
        validation passes it. The parameters are spelled out, not *args: torch.export (as
        MLflow calls it) matches its dynamic shapes to the forward's parameters one by one."""
        if isinstance(image, Mapping):
            batch = image
            x = {key: value for key, value in batch.items() if key != STATE_KEY}
            state = batch[STATE_KEY]
        else:
            extra = [t for t in (image_1, image_2, image_3) if t is not None]
            x = {camera_key(i): t for i, t in enumerate([image, *extra])}
        if len(x) != self.net.cameras or state is None:
            names = ", ".join(input_names(self.net.cameras))
            raise TypeError(f"this bc_pixels model takes {names}: {self.net.cameras} camera "
                            f"frame batch(es) and the state; got {len(x)} frame batch(es) and "
                            f"{'no' if state is None else 'a'} state")
        standardized = (state - self.state_mean) / self.state_std
        y = self.net({**x, STATE_KEY: standardized})
        return y * self.output_std + self.output_mean


def input_names(cameras: int) -> list[str]:
    """The positional inputs of a bc_pixels model of `cameras` cameras, in order: image, state,
    image_1, ... (a one-camera model's (image, state) as it always was)."""
    return [IMAGE_KEY, STATE_KEY, *(camera_key(i) for i in range(1, cameras))]
