"""`arf-trainer register`: publish the trained model to the MLflow registry, once per training run.

Reads ``<workspace>/train/result.json`` and ``model_info.json``, rebuilds the module, checks the
weights against the recorded sha256, logs it as an MLflow model of the training run, registers
a version of the template's ``model.name`` with lineage tags, and writes the ARF plugin manifest
(``arf_plugin.json``) as an artifact of the run. The exact state_dict and ``model_info.json``
are logged under ``arf/model/`` of the run too: what a fine-tune (``model.base_model``) loads.

Before anything else it replays the train step's tracking spool (`tracking_spool.replay`):
whatever MLflow missed during training (an outage) is sent now, exactly once, and if MLflow was
unreachable for the whole training, the run is created now and its id written into
train/result.json.

Idempotent per training run: a retry finds the version already registered for that run
(``search_model_versions`` filtered by run_id) and the model already logged (a READY logged model
of the run with the same weights sha256), and creates neither again.

Serialization: the model is logged in MLflow 3's default ``pt2`` format (`torch.export`), with
an input example of real rows from the validation shard. MLflow 3 refuses to unpickle models
unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set, so a ``pickle``-format model would not load in
an evaluator or server by default; ``pt2`` loads with torch alone (no arf_trainer import, no
arbitrary code). The example has at least 2 rows because torch.export treats a size-1 batch
dimension as a constant, and the model must accept any batch size.

Serving: every version loads with `mlflow.pyfunc.load_model` and serves with `mlflow models
serve` / `predict` too (`arf_trainer.pt2_pyfunc` adds the python_function flavor MLflow leaves
out for a model of several inputs, and pins pyfunc to the CPU the archive was exported on).
The pt2 guarantee above holds for `mlflow.pytorch.load_model`; pyfunc of a bc_pixels model
also imports the small loader file shipped in the model (`code/arf_pt2_pyfunc.py`, source
that imports no arf_trainer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arf_trainer import tracking, tracking_spool
from arf_trainer.errors import RegistryError
from arf_trainer.spec import StepEnv, read_json, write_json_atomic
from arf_trainer.trainer.checkpoint import load_weights, state_dict_sha256
from arf_trainer.trainer.data import feature_matrix, read_table_columns
from arf_trainer.trainer.recipes import MLP, ModelInfo, get_recipe

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_ARTIFACT = "arf_plugin.json"
LOGGED_MODEL_NAME = "model"
EXAMPLE_ROWS = 8
# Copied from the training run's tags onto the model version: its reproducibility record.
LINEAGE_FROM_RUN = ("arf.template", "arf.template_sha256", "arf.dag_id", "arf.dag_run_id",
                    "arf.data_fingerprint", "arf.data_tables", "arf.config_hash",
                    "arf.code_version")
# Copied too when the training run has them (a fine-tune: the base it started from).
OPTIONAL_LINEAGE = ("arf.base_model", "arf.base_model_version", "arf.base_model_run_id")


def _read_train_output(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise RegistryError(f"{path} does not exist; the train step must finish in this "
                            "workspace before register runs") from None
    except ValueError as exc:
        raise RegistryError(f"{path} is not valid JSON ({exc}); rerun the train step") from exc


def load_trained_model(workspace: Path) -> tuple[MLP, ModelInfo, dict[str, Any]]:
    """Rebuild the trained module from the train step's outputs, checking the weights' sha256."""
    train_dir = workspace / "train"
    result = _read_train_output(train_dir / "result.json")
    info = ModelInfo.from_json(_read_train_output(train_dir / "model_info.json"))
    model = get_recipe(info.recipe).build_model(info)
    weights = load_weights(workspace / result["weights"])
    sha = state_dict_sha256(weights)
    if sha != result["weights_sha256"]:
        raise RegistryError(f"{workspace / result['weights']} has sha256 {sha} but the train "
                            f"step recorded {result['weights_sha256']}: the file changed after "
                            "training; rerun the train step")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise RegistryError(f"weights do not fit the module described by model_info.json: "
                            f"{exc}") from exc
    return model.eval(), info, result


def input_example(workspace: Path, info: ModelInfo) -> np.ndarray:
    """Up to EXAMPLE_ROWS (at least 2) feature rows, from the val shards, else train shards."""
    import pyarrow.parquet as pq

    prepare_dir = workspace / "prepare"
    if (workspace / "federate").is_dir() and not (prepare_dir / "manifest.json").exists():
        # A federated model: no site's rows leave it, so the export traces zeros of its shape.
        return np.zeros((2, info.n_features), dtype=np.float32)
    manifest = read_json(prepare_dir / "manifest.json")
    for split in ("val", "train"):
        for shard in manifest["shards"].get(split, []):
            if shard.get("rows", 0) < 2:
                continue
            table = pq.read_table(prepare_dir / shard["path"], columns=info.features)
            # Array columns flattened in order, as the loaders feed the model (feature_matrix).
            columns = read_table_columns(table.slice(0, EXAMPLE_ROWS), info.features,
                                         "the input example")
            return feature_matrix(columns, info.features)
    raise RegistryError(f"no shard in {prepare_dir / 'manifest.json'} has 2 rows for the input "
                        "example that the pt2 export needs to keep the batch dimension dynamic")


def export_arguments(workspace: Path, info: ModelInfo) -> dict[str, Any]:
    """log_model's input_example, and for a model of several inputs (bc_pixels: frames and
    state) the signature too, which MLflow cannot infer from a tuple of arrays."""
    if info.arrays:
        from arf_trainer.trainer.vision_export import export_arguments as vision_export

        return vision_export(workspace, info)
    return {"input_example": input_example(workspace, info)}


def _input_description(info: ModelInfo) -> dict[str, Any]:
    if info.arrays:
        from arf_trainer.trainer.vision_export import manifest_input

        return manifest_input(info)
    return {"features": info.features, "dtype": "float32", "shape": [-1, info.n_features]}


def plugin_manifest(name: str, version: str, info: ModelInfo, result: dict[str, Any],
                    lineage: dict[str, str]) -> dict[str, Any]:
    """The ARF plugin manifest: how a consumer feeds the model and reads its output."""
    output: dict[str, Any]
    if info.classes is not None:
        output = {"kind": "logits", "classes": info.classes, "shape": [-1, len(info.classes)],
                  "dtype": "float32"}
    else:
        output = {"kind": "regression", "targets": info.targets,
                  "shape": [-1, len(info.targets)], "dtype": "float32"}
    return {
        "manifest_version": MANIFEST_VERSION,
        "id": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "weights_sha256": result["weights_sha256"],
        "recipe": info.recipe,
        "input": _input_description(info),
        "output": output,
        "lineage": lineage,
    }


def _registered_version(client: Any, name: str, run_id: str) -> str | None:
    versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    return min((v.version for v in versions), key=int, default=None)


def _settle_version(client: Any, name: str, run_id: str, mine: Any) -> str:
    """One version per training run even when two register steps of the run (a retry started
    while the first try still runs) both found none and both registered one: each keeps the
    run's oldest version and deletes its own if that is not it (as
    `tracking.find_or_create_parent_run` does for runs). Version numbers grow in the order
    versions are made, so the oldest exists before any later one and both settle on it."""
    oldest = _registered_version(client, name, run_id)
    if oldest is not None and str(oldest) != str(mine):
        log.warning("%s version %s duplicates version %s of training run %s, registered at the "
                    "same time; deleting it", name, mine, oldest, run_id)
        client.delete_model_version(name, str(mine))
        return str(oldest)
    return str(mine)


def _logged_model_uri(client: Any, experiment_id: str, run_id: str, sha: str) -> str | None:
    """A finished earlier log_model of these weights into this run (a retry after it)."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND tags.`arf.weights_sha256` = '{sha}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None


