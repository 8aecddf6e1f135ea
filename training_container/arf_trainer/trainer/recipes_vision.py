"""The vision recipe ``bc_pixels``: behaviour cloning from camera frames plus a state vector.

Data (data.py's batch interface): each camera is a feature column of uint8 frames ``[H, W, 3]``
(a fixed-shape array column, e.g. the `reach_pixels` table's ``image``, or a LeRobot dataset's
``observation.images.top`` and ``observation.images.wrist``); the other feature columns
(scalars or vectors) are flattened into the state vector; the targets are actions. Frames stay
uint8 from storage to the model (a quarter of the memory of float32, and what a camera
delivers); the model scales them to [-0.5, 0.5] itself, once, and refuses frames of another
dtype (a float copy would be scaled again, silently). Frames need at least `MIN_FRAME_SIDE`
pixels a side: below, the encoder's last map has one position along a side.

Model (`PixelPolicy`), self-contained for serving like the MLP recipes; cameras in the order of
`dataset.features`, each of its own size:

    forward(image uint8 [B, H, W, 3], state float32 [B, S],
            [image_1 uint8 [B, H1, W1, 3], ... up to MAX_CAMERAS]) -> actions float32 [B, A]

    each camera's frame -> its own encoder: conv 5x5/2 (16) -> conv 3x3/2 (32) -> conv 3x3 (32),
          ReLU between -> spatial softmax: the expected (x, y) image position of each channel
    [keypoints of every camera, standardized state] -> MLP (hidden_size x num_layers)
          -> de-standardized action

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
channels_last NCHW view; the convolutions run on it without a layout copy. On CUDA the
convolution weights are made channels_last as well (`to_device`), so cuDNN's NHWC kernels run
without converting them every step.

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
    action."""

    def __init__(self, state_width: int, n_outputs: int, hidden_size: int,
                 num_layers: int, cameras: int = 1) -> None:
        super().__init__()
        self.cameras = cameras
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
            # NHWC uint8 -> a channels_last NCHW view, scaled in the model (frames stay uint8
            # in storage and on the way here).
            keypoints.append(encoder(image.permute(0, 3, 1, 2).float() * (1.0 / 255.0) - 0.5))
        return self.head(torch.cat([*keypoints, x[STATE_KEY]], dim=1))


class PixelPolicy(nn.Module):
    """Raw frames and state in, actions in data units out (normalization as buffers)."""

    def __init__(self, state_width: int, n_outputs: int, hidden_size: int,
                 num_layers: int, state_positions: Sequence[int] = (),
                 cameras: int = 1) -> None:
        super().__init__()
        # Where the state values sit in the flattened feature vector that the loaders compute
        # statistics over (frames included); not state: only used to pick those statistics.
        self.state_positions = list(state_positions)
        self.register_buffer("state_mean", torch.zeros(state_width))
        self.register_buffer("state_std", torch.ones(state_width))
        self.register_buffer("output_mean", torch.zeros(n_outputs))
        self.register_buffer("output_std", torch.ones(n_outputs))
        self.net = PixelNet(state_width, n_outputs, hidden_size, num_layers, cameras)

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
    """A bc_pixels model's inputs: its camera columns and their frame shapes, in input order,
    and its state columns."""
    columns: list[str]
    shapes: list[list[int]]
    state: list[str]


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
        return self.describe_shapes(manifest.features, manifest.targets, hp, shapes)

    def describe_shapes(self, features: Sequence[str], targets: Sequence[str],
                        hp: Hyperparameters, shapes: Mapping[str, Sequence[int]]) -> ModelInfo:
        """The model's shape from the per-row shapes of the feature and target columns."""
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
        state_width = sum(int(np.prod(shapes.get(n, ()))) for n in features if n not in images)
        n_outputs = sum(int(np.prod(shapes.get(n, ()))) for n in targets)
        arrays = {n: [int(s) for s in shapes[n]] for n in features if len(shapes.get(n, ()))}
        return ModelInfo(recipe=self.name, features=list(features), targets=list(targets),
                         hidden_size=hp.hidden_size, num_layers=hp.num_layers,
                         n_outputs=n_outputs, input_width=state_width, arrays=arrays)

    @staticmethod
    def cameras(info: ModelInfo) -> Cameras:
        """The camera columns, their frame shapes [H, W, 3] and the state columns of a
        bc_pixels ModelInfo."""
        try:
            images = _frame_columns(info.features, info.arrays or {})
        except TrainingError as exc:
            raise TrainingError(f"model_info of recipe 'bc_pixels' has no image column "
                                f"(arrays={info.arrays!r}): {exc}") from None
        return Cameras(images, [list(info.arrays[n]) for n in images],
                       [n for n in info.features if n not in images])

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
        return PixelPolicy(int(info.input_width or 0), info.n_outputs, info.hidden_size,
                           info.num_layers, self.state_positions(info),
                           len(self.cameras(info).columns))

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

    def export_example(self, info: ModelInfo, columns: Mapping[str, np.ndarray]
                       ) -> tuple[np.ndarray, ...]:
        """The (image, state, [image_1, ...]) example rows the pt2 export traces with."""
        x = self.inputs(info, columns, "example")
        return tuple(x[name].numpy() for name in input_names(len(self.cameras(info).columns)))


RECIPES[PixelBehaviourCloning.name] = PixelBehaviourCloning()
