"""`arf-trainer custom-setup`: what a template's own training command finds ready when it starts.

The backend runs this once before the command (a process of the local backend, an init
container on Kubernetes) for every start of the train step: first try, Airflow retry, resume
after a preemption. It is idempotent per DAG run, in this order:

1. the DAG run's MLflow run is created, or found again on a later start (the same run the
   register step completes with lineage, model and version), tagged with the reproducibility
   record known before training; the command's framework logs into it live;
2. `model.base_model`, if set, is resolved once per DAG run: the first start pins the version
   (``<train dir>/base_model/base_model.json``) and downloads its `model` artifact folder there;
   every later start reuses the pin, so a promotion mid-run never changes the base;
3. the job spec the command reads (`JOB_SPEC_FILE` in the train dir): the step's job spec plus
   `base_model` (its URI, the pinned version, run id and local folder; null without one). It is a
   file under every backend: a pod receives its job spec inline (ARF_JOB_SPEC_JSON), and a user's
   script should not have to know that;
4. the environment the launch wrapper sources (`ENV_FILE` in the train dir): ARF_JOB_SPEC (that
   file; ARF_JOB_SPEC_JSON unset), MLflow's standard variables (MLFLOW_TRACKING_URI for every
   rank; MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_ID and ARF_LOG_TO_MLFLOW=true for global rank 0,
   ARF_LOG_TO_MLFLOW=false for the others), the base model (ARF_BASE_MODEL_DIR,
   ARF_BASE_MODEL_URI, ARF_BASE_MODEL_VERSION) for every rank;
5. `RUN_FILE` in the train dir: {"experiment_id", "run_id", "base_model"}, for whoever ends the
   run without a register step (`arf training reproduce`).

Several pods of one PyTorchJob may run it at once: each settles on the oldest run with the DAG
run's key and writes its files by atomic rename (from a temporary name of its own: the init
containers of two pods may both be PID 1), so they agree.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

from arf_trainer import __version__, tracking
from arf_trainer.errors import SpecError
from arf_trainer.spec import StepEnv, read_json

log = logging.getLogger(__name__)

ENV_FILE = "custom_env.sh"
RUN_FILE = "custom_run.json"  # arf_training.reproduce reads it (same name there)
JOB_SPEC_FILE = "job_spec.json"
BASE_FOLDER = "base_model"
PIN_FILE = "base_model.json"
MODEL_ARTIFACT = "model"  # the folder register logs for a custom command's version


def train_dir(env: StepEnv) -> Path:
    """The folder of this training (``<workspace>/train`` or a trial's folder)."""
    return Path(os.environ.get("ARF_CHECKPOINT_DIR") or env.workspace / "train" / "checkpoints"
                ).parent


def lineage_tags(env: StepEnv) -> dict[str, str]:
    """The reproducibility record a custom command's run carries (weights' sha256 aside)."""
    spec = env.spec
    manifest_path = env.workspace / "prepare" / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    tables = {n: t.get("version") for n, t in manifest.get("tables", {}).items()}
    resolved = {"template": spec.template, "hyperparameters": spec.hyperparameters,
                "seed": spec.seed}
    distributed = spec.training.get("distributed") or {}
    return {
        "arf.template": spec.name,
        "arf.template_sha256": spec.template_sha256,
        **tracking.dag_run_tags(spec.run),
        "arf.conf": tracking.canonical_json(spec.conf),
        "arf.data_fingerprint": str(manifest.get("fingerprint", "")),
        "arf.data_tables": tracking.canonical_json(tables),
        "arf.config_hash": tracking.sha256_json(resolved),
        "arf.code_version": tracking.canonical_json({"arf_trainer": __version__,
                                                     **spec.code_version}),
        "arf.world_size": str(int(distributed.get("nodes", 1))
                              * int(distributed.get("procs_per_node", 1))),
        "arf.recipe": "custom-command",
        "arf.command": tracking.canonical_json(spec.training["command"]),
    }


def find_or_create_custom_run(client: Any, env: StepEnv) -> tuple[str, str]:
    """(experiment id, run id) of the DAG run's MLflow run; race-safe across pods."""
    spec = env.spec
    experiment_id = tracking.get_or_create_experiment(client, spec.name, env.artifact_root)
    run_id, existed = tracking.find_or_create_run(client, experiment_id, spec.run.dag_id,
                                                  spec.run.run_id, lineage_tags(env))
    if not existed:
        # Another pod of the same job may have created one at the same moment: keep the oldest.
        oldest = tracking.find_run_by_tag(client, experiment_id, tracking.DAG_RUN_TAG,
                                          tracking.dag_run_key(spec.run.dag_id, spec.run.run_id))
        if oldest is not None and oldest != run_id:
            client.delete_run(run_id)
            run_id = oldest
        else:
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in
                                             {**spec.hyperparameters, "seed": spec.seed}.items()])
    return experiment_id, run_id


