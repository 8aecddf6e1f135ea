"""`arf-trainer train`: parse -> validate -> build -> train -> close, in the shape of torchtitan's
train.py, for the built-in recipes (`training.recipe`: bc, classifier).

Runs as one process or under torchrun (DDP; gloo on CPU, NCCL on GPU). Reads the prepare step's
manifest and Parquet shards, writes under ``<workspace>/train/``::

    checkpoints/step-N/   see checkpoint.py; a retried task resumes from the highest one
    base_model/           a fine-tune's base (model.base_model), resolved once and pinned:
                          base_model.json, model.pt, model_info.json (see base_model.py)
    model.pt              final state_dict (CPU tensors, sorted keys)
    model_info.json       what the register step needs to rebuild the module (ModelInfo)
    result.json           written last; its presence with valid weights means "done"

Determinism: the same spec, data, world size and OMP_NUM_THREADS give bit-identical weights.
Everything is seeded from the spec's seed (+rank for per-rank streams), deterministic
algorithms are enforced, the batch sampler is seeded per epoch, the DataLoader's own generator
is seeded, and data loading stays in the main process (num_workers=0).

Preemption: SIGTERM (Kubernetes, spot instances, torchrun forwarding it) makes every rank
finish its current step, agree to stop after the same step (one tiny all_reduce every ~0.25 s
of training), save a checkpoint and exit 75 (`Preempted`) within ARF_PREEMPTION_GRACE_S;
rerunning the same command resumes bit-identically. See arf_trainer.preemption.

Rank 0 alone tracks: one MLflow run per DAG run (resumed on retry), params, the
reproducibility record as ``arf.*`` tags, per-epoch metrics and the dataset lineage. It writes
them to a spool in the workspace that a background thread sends to MLflow, so an MLflow outage
neither stalls nor fails training and loses nothing (see arf_trainer.tracking_spool).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler, TensorDataset

from arf_trainer import __version__, tracking
from arf_trainer.errors import PREEMPTED_EXIT, Preempted, SpecError, TrainingError
from arf_trainer.preemption import GRACE_ENV, PreemptionGuard, sigterm_guard
from arf_trainer.spec import JobSpec, StepEnv, read_json, write_json_atomic
from arf_trainer.tracking_spool import TrackingSpool
from arf_trainer.trainer import base_model, dist
from arf_trainer.trainer.checkpoint import (
    Checkpointer,
    capture_rng_state,
    cpu_state_dict,
    load_weights,
    restore_rng_state,
    save_weights,
    state_dict_sha256,
)
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.recipes import MLP, Hyperparameters, ModelInfo, Recipe, get_recipe
from arf_trainer.trainer.testhooks import TestHooks

log = logging.getLogger(__name__)

RESULT_KEYS = ("mlflow_run_id", "experiment_id", "weights", "weights_sha256", "metrics",
               "world_size", "steps", "recipe", "config_hash")
EVAL_CHUNK = 4096


# -- parse + validate ------------------------------------------------------------------------

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

    @classmethod
    def from_spec(cls, spec: JobSpec, world_size: int) -> "TrainConfig":
        training = spec.training
        base = spec.model.get("base_model") or None
        if base is not None:
            base_model.parse_uri(base)  # a malformed URI fails before any distributed init
        freeze_layers = training.get("freeze_layers") or 0
        if isinstance(freeze_layers, bool) or not isinstance(freeze_layers, int) \
                or freeze_layers < 0:
            raise SpecError(f"training.freeze_layers={freeze_layers!r} must be an integer >= 0")
        if freeze_layers and base is None:
            raise SpecError(f"training.freeze_layers={freeze_layers} needs model.base_model: "
                            "freezing freshly initialised layers trains nothing useful")
        recipe = get_recipe(training.get("recipe"))
        hp = Hyperparameters.parse(recipe.name, spec.hyperparameters)
        if not 0 <= spec.seed < 2**32 - world_size:
            raise TrainingError(f"seed={spec.seed} must be in [0, 2**32 - world size) "
                                "(numpy's seed range); pick a smaller non-negative seed")
        resolved = {"template": spec.template, "hyperparameters": spec.hyperparameters,
                    "seed": spec.seed}
        return cls(
            recipe=recipe,
            hp=hp,
            seed=spec.seed,
            per_rank_batch_size=hp.per_rank_batch_size(world_size),
            # Absent = the schema's defaults; an explicit 0 keep is refused by the Checkpointer.
            checkpoint_every_steps=int(training.get("checkpoint_every_steps") or 0),
            keep_checkpoints=int(1 if training.get("keep_checkpoints") is None
                                 else training["keep_checkpoints"]),
            resolved=resolved,
            config_hash=tracking.sha256_json(resolved),
            base_model=base,
            freeze_layers=freeze_layers,
        )


@dataclass(frozen=True)
class TrainData:
    """The prepare step's splits, in memory: float32 features, raw target columns."""

    manifest: dict[str, Any]
    manifest_path: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def features(self) -> list[str]:
        return list(self.manifest["features"])

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_split(prepare_dir: Path, manifest: dict[str, Any], split: str,
                columns: list[str]) -> list[np.ndarray]:
    """One array per column, concatenated over the split's shards (sha256-checked)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for shard in manifest["shards"].get(split, []):
        path = prepare_dir / shard["path"]
        if not path.is_file():
            raise TrainingError(f"shard {path} listed in the manifest is missing; rerun prepare")
        if shard.get("sha256") and _file_sha256(path) != shard["sha256"]:
            raise TrainingError(f"shard {path} does not match its sha256 in the manifest: the "
                                "prepared data changed after prepare ran; rerun prepare")
        try:
            tables.append(pq.read_table(path, columns=columns))
        except (pa.ArrowInvalid, KeyError) as exc:
            raise TrainingError(f"cannot read columns {columns} from shard {path}: {exc}") from exc
    if not tables:
        return [np.empty(0) for _ in columns]
    table = pa.concat_tables(tables)
    arrays = []
    for name in columns:
        column = table.column(name)
        if column.null_count:
            raise TrainingError(f"column {name!r} has {column.null_count} null value(s) in the "
                                f"{split} split; filter or fill them in the dataset query")
        arrays.append(column.to_numpy())
    return arrays


def load_data(prepare_dir: Path) -> TrainData:
    manifest_path = prepare_dir / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingError(f"no prepared data at {manifest_path}; the prepare step must run "
                            "first in the same workspace")
    manifest = read_json(manifest_path)
    try:
        features, targets = list(manifest["features"]), list(manifest["targets"])
        splits = {split: _read_split(prepare_dir, manifest, split, features + targets)
                  for split in ("train", "val")}
    except KeyError as exc:
        raise TrainingError(f"manifest {manifest_path} lacks the field {exc.args[0]!r}; "
                            "rerun prepare with a matching arf-trainer") from exc
    if not features or not targets:
        raise TrainingError(f"manifest {manifest_path} has features={features} and "
                            f"targets={targets}; both must be non-empty (dataset.features/targets)")
    n = len(features)

    def features_of(arrays: list[np.ndarray]) -> np.ndarray:
        try:
            return np.stack(arrays[:n], axis=1).astype(np.float32)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"feature columns {features} must be numeric ({exc}); "
                                "cast or drop them in the dataset query") from exc

    train, val = splits["train"], splits["val"]
    if len(train[0]) == 0:
        raise TrainingError(f"the training split in {manifest_path} has no rows; the dataset "
                            "query selected nothing, or validation_split took every row")
    return TrainData(manifest=manifest, manifest_path=manifest_path,
                     x_train=features_of(train), y_train=np.stack(train[n:], axis=1),
                     x_val=features_of(val), y_val=np.stack(val[n:], axis=1))


def train_dir_of(spec: JobSpec) -> str:
    """Where this training writes, relative to the workspace: ``train`` or a trial's folder."""
    folder = str(spec.inputs.get("train_dir") or "train")
    if Path(folder).is_absolute() or ".." in Path(folder).parts:
        raise SpecError(f"inputs.train_dir={folder!r} must be a relative folder inside the "
                        "workspace")
    return folder


