"""The vision recipe ``bc_pixels``: behaviour cloning from camera frames plus a state vector.

Data (data.py's batch interface): each camera is a feature column of uint8 frames ``[H, W, 3]``
(a fixed-shape array column, e.g. the `reach_pixels` table's ``image``, or a LeRobot dataset's
``observation.images.top`` and ``observation.images.wrist``); the other feature columns
(scalars or vectors) are flattened into the state vector; the targets are actions. Frames stay
uint8 from storage to the model (a quarter of the memory of float32, and what a camera
delivers). Frames need at least `MIN_FRAME_SIDE` pixels a side as stored: below, the encoder's
last map has one position along a side.

The model is `vision_model.PixelPolicy` (one encoder per camera, spatial-softmax keypoints, an
MLP head). On CUDA the convolution weights are made channels_last (`to_device`), so cuDNN's
NHWC kernels run on the frames' NHWC view without converting them every step.

Training follows the MLP recipes (recipes.py): the loop trains `model.net` on inputs prepared
once by `training_tensors` (frames as they are, state and actions standardized with the
training split's statistics, kept as buffers of the model), with MSE in standardized action
units; validation and serving use the whole model on raw inputs. A federation pools the sites'
statistics of the state and actions only (`normalized_inputs`): frames need none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arf_trainer.errors import DataMismatchError, TrainingError
from arf_trainer.trainer.recipes import RECIPES, Hyperparameters, ModelInfo, Recipe
from arf_trainer.trainer.vision_model import (MAX_CAMERAS, STATE_KEY, PixelPolicy, camera_key,
                                              input_names)

def _frame_columns(features: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """The camera columns among `features`, in their order: every column of 3-d rows, which
    must be RGB (a grey or RGBA one is named with the decode shape that gives RGB)."""
    described = {name: list(shapes.get(name, ())) for name in features}
    images = [name for name in features if len(described[name]) == 3]
    other = [name for name in images if described[name][-1] != 3]
    if images and not other:
        return images
    fix = "list one or more image columns and the state columns"
    if other:
        # A grayscale or RGBA column is an image column all the same: name its channels and
        # the decode shape that gives RGB, rather than ask for an image column.
        name, shape = other[0], described[other[0]]
        fix = (f"column {name!r} holds {shape} per row ({shape[-1]} channels): store "
               f"RGB frames, e.g. dataset.decode.{name} with shape {[*shape[:2], 3]} "
               "(prepare converts grayscale and opaque RGBA images to RGB; images with "
               "transparent pixels need compositing onto a background first)")
    raise DataMismatchError(
        f"recipe 'bc_pixels' needs one or more feature columns of RGB frames (uint8 "
        f"[H, W, 3], e.g. the reach_pixels table's image), one per camera; dataset.features "
        f"resolved to {described} (per-row shapes): {fix}")


def _last_map(side: int) -> int:
    """Positions per side of the encoder's last feature map: two stride-2 convolutions each
    round a side up when they halve it, so ceil(side / 4)."""
    return (side + 3) // 4


# The keypoints need 2 positions a side of the last map (`_last_map(5) == 2`): with one,
# softmax weighs it 1 and that coordinate is the same for every frame (blind along that side).
MIN_FRAME_SIDE = 5


class Cameras(NamedTuple):
    """A bc_pixels model's inputs: its camera columns, their frame shapes as stored (what
    training feeds) and as the camera gives them (what serving feeds: larger by the column's
    downscale), in input order, and its state columns."""
    columns: list[str]
    shapes: list[list[int]]
    state: list[str]
    served: list[list[int]]
    downscale: list[int]


class PixelBehaviourCloning(Recipe):
    name = "bc_pixels"

    def describe_data(self, manifest: Any, hp: Hyperparameters, labels: np.ndarray,
                      feature_width: int | None) -> ModelInfo:
        """The model's shape from the manifest's per-row column shapes (prepare records them)."""
        shapes = {c["name"]: c.get("shape") for c in manifest.raw.get("columns", [])}
        missing = [n for n in manifest.features + manifest.targets if shapes.get(n) is None]
        if missing:
            raise DataMismatchError(
                f"the prepared data ({manifest.path}) records no fixed shape for column(s) "
                f"{missing}; recipe 'bc_pixels' needs scalar or fixed-shape array columns: "
                "rerun prepare with this arf-trainer, or cast the columns in the query")
        decode = manifest.raw.get("decode") or {}
        factors = {name: int(entry.get("downscale", 1)) for name, entry in decode.items()}
        return self.describe_shapes(manifest.features, manifest.targets, hp, shapes, factors)

    def describe_shapes(self, features: Sequence[str], targets: Sequence[str],
                        hp: Hyperparameters, shapes: Mapping[str, Sequence[int]],
                        downscale: Mapping[str, int] | None = None) -> ModelInfo:
        """The model's shape from the per-row shapes of the feature and target columns (and
        the cameras' downscale factors: the shapes are those stored)."""
        images = _frame_columns(features, shapes)
        if len(images) > MAX_CAMERAS:
            raise DataMismatchError(
                f"recipe 'bc_pixels' takes up to {MAX_CAMERAS} cameras (an encoder each); "
                f"dataset.features hold {len(images)} frame columns {images}: keep at most "
                f"{MAX_CAMERAS} of them in dataset.features")
        for image in images:
            height, width = (int(side) for side in shapes[image][:2])
            if min(height, width) < MIN_FRAME_SIDE:
                raise DataMismatchError(
                    f"recipe 'bc_pixels': column {image!r} holds {height}x{width} frames "
                    f"(height x width); its encoder's last map would be {_last_map(height)}x"
                    f"{_last_map(width)} positions, and along a side of 1 the keypoints are the "
                    "same for every frame, so the policy could not see along it. Use frames of "
                    f"at least {MIN_FRAME_SIDE} pixels a side (dataset.decode shape, e.g. "
                    "[64, 64, 3])")
            if hp.random_shift >= min(height, width):
                raise DataMismatchError(
                    f"hyperparameter random_shift={hp.random_shift} is not smaller than the "
                    f"{height}x{width} frames of column {image!r} (as stored): a shift of a "
                    "whole side leaves only its border. Use a few pixels (e.g. 4 at 64x64)")
        state_width = sum(int(np.prod(shapes.get(n, ()))) for n in features if n not in images)
        n_outputs = sum(int(np.prod(shapes.get(n, ()))) for n in targets)
        arrays = {n: [int(s) for s in shapes[n]] for n in features if len(shapes.get(n, ()))}
        factors = {n: int(k) for n, k in (downscale or {}).items() if n in images and k > 1}
        return ModelInfo(recipe=self.name, features=list(features), targets=list(targets),
                         hidden_size=hp.hidden_size, num_layers=hp.num_layers,
                         n_outputs=n_outputs, input_width=state_width, arrays=arrays,
                         downscale=factors or None)

    @staticmethod
    def cameras(info: ModelInfo) -> Cameras:
        """The camera columns, their frame shapes [H, W, 3] and the state columns of a
        bc_pixels ModelInfo."""
        try:
            images = _frame_columns(info.features, info.arrays or {})
        except TrainingError as exc:
            raise TrainingError(f"model_info of recipe 'bc_pixels' has no image column "
                                f"(arrays={info.arrays!r}): {exc}") from None
        shapes = [list(info.arrays[n]) for n in images]
        factors = [int((info.downscale or {}).get(n, 1)) for n in images]
        return Cameras(images, shapes, [n for n in info.features if n not in images],
                       [[h * k, w * k, c] for (h, w, c), k in zip(shapes, factors)], factors)

    @staticmethod
    def state_positions(info: ModelInfo) -> list[int]:
        """Indices of the state values in the flattened feature vector (frames included)."""
        positions, offset = [], 0
        images = PixelBehaviourCloning.cameras(info).columns
        for name in info.features:
            width = int(np.prod((info.arrays or {}).get(name, ())))
            if name not in images:
                positions.extend(range(offset, offset + width))
            offset += width
        return positions

    def build_model(self, info: ModelInfo) -> PixelPolicy:
        cameras = self.cameras(info)
        frames = [(h, w, k) for (h, w, _), k in zip(cameras.shapes, cameras.downscale)]
        return PixelPolicy(int(info.input_width or 0), info.n_outputs, info.hidden_size,
                           info.num_layers, self.state_positions(info), frames)

    def to_device(self, model: nn.Module, device: torch.device) -> None:
        """On CUDA the convolution weights go channels_last too: with the NHWC frames' view,
        cuDNN then runs NHWC kernels without converting the weights every step. On the CPU
        they stay as they are (the layout would change the kernels, and so the bits)."""
        model.to(device)
        if device.type == "cuda":
            for encoder in model.net.encoders():
                encoder.to(memory_format=torch.channels_last)

    def columns_to_tensors(self, info: ModelInfo, columns: Mapping[str, np.ndarray],
                           split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from arf_trainer.trainer.data import feature_matrix

        x = self.inputs(info, columns, split)
        try:
            y = feature_matrix(columns, info.targets)
        except TrainingError as exc:
            raise DataMismatchError(f"recipe 'bc_pixels' needs numeric target columns "
                                f"{info.targets} in the {split} split: {exc}") from exc
        return x, torch.from_numpy(y)

    def inputs(self, info: ModelInfo, columns: Mapping[str, np.ndarray],
               split: str) -> dict[str, torch.Tensor]:
        """The model's inputs {image: uint8 [N, H, W, 3], image_1: ..., state: float32 [N, S]}
        of some rows."""
        from arf_trainer.trainer.data import feature_matrix

        cameras = self.cameras(info)
        x = {}
        for index, (image, shape) in enumerate(zip(cameras.columns, cameras.shapes)):
            frames = columns[image]
            if frames.dtype != np.uint8 or list(frames.shape[1:]) != shape:
                raise DataMismatchError(
                    f"column {image!r} of the {split} split holds {frames.dtype} "
                    f"{list(frames.shape[1:])} per row; recipe 'bc_pixels' (model_info) "
                    f"expects uint8 {shape}: store frames as UTINYINT arrays of one size")
            x[camera_key(index)] = torch.from_numpy(np.ascontiguousarray(frames))
        rows = len(columns[cameras.columns[0]])
        x[STATE_KEY] = (torch.from_numpy(feature_matrix(columns, cameras.state))
                        if cameras.state else torch.zeros(rows, 0))
        return x

    def set_normalization(self, model: PixelPolicy, x_stats: Any, y_stats: Any) -> None:
        """x_stats cover the flattened features in order: keep the state columns' part."""
        state_stats = None
        if x_stats is not None and model.state_positions:
            index = torch.tensor(model.state_positions)
            state_stats = (x_stats[0][index], x_stats[1][index])
        self.set_inputs_normalization(model, state_stats, y_stats)

    def normalized_inputs(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The state: frames are scaled by a constant in the model and need no statistics."""
        return x[STATE_KEY]

    def set_inputs_normalization(self, model: PixelPolicy, x_stats: Any, y_stats: Any) -> None:
        """x_stats cover the state vector (`normalized_inputs`)."""
        if x_stats is not None and model.state_positions:
            model.state_mean.copy_(x_stats[0])
            model.state_std.copy_(x_stats[1])
        if y_stats is not None:
            model.output_mean.copy_(y_stats[0])
            model.output_std.copy_(y_stats[1])

    @torch.no_grad()
    def training_tensors(self, model: PixelPolicy, x: Mapping[str, torch.Tensor],
                         y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        def on(t: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
            return buffer.to(t.device)

        state = x[STATE_KEY]
        frames = {key: value for key, value in x.items() if key != STATE_KEY}
        return ({**frames,
                 STATE_KEY: (state - on(state, model.state_mean)) / on(state, model.state_std)},
                (y - on(y, model.output_mean)) / on(y, model.output_std))

    def loss(self, model: PixelPolicy, outputs: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs / model.output_std, targets / model.output_std)

    def training_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def augment(self, x: Mapping[str, torch.Tensor], hp: Hyperparameters,
                key: Sequence[int]) -> Mapping[str, torch.Tensor]:
        """Each camera's frames shifted by up to `random_shift` pixels (`augment.py`), each
        camera by its own draws."""
        if not hp.random_shift:
            return x
        from arf_trainer.trainer.augment import random_shift

        cameras = [camera_key(index) for index in range(len(x) - 1)]  # all but the state
        return {**x, **{name: random_shift(x[name], hp.random_shift, [*key, index])
                        for index, name in enumerate(cameras)}}

    def export_example(self, info: ModelInfo, columns: Mapping[str, np.ndarray]
                       ) -> tuple[np.ndarray, ...]:
        """The (image, state, [image_1, ...]) example rows the pt2 export traces with."""
        x = self.inputs(info, columns, "example")
        return tuple(x[name].numpy() for name in input_names(len(self.cameras(info).columns)))


RECIPES[PixelBehaviourCloning.name] = PixelBehaviourCloning()
