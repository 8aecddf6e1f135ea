"""Register the output of a template's own training command (any framework).

Contract of a custom training command (see README, "The step contract"): it reads the prepared
data at $ARF_DATA_DIR, writes its model files to $ARF_OUTPUT_DIR and, last, a result JSON to
$ARF_RESULT_PATH (optionally with "metrics": {name: number}). It need not know MLflow.

This step then does what the built-in recipes do themselves: an MLflow run per DAG run with the
reproducibility record, the metrics, the output folder as the `model` artifact (its sha256 over
sorted relative paths and bytes), and a registry version of the template's model with lineage
tags and the ARF plugin manifest. Idempotent per DAG run, like `publisher.run_register`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from arf_trainer import tracking
from arf_trainer.custom_setup import base_model_record, lineage_tags
from arf_trainer.errors import RegistryError
from arf_trainer.spec import StepEnv, read_json

log = logging.getLogger(__name__)
MANIFEST_ARTIFACT = "arf_plugin.json"


def output_files(folder: Path) -> list[Path]:
    """The files of `folder` that are hashed and logged, sorted; refuses what would make the
    logged `model` differ from what is hashed, or pull a host file into MLflow: a symlink that
    is dangling, points outside `folder` or to a directory (MLflow copies its target)."""
    root = folder.resolve()
    files = []
    for path in folder.rglob("*"):
        if path.is_symlink():
            target = path.resolve()
            if not target.is_file() or not target.is_relative_to(root):
                why = "not a file" if not target.is_file() else f"outside {folder}"
                raise RegistryError(
                    f"{path} is a symbolic link to {target}, which is {why}; a custom command "
                    "must write its model files into $ARF_OUTPUT_DIR as regular files (copy "
                    "them there instead of linking)")
        if path.is_file():
            files.append(path)
    return sorted(files)


def folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in output_files(folder):
        name = path.relative_to(folder).as_posix().encode("utf-8", "surrogateescape")
        digest.update(name + b"\0")
        with open(path, "rb") as fh:  # in chunks: a model may be larger than memory
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _result_metrics(result: Any, path: Path) -> dict[str, float]:
    metrics = result.get("metrics") if isinstance(result, dict) else None
    if not isinstance(result, dict) or not isinstance(metrics, (dict, type(None))) or any(
            isinstance(v, bool) or not isinstance(v, (int, float))
            for v in (metrics or {}).values()):
        raise RegistryError(
            f"{path} must be a JSON object whose optional \"metrics\" is an object of "
            f"{{name: number}}; it holds {json.dumps(result)[:300]}")
    return {k: float(v) for k, v in (metrics or {}).items()}


def register_custom(env: StepEnv) -> dict[str, Any]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    spec, ws = env.spec, env.workspace
    name = spec.model["name"]
    output = ws / "train" / "output"
    result_path = ws / "train" / "result.json"
    if not result_path.exists() or not output.is_dir() or not output_files(output):
        raise RegistryError(
            f"the training command {spec.training['command']['command']} left no result at "
            f"{result_path} or no files in {output}; a custom command must write its model to "
            "$ARF_OUTPUT_DIR and its result JSON to $ARF_RESULT_PATH")
    result = read_json(result_path)
    metrics = _result_metrics(result, result_path)
    manifest = read_json(ws / "prepare" / "manifest.json")
    sha = folder_sha256(output)
    resolved = {"template": spec.template, "hyperparameters": spec.hyperparameters,
                "seed": spec.seed}
    lineage = {**lineage_tags(env), "arf.weights_sha256": sha}
    base = base_model_record(env)
    if base:  # the exact version the command started from, not the alias it was asked for
        lineage.update({"arf.base_model": base["uri"], "arf.base_model_version": base["version"],
                        "arf.base_model_run_id": base["run_id"]})
    client = tracking.configure(env.tracking_uri)
    with tracking.mlflow_errors(env.tracking_uri, f"register {name!r}"):
        experiment_id = tracking.get_or_create_experiment(client, spec.name, env.artifact_root)
        # Usually found: custom-setup created it before the command logged into it live.
        run_id, resumed = tracking.find_or_create_run(
            client, experiment_id, spec.run.dag_id, spec.run.run_id, lineage)
        if resumed:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in lineage.items()])
        lineage["arf.training_run_id"] = run_id
        versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
        if versions:
            version = min((v.version for v in versions), key=int)
            log.info("%s version %s is already registered for run %s", name, version, run_id)
            # A retry after a crash between registering and ending the run: end it now.
            client.set_terminated(run_id, "FINISHED")
        else:
            run = client.get_run(run_id)
            now = int(time.time() * 1000)
            # Only what the command did not log itself (live, or a retry of this step before):
            # no point is recorded twice.
            client.log_batch(run_id, metrics=[
                Metric(k, v, now, 0) for k, v in metrics.items()
                if k not in run.data.metrics],
                params=[Param(k, str(v)) for k, v in
                        {**spec.hyperparameters, "seed": spec.seed}.items()
                        if k not in run.data.params])
            client.log_dict(run_id, resolved, "arf/resolved_config.json")
            client.log_artifacts(run_id, str(output), "model")
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(
                name, source=f"{run.info.artifact_uri}/model", run_id=run_id, tags=lineage).version
            client.set_terminated(run_id, "FINISHED")
            log.info("registered %s version %s from run %s (custom command)", name, version, run_id)
        plugin = {"manifest_version": 1, "id": name, "version": str(version),
                  "model_uri": f"models:/{name}/{version}", "weights_sha256": sha,
                  "recipe": "custom-command", "framework": result.get("framework"),
                  "input": {"features": manifest.get("features")},
                  "output": {"targets": manifest.get("targets")}, "lineage": lineage}
        client.log_dict(run_id, plugin, MANIFEST_ARTIFACT)
    return {"model_name": name, "model_version": str(version),
            "model_uri": f"models:/{name}/{version}", "training_run_id": run_id,
            "weights_sha256": sha, "manifest": plugin}