def completed_result(workspace: Path, config_hash: str,
                     train_dir: str = "train") -> dict[str, Any] | None:
    """The result of an earlier, finished attempt of this step, if there is a valid one."""
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
    weights = workspace / result["weights"]
    sha = state_dict_sha256(load_weights(weights)) if weights.is_file() else None
    if sha != result["weights_sha256"]:
        log.warning("%s exists but %s is missing or does not match its sha256; training again",
                    path, weights)
        return None
    return result


# -- build -----------------------------------------------------------------------------------

@contextmanager
def deterministic(threads: int | None) -> Iterator[None]:
    """Enforce deterministic kernels (restored afterwards: tests call run_train in-process)."""
    # cuBLAS only has deterministic GEMMs with a fixed workspace, set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    if threads:
        # CPU reductions are split per thread, so the thread count is part of the recipe for
        # bit-identical weights; torchrun sets OMP_NUM_THREADS=1 unless told otherwise.
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class ShardedBatchSampler(Sampler[torch.Tensor]):
    """This rank's batches of an epoch, as index tensors: exactly the batches of
    ``BatchSampler(DistributedSampler(n, world_size, rank, shuffle=True, seed=seed),
    batch_size, drop_last=False)`` after ``set_epoch(epoch)``, computed without Python lists.

    TensorDataset then slices each batch with one tensor index. DistributedSampler builds a
    Python list of every index each epoch and BatchSampler hands out lists that each
    TensorDataset indexing converts back into a tensor: ~30 us a step, 2% of a small MLP's
    step on one CPU core (bench/harness_overhead.py). tests/unit/test_trainer.py checks the
    equality with torch's samplers.
    """

    def __init__(self, n: int, world_size: int, rank: int, batch_size: int, seed: int) -> None:
        if n <= 0 or batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatchSampler(n={n}, world_size={world_size}, rank={rank}, "
                             f"batch_size={batch_size}): need n, batch_size > 0 and a valid rank")
        self.n, self.world_size, self.rank = n, world_size, rank
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        total = self.per_rank * self.world_size
        if total > self.n:  # pad by repeating the permutation from its start, as torch does
            order = order.repeat(math.ceil(total / self.n))[:total]
        yield from torch.split(order[self.rank:total:self.world_size], self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)


