"""The metrics sink of the training loop: rank 0's MLflow run through the tracking spool.

One MLflow run per DAG run (resumed on retry), params, the reproducibility record as ``arf.*``
tags, per-epoch metrics and the dataset lineage. Everything goes to a spool in the workspace
that a background thread sends to MLflow, so an MLflow outage neither stalls nor fails
training and loses nothing (see arf_trainer.tracking_spool). Only rank 0 opens a sink.
"""

from __future__ import annotations

import logging
import warnings
from datetime import timedelta
from typing import Any

import torch

from arf_trainer import __version__, tracking
from arf_trainer.spec import JobSpec, StepEnv
from arf_trainer.tracking_spool import TrackingSpool
from arf_trainer.trainer.config import TrainConfig, train_dir_of
from arf_trainer.trainer.data import Manifest, feature_matrix, target_matrix

log = logging.getLogger(__name__)


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


def reproducibility_tags(spec: JobSpec, config_hash: str, manifest: dict[str, Any],
                         world_size: int) -> dict[str, str]:
    code_version = {"arf_trainer": __version__, **spec.code_version}
    tables = {name: t.get("version") for name, t in manifest.get("tables", {}).items()}
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
        **tracking.dag_run_tags(spec.run),
        "arf.dag_run": run_keys(spec)[0],
        "arf.config_hash": config_hash,
        "arf.code_version": tracking.canonical_json(code_version),
        "arf.torch_version": torch.__version__,
        "arf.world_size": str(world_size),
        "arf.data_fingerprint": str(manifest.get("fingerprint", "")),
        "arf.data_tables": tracking.canonical_json(tables),
        "arf.recipe": spec.training["recipe"],
        "arf.conf": tracking.canonical_json(spec.conf),
        "arf.try_number": str(spec.run.try_number),
    }


def epoch_line(progress: Any, epochs: int, total_steps: int, rate: float,
               seconds_per_step: float) -> str:
    """The progress line `arf demo` and the client show (client.PROGRESS_LINE)."""
    eta = timedelta(seconds=round(seconds_per_step * (total_steps - progress.step)))
    values = " | ".join(f"{k} {v:.4f}" for k, v in progress.metrics.items() if k != "epoch")
    return (f"epoch {progress.epoch}/{epochs} | step {progress.step}/{total_steps} | {values} | "
            f"{rate:,.0f} samples/s | ETA {eta}")


PROFILE_BYTES = 16 * 2**20
"""Largest training split (as float32) whose MLflow lineage carries a profile of the data."""


def _lineage(spec: JobSpec, manifest: Manifest, source: Any) -> dict[str, Any]:
    """The training dataset as MLflow lineage: the digest is the prepare fingerprint, so MLflow
    hashes nothing (it caps digests at 36 characters; the full sha256 is a tag)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = f"{spec.name}-train"
    digest = str(manifest.raw.get("fingerprint", ""))[:36] or None
    with warnings.catch_warnings():
        # MLflow registers its local-file source for both "" and "file" schemes and warns that
        # a path is ambiguous between the two (identical) classes.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        names = manifest.features + manifest.targets
        scalar = source.mode == "memory" and all(source.train[n].ndim == 1 for n in names)
        # MLflow profiles a float32 copy of the whole split: past a few MiB that copy (and
        # MLflow's own) took more memory than the data, and `auto` budgets for the data.
        small = scalar and manifest.rows("train") * len(names) * 4 <= PROFILE_BYTES
        if small:  # small and whole: MLflow profiles it
            dataset = mlflow.data.from_numpy(
                feature_matrix(source.train, manifest.features),
                targets=target_matrix(source.train, manifest.targets),
                source=str(manifest.path), name=name, digest=digest)
        else:  # a stream, frames or a large split is not copied for a profile: where it is, and
            # its digest
            dataset = MetaDataset(resolve_dataset_source(str(manifest.path)), name=name,
                                  digest=digest)
    return dataset.to_dict()


class MetricsSink:
    """Rank 0's tracking: `start`, `log`, `set_tags`, `end`; a no-op object on other ranks."""

    def __init__(self) -> None:
        self.spool: TrackingSpool | None = None
        self.started: tuple[str | None, str | None] | None = None

    def start(self, env: StepEnv, cfg: TrainConfig, manifest: Manifest, source: Any,
              world_size: int, loading: tuple[str, str],
              extra_tags: dict[str, str] | None = None,
              extra_params: dict[str, Any] | None = None) -> tuple[str | None, str | None]:
        """Open the spool, record the run, its reproducibility record, params and lineage, and
        start sending them. Returns (run id, experiment id), or Nones when MLflow did not answer
        in time: the spool's sender creates the run as soon as it can, at the latest during the
        register step."""
        spec = env.spec
        tags = {**reproducibility_tags(spec, cfg.config_hash, manifest.raw, world_size),
                "arf.data_loading": f"{loading[0]} ({loading[1]})",
                **(extra_tags or {})}  # e.g. arf.base_model, arf.base_model_version
        dataset = _lineage(spec, manifest, source)
        spool = TrackingSpool.open(env.workspace / train_dir_of(spec), env.tracking_uri)
        run_key, parent_key = run_keys(spec)
        try:
            spool.start_run(spec.name, env.artifact_root, spec.run.dag_id, spec.run.run_id,
                            tags, run_key=run_key, parent_key=parent_key)
            spool.set_tags(tags)  # a retry updates the tags of the run it resumes
            spool.log_params({**spec.hyperparameters, "seed": spec.seed,
                              "world_size": world_size, "recipe": cfg.recipe.name,
                              "data_loading": loading[0], **(extra_params or {})})
            spool.log_dict(cfg.resolved, "arf/resolved_config.json")
            spool.log_input(dataset, context="training")
            state = spool.start()
        except BaseException:
            spool.close()
            raise
        self.spool = spool
        if state.run_id is None:
            log.info("MLflow at %s did not answer yet; tracking goes to %s and is sent when it "
                     "does", env.tracking_uri, spool.spool.path)
        self.started = (state.run_id, state.experiment_id)
        return self.started

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.spool is not None:  # appends to the spool: never waits for MLflow
            self.spool.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.spool is not None:
            self.spool.set_tags(tags)

    def end(self, status: str) -> tuple[str | None, str | None]:
        """Record the run's final status, send what MLflow can take now (bounded), close.
        Returns the (run id, experiment id) known by then, Nones if MLflow never answered."""
        spool, self.spool = self.spool, None
        if spool is None:
            return None, None
        try:
            spool.end_run(status)
        except Exception as exc:
            if status == "FINISHED":
                spool.close()
                raise
            log.warning("could not record the MLflow run as %s: %s", status, exc)  # keep cause
        state = spool.close()
        return state.run_id, state.experiment_id


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
                {**tracking.dag_run_tags(spec.run),
                 "arf.hpo.study": parent_key})
            summary = hpo_mod.summarize_study(spec.template["hpo"], spec.inputs["hpo"]["study"],
                                              client, parent)
            client.set_terminated(parent, "FINISHED")
        log.info("study %s: best trial %d (%s = %g) of %s; summary, importances and plot on "
                 "MLflow run %s", summary["study"], summary["best_trial"], summary["metric"],
                 summary["best_value"], summary["counts"], parent)
    except Exception as exc:  # the model is what matters; the summary can be re-made
        log.warning("could not record the study summary on its parent MLflow run: %s", exc)
