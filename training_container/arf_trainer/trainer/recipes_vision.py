"""The vision recipe ``bc_pixels``: behaviour cloning from camera frames plus a state vector.

Data (data.py's batch interface): one feature column holds uint8 frames ``[H, W, 3]`` (a
fixed-shape array column, e.g. the `reach_pixels` table's ``image``); the other feature
columns (scalars or vectors) are flattened into the state vector; the targets are actions.
Frames stay uint8 from storage to the model (a quarter of the memory of float32, and what a
camera delivers); the model scales them to [-0.5, 0.5] itself, once, and refuses frames of
another dtype (a float copy would be scaled again, silently). Frames need at least
`MIN_FRAME_SIDE` pixels a side: below, the encoder's last map has one position along a side.

Model (`PixelPolicy`), self-contained for serving like the MLP recipes:

    forward(image uint8 [B, H, W, 3], state float32 [B, S]) -> actions float32 [B, A]

    frame -> conv 5x5/2 (16) -> conv 3x3/2 (32) -> conv 3x3 (32), ReLU between
          -> spatial softmax: the expected (x, y) image position of each channel's activation
    [keypoints, standardized state] -> MLP (hidden_size x num_layers) -> de-standardized action

Why spatial softmax: the policy must find a small target in the frame; a keypoint layer turns
"where is it" into coordinates directly (Levine et al. 2016, robomimic's default encoder), which
a flattening head would have to learn from many more parameters and demonstrations.

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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arf_trainer.errors import DataMismatchError, TrainingError
from arf_trainer.trainer.recipes import RECIPES, Hyperparameters, ModelInfo, Recipe

CONV_CHANNELS = (16, 32, 32)
IMAGE_KEY, STATE_KEY = "image", "state"


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


class PixelNet(nn.Module):
    """The trained core: {image uint8 NHWC, standardized state} -> standardized action."""

    def __init__(self, state_width: int, n_outputs: int, hidden_size: int,
                 num_layers: int) -> None:
        super().__init__()
        c1, c2, c3 = CONV_CHANNELS
        # A 64x64 frame: 32x32 -> 16x16 -> 16x16 maps, ~7 MFLOP a frame forward; the last
        # map keeps 16x16 positions for the keypoints (the target is ~3 pixels wide).
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=1, padding=1),
            SpatialSoftmax())
        layers: list[nn.Module] = []
        width = 2 * c3 + state_width
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            width = hidden_size
        layers.append(nn.Linear(width, n_outputs))
        self.head = nn.Sequential(*layers)

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        image = x[IMAGE_KEY]
        if image.dtype != torch.uint8:
            # Scaled here, once: a float frame (already in [0, 1], or 0..255 as float) would be
            # scaled again and give an action for a near-uniform frame, without an error.
            raise TypeError(f"bc_pixels takes frames as uint8 [B, H, W, 3] (0..255, scaled "
                            f"by the model itself), got {image.dtype} {list(image.shape)}: pass "
                            "the camera's uint8 frames, not a scaled float copy")
        # NHWC uint8 -> a channels_last NCHW view, scaled in the model (frames stay uint8 in
        # storage and on the way here).
        frames = image.permute(0, 3, 1, 2).float() * (1.0 / 255.0) - 0.5
        return self.head(torch.cat([self.encoder(frames), x[STATE_KEY]], dim=1))


class PixelPolicy(nn.Module):
    """Raw frames and state in, actions in data units out (normalization as buffers)."""

    def __init__(self, state_width: int, n_outputs: int, hidden_size: int,
                 num_layers: int, state_positions: Sequence[int] = ()) -> None:
        super().__init__()
        # Where the state values sit in the flattened feature vector that the loaders compute
        # statistics over (frames included); not state: only used to pick those statistics.
        self.state_positions = list(state_positions)
        self.register_buffer("state_mean", torch.zeros(state_width))
        self.register_buffer("state_std", torch.ones(state_width))
        self.register_buffer("output_mean", torch.zeros(n_outputs))
        self.register_buffer("output_std", torch.ones(n_outputs))
        self.net = PixelNet(state_width, n_outputs, hidden_size, num_layers)

    def forward(self, image: Any, state: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(image, Mapping):  # the training loop's validation passes its batch dict
            image, state = image[IMAGE_KEY], image[STATE_KEY]
        standardized = (state - self.state_mean) / self.state_std
        y = self.net({IMAGE_KEY: image, STATE_KEY: standardized})
        return y * self.output_std + self.output_mean


def _frame_column(features: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> str:
    frames = [name for name in features if len(shapes.get(name, ())) == 3
              and shapes[name][-1] == 3]
    if len(frames) != 1:
        described = {name: list(shapes.get(name, ())) for name in features}
        # A grayscale or RGBA column is an image column all the same: name its channels and
        # the decode shape that gives RGB, rather than ask for an image column.
        other = [name for name in features if len(shapes.get(name, ())) == 3]
        fix = "list one image column and the state columns"
        if not frames and other:
            name, shape = other[0], described[other[0]]
            fix = (f"column {name!r} holds {shape} per row ({shape[-1]} channels): store "
                   f"RGB frames, e.g. dataset.decode.{name} with shape {[*shape[:2], 3]} "
                   "(prepare converts grayscale and opaque RGBA images to RGB; images with "
                   "transparent pixels need compositing onto a background first)")
        raise DataMismatchError(
            f"recipe 'bc_pixels' needs exactly one feature column of RGB frames (uint8 "
            f"[H, W, 3], e.g. the reach_pixels table's image); dataset.features resolved to "
            f"{described} (per-row shapes): {fix}")
    return frames[0]


def _last_map(side: int) -> int:
    """Positions per side of the encoder's last feature map: two stride-2 convolutions each
    round a side up when they halve it, so ceil(side / 4)."""
    return (side + 3) // 4


# The keypoints need 2 positions a side of the last map (`_last_map(5) == 2`): with one,
# softmax weighs it 1 and that coordinate is the same for every frame (blind along that side).
MIN_FRAME_SIDE = 5


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
        image = _frame_column(features, shapes)
        height, width = (int(side) for side in shapes[image][:2])
        if min(height, width) < MIN_FRAME_SIDE:
            raise DataMismatchError(
                f"recipe 'bc_pixels': column {image!r} holds {height}x{width} frames (height x "
                f"width); its encoder's last map would be {_last_map(height)}x"
                f"{_last_map(width)} positions, and along a side of 1 the keypoints are the "
                "same for every frame, so the policy could not see along it. Use frames of at "
                f"least {MIN_FRAME_SIDE} pixels a side (dataset.decode shape, e.g. [64, 64, 3])")
        state_width = sum(int(np.prod(shapes.get(n, ()))) for n in features if n != image)
        n_outputs = sum(int(np.prod(shapes.get(n, ()))) for n in targets)
        arrays = {n: [int(s) for s in shapes[n]] for n in features if len(shapes.get(n, ()))}
        return ModelInfo(recipe=self.name, features=list(features), targets=list(targets),
                         hidden_size=hp.hidden_size, num_layers=hp.num_layers,
                         n_outputs=n_outputs, input_width=state_width, arrays=arrays)

    @staticmethod
    def frame(info: ModelInfo) -> tuple[str, list[int], list[str]]:
        """(image column, frame shape [H, W, 3], state columns) of a bc_pixels ModelInfo."""
        try:
            image = _frame_column(info.features, info.arrays or {})
        except TrainingError as exc:
            raise TrainingError(f"model_info of recipe 'bc_pixels' has no image column "
                                f"(arrays={info.arrays!r}): {exc}") from None
        return image, list(info.arrays[image]), [n for n in info.features if n != image]

    @staticmethod
    def state_positions(info: ModelInfo) -> list[int]:
        """Indices of the state values in the flattened feature vector (frames included)."""
        positions, offset = [], 0
        image, _, _ = PixelBehaviourCloning.frame(info)
        for name in info.features:
            width = int(np.prod((info.arrays or {}).get(name, ())))
            if name != image:
                positions.extend(range(offset, offset + width))
            offset += width
        return positions

    def build_model(self, info: ModelInfo) -> PixelPolicy:
        return PixelPolicy(int(info.input_width or 0), info.n_outputs, info.hidden_size,
                           info.num_layers, self.state_positions(info))

    def to_device(self, model: nn.Module, device: torch.device) -> None:
        """On CUDA the convolution weights go channels_last too: with the NHWC frames' view,
        cuDNN then runs NHWC kernels without converting the weights every step. On the CPU
        they stay as they are (the layout would change the kernels, and so the bits)."""
        model.to(device)
        if device.type == "cuda":
            model.net.encoder.to(memory_format=torch.channels_last)

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
        """The model's inputs {image: uint8 [N, H, W, 3], state: float32 [N, S]} of some rows."""
        from arf_trainer.trainer.data import feature_matrix

        image, shape, state = self.frame(info)
        frames = columns[image]
        if frames.dtype != np.uint8 or list(frames.shape[1:]) != shape:
            raise DataMismatchError(
                f"column {image!r} of the {split} split holds {frames.dtype} "
                f"{list(frames.shape[1:])} per row; recipe 'bc_pixels' (model_info) expects "
                f"uint8 {shape}: store frames as UTINYINT arrays of one size")
        return {IMAGE_KEY: torch.from_numpy(np.ascontiguousarray(frames)),
                STATE_KEY: torch.from_numpy(feature_matrix(columns, state)) if state
                else torch.zeros(len(frames), 0)}

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
        return ({IMAGE_KEY: x[IMAGE_KEY],
                 STATE_KEY: (state - on(state, model.state_mean)) / on(state, model.state_std)},
                (y - on(y, model.output_mean)) / on(y, model.output_std))

    def loss(self, model: PixelPolicy, outputs: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs / model.output_std, targets / model.output_std)

    def training_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def export_example(self, info: ModelInfo, columns: Mapping[str, np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The (image, state) example rows the pt2 export traces with (features only)."""
        x = self.inputs(info, columns, "example")
        return x[IMAGE_KEY].numpy(), x[STATE_KEY].numpy()



# -- registration (publisher.py): what the pt2 export traces with and what consumers read ----

def manifest_input(info: ModelInfo) -> dict[str, Any]:
    """The plugin manifest's `input` of a bc_pixels model: two positional tensors."""
    image, shape, state = PixelBehaviourCloning.frame(info)
    return {"features": info.features,
            "tensors": [{"name": IMAGE_KEY, "column": image, "dtype": "uint8",
                         "shape": [-1, *shape]},
                        {"name": STATE_KEY, "columns": state, "dtype": "float32",
                         "shape": [-1, int(info.input_width or 0)]}]}


def signature(info: ModelInfo) -> Any:
    """The MLflow signature (image uint8 [-1, H, W, 3], state float32 [-1, S]) -> actions; the
    evaluator reads the frame size from it (evaluator_pixels.frame_input)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    _, shape, _ = PixelBehaviourCloning.frame(info)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape), IMAGE_KEY),
                       TensorSpec(np.dtype(np.float32), (-1, int(info.input_width or 0)),
                                  STATE_KEY)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, info.n_outputs), "action")]))


def export_arguments(workspace: Any, info: ModelInfo, rows: int = 8) -> dict[str, Any]:
    """log_model's input_example (up to `rows` real rows, at least 2 so that torch.export keeps
    the batch dimension dynamic) and signature."""
    import pyarrow.parquet as pq

    from arf_trainer.errors import RegistryError
    from arf_trainer.spec import read_json
    from arf_trainer.trainer.data import read_table_columns

    prepare_dir = workspace / "prepare"
    if (workspace / "federate").is_dir() and not (prepare_dir / "manifest.json").exists():
        # A federated model: no site's rows leave it, so the export traces zeros of its shape
        # (as publisher.input_example does for the MLP recipes).
        _, shape, _ = PixelBehaviourCloning.frame(info)
        example = (np.zeros((2, *shape), dtype=np.uint8),
                   np.zeros((2, int(info.input_width or 0)), dtype=np.float32))
        return {"input_example": example, "signature": signature(info)}
    manifest = read_json(prepare_dir / "manifest.json")
    for split in ("val", "train"):
        for shard in manifest["shards"].get(split, []):
            if shard.get("rows", 0) >= 2:
                table = pq.read_table(prepare_dir / shard["path"], columns=info.features)
                columns = read_table_columns(table.slice(0, rows), info.features, "the example")
                recipe = PixelBehaviourCloning()
                return {"input_example": recipe.export_example(info, columns),
                        "signature": signature(info)}
    raise RegistryError(f"no shard in {prepare_dir / 'manifest.json'} has 2 rows for the input "
                        "example that the pt2 export needs to keep the batch dimension dynamic")


RECIPES[PixelBehaviourCloning.name] = PixelBehaviourCloning()