@dataclass
class Progress:
    """Where training stands; what a checkpoint must restore besides weights and optimizer."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    """Batches of `epoch` already trained (a resumed run skips them)."""
    loss_sum: float = 0.0
    """This rank's summed per-sample training loss in `epoch` (for the epoch's mean)."""
    samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    """The last finished epoch's metrics."""


def _epoch_line(progress: Progress, epochs: int, total_steps: int, rate: float,
                seconds_per_step: float) -> str:
    eta = timedelta(seconds=round(seconds_per_step * (total_steps - progress.step)))
    values = " | ".join(f"{k} {v:.4f}" for k, v in progress.metrics.items() if k != "epoch")
    return (f"epoch {progress.epoch}/{epochs} | step {progress.step}/{total_steps} | {values} | "
            f"{rate:,.0f} samples/s | ETA {eta}")


@torch.no_grad()
def evaluate(recipe: Recipe, model: MLP, x: torch.Tensor, y: torch.Tensor, denv: DistEnv,
             device: torch.device) -> dict[str, float]:
    """Validation loss (and accuracy) over the whole val split: each rank scores every
    world_size-th row, then the sums are all-reduced (exact: no sampler padding)."""
    model.eval()
    x, y = x[denv.rank::denv.world_size], y[denv.rank::denv.world_size]
    loss_sum = correct = 0.0
    for start in range(0, len(x), EVAL_CHUNK):
        xb, yb = x[start:start + EVAL_CHUNK].to(device), y[start:start + EVAL_CHUNK].to(device)
        out = model(xb)
        loss_sum += recipe.loss(model, out, yb).item() * len(yb)
        if recipe.reports_accuracy:
            correct += (out.argmax(dim=1) == yb).sum().item()
    loss_sum, n, correct = dist.all_reduce_sum(denv, [loss_sum, float(len(x)), correct], device)
    if n == 0:
        return {}
    metrics = {"val_loss": loss_sum / n}
    if recipe.reports_accuracy:
        metrics["val_accuracy"] = correct / n
    return metrics


# -- MLflow (rank 0) -------------------------------------------------------------------------

def run_keys(spec: JobSpec) -> tuple[str, str | None]:
    """(this training's MLflow run key, its parent's key or None).

    A study's trial has its own run, nested under the study's parent run; the final training
    of an hpo template keeps the DAG run's key (register finds it) and nests under the parent.
    """
    key = tracking.dag_run_key(spec.run.dag_id, spec.run.run_id)
    hpo = spec.inputs.get("hpo")
    if not hpo:
        return key, None
    parent = f"{key}/study"
    if "trial_number" in hpo:
        return f"{key}/trial-{int(hpo['trial_number'])}", parent
    return key, parent


def reproducibility_tags(spec: JobSpec, config_hash: str, data: TrainData,
                         world_size: int) -> dict[str, str]:
    code_version = {"arf_trainer": __version__, **spec.code_version}
    tables = {name: t.get("version") for name, t in data.manifest.get("tables", {}).items()}
    hpo = spec.inputs.get("hpo") or {}
    hpo_tags = {"arf.hpo.study": str(hpo["study"])} if hpo else {}
    if "trial_number" in hpo:
        hpo_tags["arf.hpo.trial_number"] = str(hpo["trial_number"])
    if "best_trial" in hpo:
        hpo_tags["arf.hpo.best_trial"] = str(hpo["best_trial"])
    return {
        **hpo_tags,
        "arf.template": spec.name,
        "arf.template_sha256": spec.template_sha256,
        "arf.dag_id": spec.run.dag_id,
        "arf.dag_run_id": spec.run.run_id,
        "arf.dag_run": run_keys(spec)[0],
        "arf.config_hash": config_hash,
        "arf.code_version": tracking.canonical_json(code_version),
        "arf.torch_version": torch.__version__,
        "arf.world_size": str(world_size),
        "arf.data_fingerprint": str(data.manifest.get("fingerprint", "")),
        "arf.data_tables": tracking.canonical_json(tables),
        "arf.recipe": spec.training["recipe"],
        "arf.conf": tracking.canonical_json(spec.conf),
        "arf.try_number": str(spec.run.try_number),
    }


