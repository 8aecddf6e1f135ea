"""digits_smoke on a real cluster: the same template, ARF_BACKEND=kubernetes, nothing else.

Airflow runs here (`airflow dags test`, triggers inline); every step runs in the cluster:
prepare/register as Pods (KubernetesPodOperator, result through the xcom sidecar), train as a
PyTorchJob (2 processes). The test seeds the data hub claim first and, at the end, finds the
registered model version in the cluster's MLflow with this DAG run's id on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_runs import latest_run, task_states
from arf_training.templates import load_template
from k8s_cluster import run_pod_to_completion, seed_pod

pytestmark = pytest.mark.k8s
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _preflight(cluster) -> None:
    suite, core, ext = cluster["suite"], cluster["core"], cluster["ext"]
    ns = suite.settings.namespace
    core.read_namespace(ns)  # 404 here: apply helm_values/rbac.yaml first
    ext.read_custom_resource_definition("pytorchjobs.kubeflow.org")  # the training operator
    for claim in (suite.settings.workspace_pvc, suite.settings.datahub_pvc):
        phase = core.read_namespaced_persistent_volume_claim(claim, ns).status.phase
        # WaitForFirstConsumer classes (kind's local-path) bind when the first pod mounts them.
        assert phase in ("Bound", "Pending"), f"claim {ns}/{claim} is {phase}"


def test_digits_smoke_registers_a_model_on_the_cluster(cluster, embedded):
    from mlflow.tracking import MlflowClient

    suite = cluster["suite"]
    _preflight(cluster)
    run_pod_to_completion(cluster["core"], seed_pod(suite.settings), timeout_s=900)

    env = {**embedded, **suite.env, "ARF_BACKEND": "kubernetes"}
    proc = subprocess.run([str(BIN / "airflow"), "dags", "test", "digits_smoke",
                           "-c", json.dumps({"epochs": 2})],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]

    run = latest_run("digits_smoke")
    assert str(run.state) == "success"
    assert task_states("digits_smoke", run.run_id) == {
        "prepare_data": "success", "train": "success", "register_model": "success"}

    model = load_template(REPO / "config_templates" / "digits_smoke.yaml").template.model.name
    client = MlflowClient(tracking_uri=suite.test_tracking_uri,
                          registry_uri=suite.test_tracking_uri)
    versions = [v for v in client.search_model_versions(f"name='{model}'")
                if v.tags.get("arf.dag_run_id") == run.run_id]
    assert len(versions) == 1, f"no single {model} version carries arf.dag_run_id={run.run_id}"
    assert versions[0].tags.get("arf.weights_sha256")

    # Finished step pods are cleaned up; nothing of this run is left running.
    pods = cluster["core"].list_namespaced_pod(
        suite.settings.namespace, label_selector="app.kubernetes.io/part-of=arf-training").items
    running = [p.metadata.name for p in pods if p.status.phase in ("Pending", "Running")
               and p.metadata.labels.get("arf.dev/dag-id") == "digits_smoke"]
    assert not running, f"step pods still running after the DAG run: {running}"
