"""Built-in recipes: what model to build, how to turn target columns into tensors, which loss.

A template picks one with `training.recipe`:

``bc``          behaviour cloning: MLP regression obs -> action, MSE in standardized action units.
``classifier``  MLP classifier over one label column, cross-entropy, reports accuracy.

Both build an `MLP` that is self-contained for serving: it standardizes its inputs with the
training split's mean/std (stored as buffers, so they travel in the state_dict and in the
exported MLflow model) and, for ``bc``, maps its output back to the data's action units.
Contract used by the evaluator and the plugin manifest:

* ``bc``: float32 ``[B, n_features]`` -> float32 ``[B, n_targets]`` (actions, data units);
* ``classifier``: float32 ``[B, n_features]`` -> logits ``[B, n_classes]``; column ``i`` is the
  class ``ModelInfo.classes[i]`` (the sorted distinct training labels).

Templates that need anything else bring their own image and command instead of a recipe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arf_trainer.errors import DataMismatchError, TrainingError
from arf_trainer.trainer.hyperparameters import Hyperparameters

MODEL_INFO_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    """Everything needed to rebuild the module before loading its state_dict (model_info.json).

    The normalization statistics are buffers in the state_dict, not here.
    """

    recipe: str
    features: list[str]
    targets: list[str]
    hidden_size: int
    num_layers: int
    n_outputs: int
    classes: list[Any] | None = None
    format_version: int = MODEL_INFO_VERSION
    input_width: int | None = None
    """Width of the flattened feature vector when array columns make it differ from the
    number of feature columns; None: one value per column."""
    arrays: dict[str, list[int]] | None = None
    """Per-row shapes of the array feature columns of a recipe that takes arrays as they are
    (bc_pixels: its frames [H, W, 3], recipes_vision.py); None for the MLP recipes."""
    downscale: dict[str, int] | None = None
    """bc_pixels: cameras stored k times smaller a side (`dataset.decode.<c>.downscale`)."""

    @property
    def n_features(self) -> int:
        return self.input_width or len(self.features)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("input_width", "arrays", "downscale"):
            if data[optional] is None:
                del data[optional]  # files of scalar-column models stay as they were
        data["n_features"] = self.n_features
        data["input"] = {"dtype": "float32", "shape": [-1, self.n_features]}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelInfo":
        if data.get("format_version") != MODEL_INFO_VERSION:
            raise TrainingError(
                f"model_info.json has format_version={data.get('format_version')!r}; this "
                f"arf-trainer reads version {MODEL_INFO_VERSION}: register with the arf-trainer "
                "version that trained the model"
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _width(features: Sequence[str], width: int | None) -> int | None:
    return width if width is not None and width != len(features) else None


class MLP(nn.Module):
    """standardize(x) -> [Linear, ReLU] x num_layers -> Linear -> (optional) de-standardize.

    The statistics are buffers so that `state_dict()` (and torch.export) carries them: the
    registered model needs no preprocessing code on the serving side.
    """

    def __init__(self, n_inputs: int, n_outputs: int, hidden_size: int, num_layers: int,
                 denormalize_output: bool) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(n_inputs))
        self.register_buffer("input_std", torch.ones(n_inputs))
        layers: list[nn.Module] = []
        width = n_inputs
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            width = hidden_size
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)
        self.denormalize_output = denormalize_output
        if denormalize_output:
            self.register_buffer("output_mean", torch.zeros(n_outputs))
            self.register_buffer("output_std", torch.ones(n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net((x - self.input_mean) / self.input_std)
        if self.denormalize_output:
            y = y * self.output_std + self.output_mean
        return y


Stats = tuple[torch.Tensor, torch.Tensor]
"""(mean, std) per column, float32, constant columns with std 1."""


def stats_of(mean: np.ndarray, std: np.ndarray) -> Stats:
    std = np.where(std < 1e-6, 1.0, std)  # constant columns: no division by zero
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def mean_std(values: np.ndarray) -> Stats:
    """Column mean/std in float64 over a whole split (the in-memory loader's statistics)."""
    as64 = values.astype(np.float64, copy=False)
    return stats_of(as64.mean(axis=0), as64.std(axis=0))


class Recipe:
    """A built-in recipe. Subclasses define targets encoding, model shape, loss and metrics."""

    name: ClassVar[str]
    reports_accuracy: ClassVar[bool] = False
    fits_normalization: ClassVar[bool] = True
    """The loaders compute the training split's feature (and float target) statistics and
    call `set_normalization`; a recipe whose model normalizes by itself sets False."""
    target_labels: ClassVar[bool] = False
    """`describe` needs the distinct target values (a classifier): the streaming loader then
    collects them instead of target statistics."""

    def describe(self, features: Sequence[str], targets: Sequence[str], hp: Hyperparameters,
                 y_train: np.ndarray, feature_width: int | None = None) -> ModelInfo:
        """The model's shape. `y_train`: the training targets (the streaming loader passes
        their distinct values); `feature_width`: the flattened width of the feature columns
        when array columns make it differ from their number."""
        raise NotImplementedError

    def describe_data(self, manifest: Any, hp: Hyperparameters, labels: np.ndarray,
                      feature_width: int | None) -> ModelInfo:
        """`describe` from the prepared data (`data.Manifest`: its columns with their per-row
        shapes); a recipe that needs those shapes (bc_pixels) overrides this."""
        return self.describe(manifest.features, manifest.targets, hp, labels,
                             feature_width=feature_width)

    def columns_to_tensors(self, info: ModelInfo, columns: Mapping[str, np.ndarray],
                           split: str) -> tuple[Any, torch.Tensor]:
        """(model inputs, encoded targets) of some rows, given their columns by name in the
        stored dtype and shape (data.py's batch interface). Row-wise: called on whole splits
        and on windows of a stream alike. The MLP recipes flatten array columns into one
        float32 feature vector."""
        from arf_trainer.trainer.data import feature_matrix, target_matrix

        x = torch.from_numpy(feature_matrix(columns, info.features))
        return x, self.encode_targets(info, target_matrix(columns, info.targets), split)

    def encode_targets(self, info: ModelInfo, y: np.ndarray, split: str) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: MLP, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build_model(self, info: ModelInfo) -> MLP:
        """A model with identity normalization; load a state_dict or call `fit_normalization`."""
        return MLP(info.n_features, info.n_outputs, info.hidden_size, info.num_layers,
                   denormalize_output=info.classes is None)

    def to_device(self, model: nn.Module, device: torch.device) -> None:
        """Move the model to the run's device (a recipe may also pick a memory format there)."""
        model.to(device)

    def fit_normalization(self, model: MLP, x_train: np.ndarray, y_train: torch.Tensor) -> None:
        self.set_normalization(model, mean_std(x_train),
                               mean_std(y_train.numpy()) if y_train.is_floating_point() else None)

    def set_normalization(self, model: MLP, x_stats: Stats | None, y_stats: Stats | None) -> None:
        """Store the training split's statistics in the model's buffers. `x_stats` cover the
        feature columns flattened in order (what the loaders compute, `feature_matrix`)."""
        if x_stats is not None:
            model.input_mean.copy_(x_stats[0])
            model.input_std.copy_(x_stats[1])

    def normalized_inputs(self, x: Any) -> torch.Tensor:
        """``[N, k]``: the values of model inputs `x` (`columns_to_tensors`) that the model
        standardizes. A federation pools only their statistics (bc_pixels: the state, not every
        pixel of every frame); for the MLP recipes, the flattened feature vector."""
        return x.flatten(start_dim=1)

    def set_inputs_normalization(self, model: MLP, x_stats: Stats | None,
                                 y_stats: Stats | None) -> None:
        """`set_normalization` with `x_stats` over `normalized_inputs` (a federation's)."""
        self.set_normalization(model, x_stats, y_stats)

    # Training runs on the standardized core `model.net` with inputs (and, for regression,
    # targets) standardized once up front: the same objective as `loss(model, model(x), y)`,
    # without re-standardizing every batch inside the step (bench/harness_overhead.py).
    # Validation and serving use the whole model on raw data.

    @torch.no_grad()
    def training_tensors(self, model: MLP, x: torch.Tensor,
                         y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and targets `model.net` is trained on, given raw ones. They stay on the
        device of `x`/`y` (the host: batches move to the model's device one at a time), while
        the model may already sit on a GPU."""
        return (x - model.input_mean.to(x.device)) / model.input_std.to(x.device), y

    def training_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of `model.net`'s outputs against `training_tensors` targets."""
        raise NotImplementedError

    def augment(self, x: Any, hp: Hyperparameters, key: Sequence[int]) -> Any:
        """Training batch `x` (`training_tensors`' inputs, on the model's device) as the step
        trains on it. `key` (seed, rank, step) seeds any randomness, so that a re-run and a
        resumed run draw the same (bc_pixels: `random_shift`)."""
        return x


class BehaviourCloning(Recipe):
    name = "bc"

    def describe(self, features: Sequence[str], targets: Sequence[str], hp: Hyperparameters,
                 y_train: np.ndarray, feature_width: int | None = None) -> ModelInfo:
        width = y_train.shape[1] if y_train.ndim == 2 else len(targets)
        return ModelInfo(recipe=self.name, features=list(features), targets=list(targets),
                         hidden_size=hp.hidden_size, num_layers=hp.num_layers,
                         n_outputs=width, input_width=_width(features, feature_width))

    def encode_targets(self, info: ModelInfo, y: np.ndarray, split: str) -> torch.Tensor:
        try:
            return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise DataMismatchError(
                f"recipe 'bc' needs numeric target columns {info.targets}, but the {split} split "
                f"has values that are not numbers ({exc}); fix dataset.targets or the query"
            ) from exc

    def set_normalization(self, model: MLP, x_stats: Stats | None, y_stats: Stats | None) -> None:
        super().set_normalization(model, x_stats, y_stats)
        if y_stats is not None:
            model.output_mean.copy_(y_stats[0])
            model.output_std.copy_(y_stats[1])

    def loss(self, model: MLP, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # MSE in standardized action units, so that action dimensions with large ranges do
        # not dominate the loss; the model itself still outputs data units.
        return F.mse_loss(outputs / model.output_std, targets / model.output_std)

    @torch.no_grad()
    def training_tensors(self, model: MLP, x: torch.Tensor,
                         y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in, _ = super().training_tensors(model, x, y)
        return x_in, (y - model.output_mean.to(y.device)) / model.output_std.to(y.device)

    def training_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)


class Classifier(Recipe):
    name = "classifier"
    reports_accuracy = True
    target_labels = True

    def describe(self, features: Sequence[str], targets: Sequence[str], hp: Hyperparameters,
                 y_train: np.ndarray, feature_width: int | None = None) -> ModelInfo:
        if len(targets) != 1:
            raise DataMismatchError(
                f"recipe 'classifier' needs exactly one target column (the label); dataset.targets "
                f"resolved to {list(targets)}: list only the label column"
            )
        classes = np.unique(y_train.reshape(-1))
        if len(classes) < 2:
            raise DataMismatchError(
                f"recipe 'classifier' found {len(classes)} distinct label value(s) "
                f"{classes.tolist()} in the training split; it needs at least 2: check the query"
            )
        return ModelInfo(recipe=self.name, features=list(features), targets=list(targets),
                         hidden_size=hp.hidden_size, num_layers=hp.num_layers,
                         n_outputs=len(classes), classes=classes.tolist(),
                         input_width=_width(features, feature_width))

    def encode_targets(self, info: ModelInfo, y: np.ndarray, split: str) -> torch.Tensor:
        assert info.classes is not None  # set by describe() for this recipe
        classes = np.asarray(info.classes)
        labels = y.reshape(-1)
        index = np.searchsorted(classes, labels)
        known = (index < len(classes)) & (classes[np.minimum(index, len(classes) - 1)] == labels)
        if not known.all():
            unseen = sorted(set(labels[~known].tolist()))
            raise DataMismatchError(
                f"the {split} split has label value(s) {unseen[:5]} that do not occur in the "
                f"training split (classes {info.classes}); the classifier cannot score them: "
                "change the query or the validation_split"
            )
        return torch.from_numpy(index.astype(np.int64))

    def loss(self, model: MLP, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def training_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)


RECIPES: dict[str, Recipe] = {r.name: r for r in (BehaviourCloning(), Classifier())}
# Recipes in modules of their own, which build on this one: imported on first use.
EXTRA_RECIPES = {"bc_pixels": "arf_trainer.trainer.recipes_vision"}


def get_recipe(name: str | None) -> Recipe:
    if name in EXTRA_RECIPES and name not in RECIPES:
        import importlib

        importlib.import_module(EXTRA_RECIPES[name])  # registers itself in RECIPES
    if name is None:
        raise TrainingError(
            "the template has no training.recipe; the built-in trainer runs recipes "
            f"{sorted({*RECIPES, *EXTRA_RECIPES})} only. Set training.recipe, or give "
            "training.command to run a custom image (that path does not call the built-in "
            "trainer)"
        )
    try:
        return RECIPES[name]
    except KeyError:
        raise TrainingError(
            f"training.recipe={name!r} is not a built-in recipe; choose one of "
            f"{sorted({*RECIPES, *EXTRA_RECIPES})}"
        ) from None