_tracking: TrackingSpool | None = None
"""Rank 0's open tracking spool, from start_mlflow_run to _end_mlflow_run."""


def _active_tracking() -> TrackingSpool:
    if _tracking is None:
        raise TrainingError("no tracking spool is open: start_mlflow_run must run first (rank 0)")
    return _tracking


def start_mlflow_run(env: StepEnv, cfg: TrainConfig, data: TrainData,
                     denv: DistEnv, extra_tags: dict[str, str] | None = None
                     ) -> tuple[str | None, str | None]:
    """Open the tracking spool, record the run, its reproducibility record, params and
    lineage, and start sending them. (rank 0)

    Returns (run id, experiment id), or Nones when MLflow did not answer in time: the spool's
    sender creates the run as soon as it can, at the latest during the register step.
    """
    global _tracking
    import mlflow

    spec = env.spec
    tags = {**reproducibility_tags(spec, cfg.config_hash, data, denv.world_size),
            **(extra_tags or {})}  # e.g. arf.base_model, arf.base_model_version
    # Lineage: the digest is the prepare fingerprint, so MLflow hashes nothing; MLflow caps
    # dataset digests at 36 characters (the full sha256 is in the arf.data_fingerprint tag).
    with warnings.catch_warnings():
        # MLflow registers its local-file source for both "" and "file" schemes and warns that
        # a path is ambiguous between the two (identical) classes.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(
            data.x_train, targets=data.y_train, source=str(data.manifest_path),
            name=f"{spec.name}-train",
            digest=str(data.manifest.get("fingerprint", ""))[:36] or None)
    spool = TrackingSpool.open(env.workspace / train_dir_of(spec), env.tracking_uri)
    run_key, parent_key = run_keys(spec)
    try:
        spool.start_run(spec.name, env.artifact_root, spec.run.dag_id, spec.run.run_id, tags,
                        run_key=run_key, parent_key=parent_key)
        spool.set_tags(tags)  # a retry updates the tags of the run it resumes
        spool.log_params({**spec.hyperparameters, "seed": spec.seed,
                          "world_size": denv.world_size, "recipe": cfg.recipe.name})
        spool.log_dict(cfg.resolved, "arf/resolved_config.json")
        spool.log_input(dataset.to_dict(), context="training")
        state = spool.start()
    except BaseException:
        spool.close()
        raise
    _tracking = spool
    if state.run_id is None:
        log.info("MLflow at %s did not answer yet; tracking goes to %s and is sent when it does",
                 env.tracking_uri, spool.spool.path)
    return state.run_id, state.experiment_id


def _end_mlflow_run(status: str) -> tuple[str | None, str | None]:
    """Record the run's final status, send what MLflow can take now (bounded), close the spool.

    Returns the (run id, experiment id) known by then, Nones if MLflow was never reachable.
    """
    global _tracking
    spool, _tracking = _tracking, None
    if spool is None:
        return None, None
    try:
        spool.end_run(status)
    except Exception as exc:
        if status == "FINISHED":
            spool.close()
            raise
        log.warning("could not record the MLflow run as %s: %s", status, exc)  # keep the cause
    state = spool.close()
    return state.run_id, state.experiment_id


# -- train -----------------------------------------------------------------------------------

