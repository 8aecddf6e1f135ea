"""End to end through real Airflow (`airflow dags test`), torchrun DDP, MLflow and MuJoCo.

The Asset event -> `arf_evaluate` hand-over is shown by running `arf_evaluate` with the payload
of the event that `register_model` recorded in the Airflow metadata DB (no scheduler here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_runs import latest_run, task_states
from arf_training.demo import demo_line
from arf_training.settings import ArfSettings
from arf_training.stepspec import workspace_for

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def dags_test(env, dag_id: str, conf: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=900)


def ui_task_log(dag_id: str, run_id: str, task_id: str) -> str:
    """A task's log as the api-server reads it for the UI (TaskLogReader: the file under
    `[logging] base_log_folder`, else the worker's log server)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.log.log_reader import TaskLogReader
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalars(select(TaskInstance).where(
            TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id,
            TaskInstance.task_id == task_id)).one()
        return "".join(TaskLogReader().read_log_stream(ti, ti.try_number, {}))


def mlflow_client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env["ARF_TRACKING_URI"], registry_uri=env["ARF_TRACKING_URI"])


def test_digits_smoke_with_two_ddp_processes(embedded):
    proc = dags_test(embedded, "digits_smoke", {"epochs": 2})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run("digits_smoke")
    assert str(run.state) == "success"
    assert task_states("digits_smoke", run.run_id) == {
        "prepare_data": "success", "train": "success", "register_model": "success"}

    ws = workspace_for(ArfSettings.from_env(), "digits_smoke", run.run_id)
    train = json.loads((ws / "train" / "result.json").read_text())
    register = json.loads((ws / "register" / "result.json").read_text())
    assert train["world_size"] == 2

    client = mlflow_client(embedded)
    version = client.get_model_version("digits_classifier", str(register["model_version"]))
    tags = version.tags
    for key in ("arf.template", "arf.template_sha256", "arf.dag_run_id", "arf.data_fingerprint",
                "arf.config_hash", "arf.code_version", "arf.weights_sha256", "arf.training_run_id"):
        assert tags.get(key), f"model version lacks lineage tag {key}: {tags}"
    assert tags["arf.template"] == "digits_smoke" and tags["arf.dag_run_id"] == run.run_id
    assert tags["arf.weights_sha256"] == train["weights_sha256"]
    training_run = client.get_run(version.run_id)
    assert training_run.data.metrics, "training run has no metrics"
    assert training_run.data.tags.get("arf.data_fingerprint") == tags["arf.data_fingerprint"]
    artifacts = [a.path for a in client.list_artifacts(version.run_id)]
    assert "arf_plugin.json" in artifacts, artifacts

    # The recorded lineage is enough to re-run the training and get the same bits.
    proc = subprocess.run([str(BIN / "arf"), "training", "reproduce", version.run_id,
                           "--output", "json"], env=embedded, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(proc.stdout)
    assert report["match"] is True
    assert report["checks"]["weights_sha256"]["rerun"] == train["weights_sha256"]


def test_reach_bc_asset_event_drives_arf_evaluate(embedded):
    proc = dags_test(embedded, "reach_bc", {"epochs": 8})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run("reach_bc")
    assert str(run.state) == "success"

    # `arf demo` shows each epoch as it ends, whole and with one timestamp.
    shown = [demo_line(line) for line in (proc.stdout + proc.stderr).splitlines()]
    epochs = [line for line in shown if line and re.search(r"epoch \d+/8 \| step", line)]
    assert [re.search(r"epoch (\d+)/8", line)[1] for line in epochs] == \
        [str(n) for n in range(1, 9)], epochs
    assert not any(re.search(r"\d{4}[-/]\d\d[-/]\d\d", line) for line in epochs), epochs
    # The UI finds each task's log of this `dags test` run, with the step's output in it.
    train_log = ui_task_log("reach_bc", run.run_id, "train")
    assert "task_id=train/attempt=1.log" in train_log, train_log[-3000:]
    assert "epoch 8/8 | step" in train_log and "Could not read served logs" not in train_log

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        event = session.scalars(select(AssetEvent).where(
            AssetEvent.source_dag_id == "reach_bc", AssetEvent.source_run_id == run.run_id)).one()
        uri, extra = event.asset.uri, dict(event.extra)
    assert uri.rstrip("/") == "arf-model://reach_bc_policy"
    assert extra["model_name"] == "reach_bc_policy" and extra["dag_run_id"] == run.run_id

    payload = {"model_name": extra["model_name"], "model_version": extra["model_version"]}
    proc = dags_test(embedded, "arf_evaluate", payload)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "success rate" in ui_task_log("arf_evaluate", latest_run("arf_evaluate").run_id,
                                         "evaluate")
    version = mlflow_client(embedded).get_model_version("reach_bc_policy", extra["model_version"])
    rate = float(version.tags["arf.eval.success_rate"])
    assert 0.0 <= rate <= 1.0
    assert float(version.tags["arf.eval.mean_final_distance"]) >= 0.0
    assert version.tags["arf.eval.episodes"] == "50"

    # The demo's DAG, data and a 2-process DDP training: re-run from its lineage, same bits.
    proc = subprocess.run([str(BIN / "arf"), "training", "reproduce", version.run_id],
                          env=embedded, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "result: match" in proc.stdout, proc.stdout[-2000:]


def test_unknown_conf_key_fails_before_any_step_runs(embedded):
    proc = dags_test(embedded, "digits_smoke", {"epochs": 2, "learning_rate": 0.1})
    output = proc.stdout + proc.stderr
    assert "unknown parameter 'learning_rate'" in output, output[-4000:]
    run = latest_run("digits_smoke")
    assert str(run.state) == "failed"
    states = task_states("digits_smoke", run.run_id)
    assert states["prepare_data"] == "failed" and states["train"] != "success"
    # The UI shows why, in the failed task's log.
    assert "unknown parameter 'learning_rate'" in ui_task_log("digits_smoke", run.run_id,
                                                              "prepare_data")
    ws = workspace_for(ArfSettings.from_env(), "digits_smoke", run.run_id)
    assert not (ws / "prepare").exists() and not (ws / "train").exists()


def test_wrong_type_conf_is_rejected_naming_the_parameter(embedded):
    # Airflow validates Params when it creates the run (as the UI and REST API do); a run that
    # got past that would be stopped by the first step's own check (see the unit tests).
    proc = dags_test(embedded, "digits_smoke", {"epochs": "many"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Invalid input for param epochs: 'many' is not of type 'integer'" in output, \
        output[-4000:]


def test_reproduce_unknown_run_is_a_clear_error(embedded):
    proc = subprocess.run([str(BIN / "arf"), "training", "reproduce", "0123456789abcdef"],
                          env=embedded, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # bad input, never "mismatch" (1): nothing was compared
    assert "MLflow run '0123456789abcdef' not found" in proc.stderr, proc.stderr[-2000:]


def test_custom_command_template_runs_through_the_same_dag(embedded):
    """A non-PyTorch command (scikit-learn) gets the same contract, registry and lineage."""
    proc = dags_test(embedded, "digits_sklearn", {"c": 0.5})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run("digits_sklearn")
    assert str(run.state) == "success"
    ws = workspace_for(ArfSettings.from_env(), "digits_sklearn", run.run_id)
    assert (ws / "train" / "output" / "model.joblib").exists()
    register = json.loads((ws / "register" / "result.json").read_text())
    client = mlflow_client(embedded)
    version = client.get_model_version("digits_sklearn_logreg", register["model_version"])
    assert version.tags["arf.template"] == "digits_sklearn"
    assert version.tags["arf.weights_sha256"] == register["weights_sha256"]
    training_run = client.get_run(version.run_id)
    assert training_run.data.metrics["val_accuracy"] > 0.9
    assert training_run.data.params["c"] == "0.5"
    assert "arf_plugin.json" in [a.path for a in client.list_artifacts(version.run_id)]

    # Reproduce works for a custom command too: custom-setup, the command, and its output
    # folder hashed as register hashes it; same data, same bits.
    proc = subprocess.run([str(BIN / "arf"), "training", "reproduce", version.run_id,
                           "--output", "json"], env=embedded, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(proc.stdout)
    assert report["match"] is True, report
    assert report["checks"]["weights_sha256"]["rerun"] == register["weights_sha256"]
    # The re-run's own MLflow run (opened by custom-setup, no register step) is ended.
    rerun = client.get_run(report["rerun_training_run_id"])
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags["arf.reproduce_of"] == version.run_id
    assert rerun.info.run_id != version.run_id
