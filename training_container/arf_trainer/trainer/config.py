"""The train step's validated settings, where it writes, and the determinism switches.

Parsed once from the job spec before any distributed init (a bad spec fails at once on every
rank), then handed to the named parts of the loop (see loop.py).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arf_trainer import tracking
from arf_trainer.errors import SpecError, TrainingError
from arf_trainer.registry import parse_uri
from arf_trainer.spec import JobSpec, read_json
from arf_trainer.trainer.checkpoint import load_weights, state_dict_sha256
from arf_trainer.trainer.recipes import Hyperparameters, Recipe, get_recipe

log = logging.getLogger(__name__)

RESULT_KEYS = ("mlflow_run_id", "experiment_id", "weights", "weights_sha256", "metrics",
               "world_size", "steps", "recipe", "config_hash")
DATA_LOADING = ("auto", "stream", "memory")
PRECISIONS = ("fp32", "bf16")


class ConfigError(TrainingError):
    """training.recipe or the hyperparameters do not fit the recipe: bad input (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class TrainConfig:
    """The validated training settings taken from the job spec."""

    recipe: Recipe
    hp: Hyperparameters
    seed: int
    per_rank_batch_size: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    resolved: dict[str, Any]
    """template + hyperparameters + seed: stored in every checkpoint, hashed into config_hash."""
    config_hash: str
    base_model: str | None = None
    """model.base_model as written (models:/<name>@<alias> or /<version>); None: from scratch."""
    freeze_layers: int = 0
    data_loading: str = "auto"
    """training.data_loading: auto | stream | memory (see data.choose_loading)."""
    memory: str | None = None
    """training.resources.memory as written (the step's ceiling), or None."""
    precision: str = "fp32"
    """training.precision: fp32, or bf16 autocast of the forward pass and loss (accel.py)."""
    compile: bool = False
    """training.compile: train the core through torch.compile (accel.py)."""
    deterministic: bool = True
    """training.deterministic: deterministic kernels (the default), or the fastest ones."""
    async_checkpoint: bool = False
    """training.async_checkpoint: periodic checkpoints written by a thread (checkpoint.py)."""

    @classmethod
    def from_spec(cls, spec: JobSpec, world_size: int) -> "TrainConfig":
        training = spec.training
        base = spec.model.get("base_model") or None
        if base is not None:
            parse_uri(base)  # a malformed URI fails before any distributed init
        freeze_layers = training.get("freeze_layers") or 0
        if isinstance(freeze_layers, bool) or not isinstance(freeze_layers, int) \
                or freeze_layers < 0:
            raise SpecError(f"training.freeze_layers={freeze_layers!r} must be an integer >= 0")
        if freeze_layers and base is None:
            raise SpecError(f"training.freeze_layers={freeze_layers} needs model.base_model: "
                            "freezing freshly initialised layers trains nothing useful")
        loading = training.get("data_loading") or "auto"
        if loading not in DATA_LOADING:
            raise SpecError(f"training.data_loading={loading!r} is not one of "
                            f"{', '.join(DATA_LOADING)}; auto picks by the data's size")
        precision, switches = _speed_options(training)
        try:
            recipe = get_recipe(training.get("recipe"))
            hp = Hyperparameters.parse(recipe.name, spec.hyperparameters)
            per_rank_batch_size = hp.per_rank_batch_size(world_size)
        except TrainingError as exc:  # the template or the conf: a retry would fail the same
            raise ConfigError(str(exc)) from exc
        if not 0 <= spec.seed < 2**32 - world_size:
            raise SpecError(f"seed={spec.seed} must be in [0, 2**32 - world size) "
                                "(numpy's seed range); pick a smaller non-negative seed")
        resolved = {"template": spec.template, "hyperparameters": spec.hyperparameters,
                    "seed": spec.seed}
        return cls(
            recipe=recipe,
            hp=hp,
            seed=spec.seed,
            per_rank_batch_size=per_rank_batch_size,
            # Absent = the schema's defaults; an explicit 0 keep is refused by the Checkpointer.
            checkpoint_every_steps=_whole(training, "checkpoint_every_steps", 0),
            keep_checkpoints=_whole(training, "keep_checkpoints", 1),
            resolved=resolved,
            config_hash=tracking.sha256_json(resolved),
            base_model=base,
            freeze_layers=freeze_layers,
            data_loading=loading,
            memory=(training.get("resources") or {}).get("memory"),
            precision=precision,
            compile=switches["compile"],
            deterministic=switches["deterministic"],
            async_checkpoint=switches["async_checkpoint"],
        )


def _whole(training: dict[str, Any], name: str, default: int) -> int:
    """training.<name> as an int (absent or null: `default`); the Checkpointer checks bounds."""
    value = training.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"training.{name}={value!r} must be a whole number (a YAML integer, "
                        "not a string or fraction)")
    return value