def run_train(env: StepEnv) -> dict[str, Any] | None:
    """Train the template's built-in recipe; return the result on rank 0, None elsewhere.

    On SIGTERM: raises `Preempted` (exit 75) after a checkpoint; see arf_trainer.preemption.
    """
    with sigterm_guard() as guard:
        denv = DistEnv.from_environ()
        hpo = env.spec.inputs.get("hpo")
        if hpo and hpo.get("select") == "best":
            env = with_best_trial(env)
        # Validate before any distributed init, so a bad spec fails at once on every rank.
        cfg = TrainConfig.from_spec(env.spec, denv.world_size)
        train_dir = train_dir_of(env.spec)
        done = completed_result(env.workspace, cfg.config_hash, train_dir)
        if done is not None:
            if denv.is_main:
                log.info("training already finished for this run (%s); returning its result",
                         env.workspace / train_dir / "result.json")
            return done if denv.is_main else None
        if hpo and hpo.get("select") == "best":
            reused = reuse_best_trial(env, cfg)
            if reused is not None:
                return reused if denv.is_main else None
        data = load_data(env.workspace / "prepare")
        # No process group yet, so no collective to agree in: each rank stops on its own.
        guard.check_setup("while loading the data")
        threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None
        if denv.is_main:
            log.info("on SIGTERM: finish the step, checkpoint and exit %d within %g s (%s)",
                     PREEMPTED_EXIT, guard.grace_s, GRACE_ENV)
        with deterministic(threads):
            device = dist.init(denv)
            try:
                result = train(env, cfg, data, denv, device, guard)
            except Preempted:
                # The ranks agreed to stop after the same step and saved collectively: they
                # are in step with each other, so the clean (barrier) teardown is safe.
                dist.teardown(denv)
                raise
            # Any other failure: no teardown; the CLI ends a failed rank without destructors
            # (arf_trainer.cli._exit_failed_worker says why).
            dist.teardown(denv)
        return result


def with_best_trial(env: StepEnv) -> StepEnv:
    """The final training of an hpo template: the job spec with the best trial's params.

    Every rank reads the (finished) study itself: no process group exists yet, and the best
    trial of a told study no longer changes.
    """
    import dataclasses

    from arf_trainer import hpo as hpo_mod

    spec = env.spec
    best = hpo_mod.best_trial(spec.template["hpo"], spec.inputs["hpo"]["study"])
    inputs = {**spec.inputs, "hpo": {**spec.inputs["hpo"], "best_trial": best.number,
                                     "best_value": best.value}}
    hyperparameters = {**spec.hyperparameters, **best.params}
    log.info("final training with trial %d's params %s (%s = %g)", best.number, best.params,
             spec.template["hpo"]["metric"], best.value)
    spec = dataclasses.replace(spec, hyperparameters=hyperparameters, inputs=inputs)
    return dataclasses.replace(env, spec=spec)


def reuse_best_trial(env: StepEnv, cfg: TrainConfig) -> dict[str, Any] | None:
    """When the best trial trained exactly this configuration (same hyperparameters - the
    budget equals the final epochs - same seed and template: same config_hash), its weights are
    the final model: copy them to ``train/`` instead of training again. Returns the result on
    every rank (rank 0 writes the files), or None when the trial's result differs or is gone.
    """
    import shutil

    from arf_trainer import hpo as hpo_mod

    number = env.spec.inputs["hpo"]["best_trial"]
    folder = env.workspace / hpo_mod.trial_dir(number)
    path = folder / "result.json"
    try:
        trial = read_json(path)
    except (OSError, ValueError):
        return None
    if (trial.get("config_hash") != cfg.config_hash
            or (trial.get("hpo") or {}).get("state") != "complete"):
        return None
    weights = env.workspace / trial["weights"]
    if (not weights.is_file()
            or state_dict_sha256(load_weights(weights)) != trial["weights_sha256"]):
        return None
    denv = DistEnv.from_environ()
    if not denv.is_main:
        return {}
    out_dir = env.workspace / "train"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out_dir / "model.pt")
    shutil.copyfile(folder / "model_info.json", out_dir / "model_info.json")
    result = {**trial, "weights": "train/model.pt", "model_info": "train/model_info.json",
              "reused_trial": number, "steps": 0}
    if not result.get("mlflow_run_id"):
        # MLflow was away during the trial: send its spool now so the run exists to register.
        from arf_trainer import tracking_spool

        client = tracking.configure(env.tracking_uri)
        state = tracking_spool.replay(folder, client, env.tracking_uri)
        if state is not None:
            result.update(mlflow_run_id=state.run_id, experiment_id=state.experiment_id)
    log.info("trial %d trained this exact configuration (config_hash %s): its weights are the "
             "final model; no training needed", number, cfg.config_hash[:12])
    summarize_on_parent(env)
    write_json_atomic(out_dir / "result.json", result)
    return result