def log_base_artifacts(client: Any, workspace: Path, run_id: str, result: dict[str, Any]) -> None:
    """The exact state_dict and model_info.json as artifacts `arf/model/` of the training run:
    what a fine-tune (`model.base_model`) starts from (`arf_trainer.trainer.base_model`).
    Re-logging on a retry writes the same bytes."""
    import shutil
    import tempfile

    from arf_trainer.trainer import base_model

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(workspace / result["weights"], Path(tmp) / base_model.WEIGHTS_FILE)
        shutil.copyfile(workspace / "train" / "model_info.json", Path(tmp) / base_model.INFO_FILE)
        client.log_artifacts(run_id, tmp, base_model.ARTIFACT_DIR)


def deliver_training_record(env: StepEnv, client: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Send what the train step spooled and MLflow has not got yet; return the train result
    with the MLflow run id filled in (and saved to train/result.json) if train never learned it.
    """
    state = tracking_spool.replay(env.workspace / "train", client, env.tracking_uri)
    if state is None or state.run_id is None:
        if result.get("mlflow_run_id"):
            return result  # trained before the spool existed: MLflow has everything
        raise RegistryError(f"train/result.json in {env.workspace} has no MLflow run id and "
                            "there is no tracking spool to create the run from; rerun the "
                            "train step")
    if result.get("mlflow_run_id") != state.run_id:
        if result.get("mlflow_run_id"):
            log.warning("train/result.json names MLflow run %s but the tracking spool went to "
                        "run %s; using the spool's", result["mlflow_run_id"], state.run_id)
        result = {**result, "mlflow_run_id": state.run_id, "experiment_id": state.experiment_id}
        write_json_atomic(env.workspace / "train" / "result.json", result)
    return result


def run_register(env: StepEnv) -> dict[str, Any]:
    """Register this DAG run's trained model (once) and return its version and manifest."""
    import mlflow

    from arf_trainer import pt2_pyfunc

    name = env.spec.model["name"]
    model, info, result = load_trained_model(env.workspace)
    client = tracking.configure(env.tracking_uri)
    result = deliver_training_record(env, client, result)
    run_id, sha = result["mlflow_run_id"], result["weights_sha256"]
    with tracking.mlflow_errors(env.tracking_uri,
                                f"find training run {run_id} (from train/result.json)"):
        run = client.get_run(run_id)
    missing = [key for key in LINEAGE_FROM_RUN if key not in run.data.tags]
    if missing:
        raise RegistryError(f"training run {run_id} lacks the lineage tag(s) {missing}; it was "
                            "not made by arf-trainer train: retrain to get a complete record")
    lineage = {key: run.data.tags[key] for key in LINEAGE_FROM_RUN}
    lineage.update({key: run.data.tags[key] for key in OPTIONAL_LINEAGE if key in run.data.tags})
    lineage.update({"arf.training_run_id": run_id, "arf.weights_sha256": sha})

    with tracking.mlflow_errors(env.tracking_uri, f"register {name!r} from run {run_id}"):
        # Before registering: every registered version has its exact weights to fine-tune from.
        log_base_artifacts(client, env.workspace, run_id, result)
        version = _registered_version(client, name, run_id)
        if version is None:
            model_uri = _logged_model_uri(client, run.info.experiment_id, run_id, sha)
            if model_uri is None:
                # MLflow 3 files the logged model under the *active* experiment, not the run's:
                # without this it would land in "Default" with artifacts in ./mlruns.
                mlflow.set_experiment(experiment_id=run.info.experiment_id)
                logged = pt2_pyfunc.log_model(
                    model, name=LOGGED_MODEL_NAME, run_id=run_id,
                    **export_arguments(env.workspace, info),
                    # Explicit requirements: inferring them loads the model in a subprocess.
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    tags={"arf.weights_sha256": sha})
                model_uri = logged.model_uri
            version = _settle_version(
                client, name, run_id, mlflow.register_model(model_uri, name, tags=lineage).version)
            log.info("registered %s version %s from run %s", name, version, run_id)
        else:
            log.info("%s version %s is already registered for run %s", name, version, run_id)
        manifest = plugin_manifest(name, str(version), info, result, lineage)
        # Re-logging on a retry rewrites the same content, so this stays idempotent.
        client.log_dict(run_id, manifest, MANIFEST_ARTIFACT)
    return {
        "model_name": name,
        "model_version": str(version),
        "model_uri": f"models:/{name}/{version}",
        "training_run_id": run_id,
        "weights_sha256": sha,
        "manifest": manifest,
    }