def _speed_options(training: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    """training.precision and the switches .compile, .deterministic, .async_checkpoint, checked
    (absent: fp32, no compilation, deterministic, checkpoints written in the loop)."""
    precision = training.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise SpecError(f"training.precision={precision!r} is not one of {', '.join(PRECISIONS)}; "
                        "use bf16 for bfloat16 autocast, fp32 (the default) for full precision")
    switches = {name: training.get(name, default)
                for name, default in (("compile", False), ("deterministic", True),
                                      ("async_checkpoint", False))}
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise SpecError(f"training.{name}={value!r} must be true or false (a YAML boolean, "
                            "not a string or number)")
    return precision, switches


def train_dir_of(spec: JobSpec) -> str:
    """Where this training writes, relative to the workspace: ``train`` or a trial's folder."""
    folder = str(spec.inputs.get("train_dir") or "train")
    if Path(folder).is_absolute() or ".." in Path(folder).parts:
        raise SpecError(f"inputs.train_dir={folder!r} must be a relative folder inside the "
                        "workspace")
    return folder


def completed_result(workspace: Path, config_hash: str, train_dir: str = "train",
                     data_fingerprint: str | None = None) -> dict[str, Any] | None:
    """The result of an earlier, finished attempt of this step, if there is a valid one.

    A result trained on other prepared data (the prepare folder was redone by hand) is refused,
    not returned: it would register a model under the new data's lineage."""
    path = workspace / train_dir / "result.json"
    if not path.is_file():
        return None
    try:
        result = read_json(path)
    except ValueError:
        return None  # half-written by hand or a foreign tool: train again
    if not isinstance(result, dict) or any(key not in result for key in RESULT_KEYS):
        return None
    if result["config_hash"] != config_hash:
        raise TrainingError(
            f"{path} was produced by a different configuration (config_hash "
            f"{result['config_hash'][:12]}, this spec {config_hash[:12]}); one workspace holds "
            "one training: use a new DAG run, or delete the workspace's train/ folder"
        )
    trained_on = result.get("data_fingerprint")
    if data_fingerprint is not None and trained_on is not None and trained_on != data_fingerprint:
        raise TrainingError(
            f"{path} was trained on other prepared data (fingerprint {str(trained_on)[:12]}, "
            f"{workspace / 'prepare'} now holds {data_fingerprint[:12]}); one workspace holds "
            "one training: use a new DAG run, or delete the workspace's train/ folder"
        )
    weights = workspace / result["weights"]
    sha = state_dict_sha256(load_weights(weights)) if weights.is_file() else None
    if sha != result["weights_sha256"]:
        log.warning("%s exists but %s is missing or does not match its sha256; training again",
                    path, weights)
        return None
    return result


@contextmanager
def deterministic(threads: int | None, enabled: bool = True) -> Iterator[None]:
    """Enforce deterministic kernels, or (`enabled` False: training.deterministic: false) let
    torch pick the fastest ones and cuDNN autotune its convolutions. Restored afterwards:
    tests call run_train in-process."""
    if enabled:
        # cuBLAS only has deterministic GEMMs with a fixed workspace, set before CUDA starts.
        # (A run without it leaves the variable alone: cuBLAS then sizes its own workspace.)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(enabled)
    # Autotuning times candidate kernels on the device and keeps the fastest: a choice that
    # can differ from run to run, so only without determinism (same shapes every step here).
    torch.backends.cudnn.benchmark = not enabled
    if threads:
        # CPU reductions are split per thread, so the thread count is part of the recipe for
        # bit-identical weights; torchrun sets OMP_NUM_THREADS=1 unless told otherwise.
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