def summarize_on_parent(env: StepEnv) -> None:
    """Rank 0 of the final training: the study's summary on its parent MLflow run. Best
    effort: a tracking failure here is logged and does not fail the training."""
    from arf_trainer import hpo as hpo_mod

    spec = env.spec
    _key, parent_key = run_keys(spec)
    try:
        with tracking.mlflow_errors(env.tracking_uri, "record the study on its parent run"):
            client = tracking.configure(env.tracking_uri)
            experiment_id = tracking.get_or_create_experiment(client, spec.name,
                                                              env.artifact_root)
            parent = tracking.find_or_create_parent_run(
                client, experiment_id, parent_key,
                {"arf.dag_id": spec.run.dag_id, "arf.dag_run_id": spec.run.run_id,
                 "arf.hpo.study": parent_key})
            summary = hpo_mod.summarize_study(spec.template["hpo"], spec.inputs["hpo"]["study"],
                                              client, parent)
            client.set_terminated(parent, "FINISHED")
        log.info("study %s: best trial %d (%s = %g) of %s; summary, importances and plot on "
                 "MLflow run %s", summary["study"], summary["best_trial"], summary["metric"],
                 summary["best_value"], summary["counts"], parent)
    except Exception as exc:  # the model is what matters; the summary can be re-made
        log.warning("could not record the study summary on its parent MLflow run: %s", exc)


