"""Helpers for the trainer/publisher tests: job specs from the real templates, prepared data.

Not a test module. `prepare_digits` / `prepare_reach` write what the prepare step writes
(``<workspace>/prepare/manifest.json`` + Parquet shards), so the train step runs for real.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from arf_trainer.spec import JobSpec, StepEnv

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "config_templates"
VENV_BIN = Path(sys.executable).parent


def load_template(name: str) -> tuple[dict[str, Any], str]:
    """The template as the Airflow side hands it over (defaults filled), and its sha256."""
    text = (TEMPLATES / f"{name}.yaml").read_text()
    template = yaml.safe_load(text)
    template["dataset"].setdefault("tables", {})
    template["model"].setdefault("base_model", None)
    return template, hashlib.sha256(text.encode()).hexdigest()


def make_spec(template_name: str, step: str = "train", *, run_id: str = "manual__1",
              hyperparameters: dict[str, Any] | None = None,
              training: dict[str, Any] | None = None) -> dict[str, Any]:
    """A spec_version=1 job spec: template defaults + overrides, like a trigger conf would."""
    template, sha = load_template(template_name)
    template = copy.deepcopy(template)
    template["training"].update(training or {})
    # ARF_TEST_DATA_LOADING=stream reruns every trainer test on the streaming path (a spec
    # that names its own data_loading keeps it).
    if os.environ.get("ARF_TEST_DATA_LOADING"):
        template["training"].setdefault("data_loading", os.environ["ARF_TEST_DATA_LOADING"])
    hp = {k: v["default"] for k, v in template["training"]["hyperparameters"].items()}
    hp.update(hyperparameters or {})
    return {
        "spec_version": 1,
        "step": step,
        "template": template,
        "template_sha256": sha,
        "conf": {"hyperparameters": hyperparameters or {}},
        "hyperparameters": hp,
        "seed": template["training"]["seed"],
        "run": {"dag_id": f"arf_{template_name}", "run_id": run_id, "task_id": step,
                "try_number": 1},
        "inputs": {},
        "code_version": {"package": "0.1.0", "git_commit": "test"},
    }


def make_env(spec: dict[str, Any], workspace: Path, tracking_uri: str,
             artifact_root: Path) -> StepEnv:
    return StepEnv(workspace=workspace, result_path=workspace / spec["step"] / "result.json",
                   tracking_uri=tracking_uri, artifact_root=str(artifact_root),
                   datahub=workspace / "hub", spec=JobSpec.from_dict(spec))


def step_environ(spec_path: Path, workspace: Path, tracking_uri: str, artifact_root: Path,
                 run_id: str, step: str = "train") -> dict[str, str]:
    """The ARF_* environment a backend sets, for `arf-trainer` subprocesses."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ARF_", "MLFLOW_")) and k not in ("RANK", "WORLD_SIZE")}
    env.update({
        "ARF_JOB_SPEC": str(spec_path), "ARF_WORKSPACE": str(workspace),
        "ARF_RESULT_PATH": str(workspace / step / "result.json"),
        "ARF_TRACKING_URI": tracking_uri, "ARF_ARTIFACT_ROOT": str(artifact_root),
        "ARF_DATAHUB_URI": str(workspace / "hub"), "ARF_DAG_ID": "test", "ARF_RUN_ID": run_id,
        "ARF_TASK_ID": step, "ARF_TRY_NUMBER": "1", "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    })
    return env


def _arrow(values: np.ndarray) -> Any:
    """A column; a 2-D array is a fixed-size list column (FLOAT[n]), as DuckDB writes one."""
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _write_prepare(workspace: Path, columns: dict[str, np.ndarray], features: list[str],
                   targets: list[str], val_fraction: float, shards: int, seed: int) -> dict:
    prepare = workspace / "prepare"
    n = len(next(iter(columns.values())))
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    manifest_shards: dict[str, list[dict[str, Any]]] = {}
    fingerprint = hashlib.sha256()
    for split, rows in splits.items():
        manifest_shards[split] = []
        for i, part in enumerate(np.array_split(np.sort(rows), shards)):
            rel = f"{split}/shard-{i:05d}.parquet"
            (prepare / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({k: _arrow(v[part]) for k, v in columns.items()}),
                           prepare / rel)
            digest = hashlib.sha256((prepare / rel).read_bytes()).hexdigest()
            fingerprint.update(digest.encode())
            manifest_shards[split].append({"path": rel, "rows": len(part), "sha256": digest})
    manifest = {
        "query": "SELECT * FROM test", "rows": n, "train_rows": n - n_val, "val_rows": n_val,
        "columns": [{"name": k, "type": str(_arrow(v[:1]).type)} for k, v in columns.items()],
        "features": features, "targets": targets,
        "tables": {"test": {"version": 3, "uri": "file:///hub/test"}},
        "fingerprint": fingerprint.hexdigest(), "shards": manifest_shards,
        "validation_split": val_fraction, "seed": seed, "created_with": {"test": True},
    }
    (prepare / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def prepare_digits(workspace: Path, rows: int | None = None) -> dict:
    """sklearn's 8x8 digits as columns pixel_0..pixel_63 + label, 20% validation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data[:rows], digits.target[:rows]
    columns = {f"pixel_{i}": x[:, i].astype(np.float64) for i in range(x.shape[1])}
    columns["label"] = y.astype(np.int64)
    return _write_prepare(workspace, columns, [f"pixel_{i}" for i in range(x.shape[1])],
                          ["label"], 0.2, shards=2, seed=0)


def prepare_reach(workspace: Path, rows: int = 600, arrays: bool = False) -> dict:
    """A synthetic 10-dim observation -> 2-dim action regression in non-unit scales; with
    `arrays`, the observation is one FLOAT[10] column `obs` (scalars `obs_0..9` otherwise)."""
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(rows, 10)) * np.linspace(0.5, 5.0, 10) + 3.0
    act = np.tanh(obs @ rng.normal(size=(10, 2)) / 10.0) * [2.0, 0.5] + [1.0, -3.0]
    columns = {"obs": obs.astype(np.float32)} if arrays else \
        {f"obs_{i}": obs[:, i] for i in range(10)}
    columns.update({f"act_{j}": act[:, j] for j in range(2)})
    return _write_prepare(workspace, columns, list(columns)[:-2], ["act_0", "act_1"], 0.1,
                          shards=1, seed=0)


_MIGRATED_DB: Path | None = None


def fresh_tracking_uri(directory: Path) -> str:
    """A sqlite MLflow store in `directory`, copied from one migrated once per session.

    Creating MLflow's schema takes ~5 s; copying an empty migrated database takes ~1 ms.
    """
    global _MIGRATED_DB
    import atexit
    import shutil
    import tempfile

    if _MIGRATED_DB is None:
        import mlflow

        folder = tempfile.mkdtemp(prefix="arf-mlflow-template-")
        atexit.register(shutil.rmtree, folder, True)
        path = Path(folder) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
        _MIGRATED_DB = path
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(_MIGRATED_DB, directory / "mlflow.db")
    return f"sqlite:///{directory / 'mlflow.db'}"


FED_VENV = Path(os.environ.get("ARF_FEDERATION_VENV") or REPO / ".federation-venv")


def start_federate_step(tmp_path: Path, run_id: str, sites: list[str], *, rounds: int,
                        min_sites: int = 2, hyperparameters: dict[str, Any] | None = None,
                        timeout_minutes: int | None = None, log: Path | None = None) -> Any:
    """`arf-trainer federate` of reach_bc over `sites` (100 prepared rows each, under
    ``tmp_path/run/sites/<site>``), started in the federation venv as the local backend starts
    it: (the process, the run workspace). Output to `log`, or discarded."""
    import subprocess

    workspace = tmp_path / "run"
    for site in sites:
        prepare_reach(workspace / "sites" / site, rows=100)
    training: dict[str, Any] = {"distributed": {"nodes": 1, "procs_per_node": 1}}
    if timeout_minutes is not None:
        training["timeout_minutes"] = timeout_minutes
    spec = make_spec("reach_bc", "federate", run_id=run_id, hyperparameters=hyperparameters,
                     training=training)
    spec["template"]["federated"] = {
        "sites": [{"name": s, "hub": f"/hubs/{s}", "query": None} for s in sites],
        "rounds": rounds, "strategy": "fedavg", "fraction_fit": 1.0, "min_sites": min_sites,
        "local_epochs": 1, "proximal_mu": None}
    (workspace / "federate.json").write_text(json.dumps(spec))
    env = step_environ(workspace / "federate.json", workspace,
                       fresh_tracking_uri(tmp_path / "mlflow"), tmp_path / "art", run_id,
                       step="federate")
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([str(FED_VENV / "bin" / "arf-trainer"), "federate"], env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    if log:
        out.close()
    return proc, workspace