def pin_base_model(client: Any, uri: str, folder: Path, tracking_uri: str) -> dict[str, Any]:
    """Resolve `uri` once per DAG run; download the version's `model` folder next to the pin."""
    from arf_trainer.registry import resolve

    pin_path = folder / PIN_FILE
    if pin_path.is_file():
        record = read_json(pin_path)
        if record.get("uri") != uri:
            raise SpecError(f"{pin_path} pins {record.get('uri')!r} but the template now says "
                            f"model.base_model {uri!r}; one workspace holds one training: use a "
                            "new DAG run, or delete the workspace's train/ folder")
        log.info("base model %s: version %s pinned by an earlier start", uri, record["version"])
        return record
    version = resolve(client, uri, tracking_uri)
    if not version.run_id:
        raise SpecError(f"model.base_model {uri!r} resolved to version {version.version}, which "
                        "has no training run to download its files from; register it from a run")
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / MODEL_ARTIFACT
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        with tracking.mlflow_errors(tracking_uri, f"download {MODEL_ARTIFACT}/ of {uri}"):
            local = Path(client.download_artifacts(version.run_id, MODEL_ARTIFACT, tmp))
        if not model_dir.exists():
            os.replace(local, model_dir)  # atomic: a concurrent pod sees all of it or none
    record = {"uri": uri, "name": version.name, "version": str(version.version),
              "run_id": version.run_id, "dir": str(model_dir)}
    # Last: its presence means "pinned and complete".
    write_atomic(pin_path, json.dumps(record, indent=2, sort_keys=True))
    log.info("base model %s resolved to version %s (run %s)", uri, record["version"],
             record["run_id"])
    return record


def env_file_text(tracking_uri: str, experiment_id: str, run_id: str,
                  base: dict[str, Any] | None, job_spec: Path | None = None) -> str:
    """The shell fragment the launch wrapper sources (quoted: any value is safe)."""
    q = shlex.quote
    lines = ["# written by arf-trainer custom-setup: sourced by every rank of the command"]
    if job_spec is not None:
        # One way to read the spec under every backend (a pod has it inline only).
        lines.append(f"export ARF_JOB_SPEC={q(str(job_spec))}; unset ARF_JOB_SPEC_JSON")
    if base:
        lines.append(f"export ARF_BASE_MODEL_DIR={q(base['dir'])} "
                     f"ARF_BASE_MODEL_URI={q(base['uri'])} "
                     f"ARF_BASE_MODEL_VERSION={q(base['version'])}")
    # Every rank knows the server (a logger built on every rank, as Lightning's is, needs it;
    # without it MLflow falls back to ./mlruns); only rank 0 knows the run.
    lines += [
        f"export MLFLOW_TRACKING_URI={q(tracking_uri)}",
        'if [ "${RANK:-0}" = 0 ]; then',
        f"  export MLFLOW_EXPERIMENT_ID={q(experiment_id)} MLFLOW_RUN_ID={q(run_id)} "
        "ARF_LOG_TO_MLFLOW=true",
        "else",
        "  # Only global rank 0 logs: the others would write every point once per rank.",
        "  export ARF_LOG_TO_MLFLOW=false",
        "  unset MLFLOW_RUN_ID MLFLOW_EXPERIMENT_ID",
        "fi",
    ]
    return "\n".join(lines) + "\n"


def run_custom_setup(env: StepEnv) -> dict[str, Any]:
    """Create/find the run, pin the base model, write the env file. Returns what it set."""
    folder = train_dir(env)
    client = tracking.configure(env.tracking_uri)
    with tracking.mlflow_errors(env.tracking_uri, f"set up the MLflow run of {env.spec.name!r}"):
        experiment_id, run_id = find_or_create_custom_run(client, env)
        uri = env.spec.model.get("base_model")
        base = pin_base_model(client, uri, folder / BASE_FOLDER, env.tracking_uri) \
            if uri else None
    folder.mkdir(parents=True, exist_ok=True)
    job_spec = folder / JOB_SPEC_FILE
    write_atomic(job_spec, json.dumps({**env.spec.raw, "base_model": base}, indent=2,
                                      sort_keys=True))
    target = folder / ENV_FILE
    write_atomic(target, env_file_text(env.tracking_uri, experiment_id, run_id, base, job_spec))
    log.info("custom command: MLflow run %s (experiment %s)%s; environment in %s", run_id,
             experiment_id, f", base model version {base['version']}" if base else "", target)
    summary = {"experiment_id": experiment_id, "run_id": run_id, "base_model": base}
    write_atomic(folder / RUN_FILE, json.dumps(summary, indent=2, sort_keys=True))
    print(json.dumps(summary), flush=True)
    return summary


def write_atomic(target: Path, text: str) -> None:
    """Readers see all of `text` or the previous file; the temporary name is unique per writer
    even across pods sharing the volume (a pid is not: init containers are often PID 1)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.fchmod(fd, 0o644)  # as a plain write would: the command's container may read it
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def base_model_record(env: StepEnv) -> dict[str, Any] | None:
    """The pinned base model of this training (for register's lineage), if any."""
    path = train_dir(env) / BASE_FOLDER / PIN_FILE
    return read_json(path) if path.is_file() else None