def train(env: StepEnv, cfg: TrainConfig, data: TrainData, denv: DistEnv,
          device: torch.device, guard: PreemptionGuard) -> dict[str, Any] | None:
    recipe, hp = cfg.recipe, cfg.hp
    out_dir = env.workspace / train_dir_of(env.spec)
    hooks = TestHooks.from_environ(
        trial_number=(env.spec.inputs.get("hpo") or {}).get("trial_number"))
    info = recipe.describe(data.features, data.targets, hp, data.y_train)
    base = None
    if cfg.base_model is not None:
        # Resolved once (rank 0) and pinned in the workspace: a retry or a resumed run starts
        # from the same version even if the alias has moved since.
        folder = out_dir / base_model.FOLDER
        record = dist.broadcast_from_main(denv, dist.run_on_main(
            denv, lambda: base_model.pin(cfg.base_model, folder, env.tracking_uri),
            "resolve model.base_model"))
        base = base_model.load(record, folder)
        base_model.check_compatible(base, recipe.name, data.features, data.targets,
                                    env.spec.hyperparameters)
        info = base.info  # the base's architecture (and, for a classifier, its classes)
    x_train = torch.from_numpy(data.x_train)
    y_train = recipe.encode_targets(info, data.y_train, "training")
    x_val = torch.from_numpy(data.x_val)
    y_val = recipe.encode_targets(info, data.y_val, "validation")

    # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
    seed_all(cfg.seed)
    model = recipe.build_model(info)
    if base is None:
        recipe.fit_normalization(model, data.x_train, y_train)
    else:
        # The base's weights and its input/output normalization: the fine-tune keeps serving
        # the same units, and the new data is standardized the way the base saw its data.
        model.load_state_dict(base.weights)
        frozen = base_model.freeze(model, cfg.freeze_layers)
        if frozen and denv.is_main:
            log.info("fine-tuning %s version %s with %s frozen", base.uri, base.version,
                     ", ".join(frozen))
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=hp.lr, weight_decay=hp.weight_decay)
    # The step trains the standardized core on standardized data (Recipe.training_tensors);
    # the normalization buffers live outside it, so DDP has no buffers to broadcast.
    ddp_net = DDP(model.net) if denv.enabled else model.net
    seed_all(cfg.seed + denv.rank)  # from here on, per-rank streams

    dataset = TensorDataset(*recipe.training_tensors(model, x_train, y_train))
    sampler = ShardedBatchSampler(len(dataset), denv.world_size, denv.rank,
                                  cfg.per_rank_batch_size, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + denv.rank)
    # batch_size=None: each sampled index tensor is one batch, sliced by TensorDataset.
    loader = DataLoader(dataset, batch_size=None, num_workers=0, sampler=sampler,
                        generator=generator)
    steps_per_epoch = len(loader)
    total_steps = hp.epochs * steps_per_epoch

    checkpointer = Checkpointer(out_dir / "checkpoints", denv, keep=cfg.keep_checkpoints,
                                every_steps=cfg.checkpoint_every_steps, hooks=hooks)
    progress = Progress()
    latest = checkpointer.latest_step()
    if latest is not None:
        ckpt = checkpointer.load(latest)
        if ckpt.shared["config_hash"] != cfg.config_hash:
            raise TrainingError(
                f"checkpoint step-{latest} in {checkpointer.folder} was written with another "
                "configuration (config_hash differs); delete the checkpoints folder to start over"
            )
        model.load_state_dict(ckpt.shared["model"])
        optimizer.load_state_dict(ckpt.shared["optimizer"])
        progress = Progress(**ckpt.shared["progress"], loss_sum=ckpt.rank_state["loss_sum"],
                            samples=ckpt.rank_state["samples"])
        restore_rng_state(ckpt.rank_state["rng"])
        generator.set_state(ckpt.rank_state["loader_generator"])
        if denv.is_main:
            log.info("resumed from %s/step-%d (epoch %d, after batch %d)", checkpointer.folder,
                     latest, progress.epoch + 1, progress.batches_done)

    # Wall seconds of the training loop and of the checkpoint saves in it (this process's view),
    # reported in result.json so that the checkpoint cost can be measured without a profiler.
    timing = {"checkpoint_seconds": 0.0, "train_seconds": 0.0, "train_cpu_seconds": 0.0}

    def save_checkpoint(epoch_start_generator: torch.Tensor) -> None:
        # Mid-epoch, the loader must replay this epoch from its start state and skip the
        # batches done; at an epoch boundary the current state is the next epoch's start.
        loader_state = epoch_start_generator if progress.batches_done else generator.get_state()
        shared = {
            "model": cpu_state_dict(model.state_dict()),
            "optimizer": optimizer.state_dict(),
            "progress": {"step": progress.step, "epoch": progress.epoch,
                         "batches_done": progress.batches_done, "metrics": progress.metrics},
            "config": cfg.resolved,
            "config_hash": cfg.config_hash,
        } if denv.is_main else {}
        t_save = time.perf_counter()
        checkpointer.save(progress.step, shared, {
            "rng": capture_rng_state(), "loader_generator": loader_state,
            "loss_sum": progress.loss_sum, "samples": progress.samples})
        timing["checkpoint_seconds"] += time.perf_counter() - t_save

    def start_tracking() -> tuple[str, str]:
        try:
            with tracking.mlflow_errors(env.tracking_uri, "start the training run"):
                return start_mlflow_run(env, cfg, data, denv,
                                        extra_tags=base.tags if base is not None else None)
        except BaseException:
            _end_mlflow_run("FAILED")
            raise

    started = dist.run_on_main(denv, start_tracking, "start the MLflow run")
    hpo_inputs = env.spec.inputs.get("hpo") or {}
    reporter = None
    if "trial_number" in hpo_inputs:
        from arf_trainer.hpo import TrialReporter

        reporter = dist.run_on_main(
            denv, lambda: TrialReporter.open(env.spec.template["hpo"], hpo_inputs),
            "open the trial in the Optuna storage")
    pruned = False
    # Set-up leaves ~570k long-lived objects (torch, MLflow, SQLAlchemy, pyarrow); a full
    # collection scans all of them: 0.3 s that lands somewhere in the training loop (15% of a
    # short run in bench/harness_overhead.py, and a stall for every other rank under DDP).
    # Frozen, they are out of the collector's way; the loop's own garbage is still collected.
    gc.freeze()
    try:
        if dist.any_rank(denv, guard.requested, device):
            resume_point = "none" if latest is None else f"step-{latest}"
            raise Preempted(
                "SIGTERM received during setup, before the first training step; no new "
                f"checkpoint written (resume point: {resume_point}). Rerun the same command "
                "to continue")
        t_start, cpu_start, steps_run = time.perf_counter(), time.process_time(), 0
        agreement = dist.StopAgreement(denv, device)
        for epoch in range(progress.epoch, hp.epochs):
            sampler.set_epoch(epoch)
            epoch_start_generator = generator.get_state()
            ddp_net.train()
            t_epoch, samples_run = time.perf_counter(), 0
            for i, (x, y) in enumerate(loader):
                if i < progress.batches_done:
                    continue  # trained before the checkpoint we resumed from
                x, y = x.to(device), y.to(device)
                loss = recipe.training_loss(ddp_net(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.step += 1
                progress.batches_done = i + 1
                progress.loss_sum += loss.item() * len(y)
                progress.samples += len(y)
                samples_run += len(y) * denv.world_size
                steps_run += 1
                hooks.after_step(progress.step, denv.rank)
                if checkpointer.due(progress.step):
                    save_checkpoint(epoch_start_generator)
                # Preemption: the ranks agree (every few steps, see StopAgreement) whether
                # any of them got SIGTERM, so that all of them stop after this same step.
                if agreement.stop(progress.step, guard.requested):
                    save_checkpoint(epoch_start_generator)  # no-op if the periodic one ran
                    when = ("on another rank" if guard.received_at is None else
                            f"{time.monotonic() - guard.received_at:.1f} s ago")
                    raise Preempted(
                        f"SIGTERM received ({when}); stopped after step {progress.step}/"
                        f"{total_steps} and saved {checkpointer.folder}/step-{progress.step}. "
                        "Rerun the same command to resume")

            loss_sum, samples = dist.all_reduce_sum(denv, [progress.loss_sum, progress.samples],
                                                    device)
            metrics = {"train_loss": loss_sum / samples,
                       **evaluate(recipe, model, x_val, y_val, denv, device)}
            progress = Progress(step=progress.step, epoch=epoch + 1,
                                metrics={**metrics, "epoch": float(epoch + 1)})
            if denv.is_main:
                rate = samples_run / max(time.perf_counter() - t_epoch, 1e-9)
                per_step = (time.perf_counter() - t_start) / max(steps_run, 1)
                log.info(_epoch_line(progress, hp.epochs, total_steps, rate, per_step))
                # An epoch replayed entirely from a checkpoint has no throughput to report.
                throughput = {"samples_per_s": rate} if samples_run else {}
                # Appends to the tracking spool: never waits for MLflow.
                _active_tracking().log_metrics({**progress.metrics, **throughput},
                                               step=progress.step)
            if "trial_number" in hpo_inputs:
                # Rank 0 reports and asks the pruner; every rank gets the same answer, so all
                # of them stop after this same epoch. Not after the last epoch: pruning then
                # saves nothing, and a complete trial tells the sampler more than a pruned one.
                last = epoch + 1 == hp.epochs
                stop = dist.run_on_main(
                    denv, lambda: reporter.report(epoch + 1, metrics, ask_pruner=not last),
                    "report to the Optuna trial")
                if dist.broadcast_from_main(denv, stop):
                    pruned = True
                    if denv.is_main:
                        log.info("trial %s pruned after epoch %d/%d (%s = %g)",
                                 hpo_inputs["trial_number"], epoch + 1, hp.epochs,
                                 reporter.metric, metrics[reporter.metric])
                    break

        save_checkpoint(generator.get_state())  # the final checkpoint (skipped if it exists)
        timing["train_seconds"] = time.perf_counter() - t_start
        timing["train_cpu_seconds"] = time.process_time() - cpu_start
        return dist.run_on_main(
            denv, lambda: finish(env, cfg, info, model, progress, started, denv, timing,
                                 reporter=reporter, pruned=pruned),
            "write the trained model")
    except BaseException as exc:
        if denv.is_main:
            _end_mlflow_run("KILLED" if isinstance(exc, Preempted) else "FAILED")
        raise
    finally:
        gc.unfreeze()  # tests and benchmarks call run_train many times in one process


def finish(env: StepEnv, cfg: TrainConfig, info: ModelInfo, model: MLP, progress: Progress,
           started: tuple[str | None, str | None] | None, denv: DistEnv,
           timing: dict[str, float] | None = None, reporter: Any = None,
           pruned: bool = False) -> dict[str, Any]:
    """Rank 0: model.pt, model_info.json, the weights tag, then result.json last.

    result.json's mlflow_run_id is null if MLflow was unreachable for the whole training; the
    register step then creates the run from the spool and writes the id in.
    """
    train_dir = train_dir_of(env.spec)
    out_dir = env.workspace / train_dir
    sha = save_weights(model.state_dict(), out_dir / "model.pt")
    write_json_atomic(out_dir / "model_info.json",
                      {**info.to_json(), "weights": "model.pt", "weights_sha256": sha})
    _active_tracking().set_tags({"arf.weights_sha256": sha})
    metrics = {k: v for k, v in progress.metrics.items() if k != "epoch"}
    if reporter is not None:
        value = metrics.get(reporter.metric)
        _active_tracking().set_tags({"arf.hpo.state": "pruned" if pruned else "complete",
                                     "arf.hpo.value": repr(value)})
        if value is not None:
            _active_tracking().log_metrics({"hpo_value": value}, step=progress.step)
    run_id, experiment_id = _end_mlflow_run("FINISHED")
    if run_id is None and started:
        run_id, experiment_id = started
    result = {
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "weights": f"{train_dir}/model.pt",
        "weights_sha256": sha,
        "model_info": f"{train_dir}/model_info.json",
        "metrics": metrics,
        "world_size": denv.world_size,
        "steps": progress.step,
        "recipe": cfg.recipe.name,
        "config_hash": cfg.config_hash,
        "timing": timing or {},
    }
    if reporter is not None:
        # Recorded on the trial before result.json: a result on disk means Optuna has it too.
        result["hpo"] = reporter.finish(pruned, metrics, progress.step, run_id)
    elif (env.spec.inputs.get("hpo") or {}).get("select") == "best":
        summarize_on_parent(env)
    # Written here as well as by the CLI (at ARF_RESULT_PATH), because register and a retried
    # train look for it at this fixed place in the workspace.
    write_json_atomic(out_dir / "result.json", result)
    log.info("trained %s: %d steps; weights %s (sha256 %s); checkpoints in %s", cfg.recipe.name,
             progress.step, out_dir / "model.pt", sha, out_dir / "checkpoints")
    return result
