"""With a real scheduler: a run triggered over the REST API registers a model, and its Asset event
makes the scheduler start `arf_evaluate`, whose success rate lands on the model version.

Starts api-server, scheduler, dag-processor, triggerer and MLflow with `arf up` (the supervised
stack) on free ports, and stops every one of them afterwards (also when the test fails).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from arf_training import embedded as embedded_default
from arf_training import stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(port: int, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v2{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (localhost)
        return json.loads(resp.read() or b"{}")


def _poll(what: str, fn, timeout: float, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except OSError as exc:  # HTTP 404 while the DAG is not parsed yet, etc.
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.fixture
def running_airflow(embedded):
    api_port, mlflow_port = _free_port(), _free_port()
    stack.up(stack.StackOptions(api_port=api_port, mlflow_port=mlflow_port))
    try:
        yield api_port
    finally:
        stopped = stack.down()
        assert set(stopped) >= {"api-server", "scheduler", "dag-processor", "triggerer", "mlflow"}


def test_asset_event_triggers_arf_evaluate_with_a_real_scheduler(running_airflow):
    port = running_airflow
    _poll("reach_bc to be parsed", lambda: _api(port, "GET", "/dags/reach_bc"), 180)
    _poll("arf_evaluate to be parsed", lambda: _api(port, "GET", "/dags/arf_evaluate"), 180)
    run = _api(port, "POST", "/dags/reach_bc/dagRuns",
               {"logical_date": None, "conf": {"epochs": 3}})
    run_id = run["dag_run_id"]

    def finished():
        state = _api(port, "GET", f"/dags/reach_bc/dagRuns/{run_id}")["state"]
        assert state != "failed", f"reach_bc run {run_id} failed"
        return state == "success"

    _poll(f"reach_bc run {run_id}", finished, 900)

    register = _api(port, "GET", f"/dags/reach_bc/dagRuns/{run_id}/taskInstances/register_model"
                                 "/xcomEntries/return_value")["value"]
    register = register if isinstance(register, dict) else json.loads(register)
    version = str(register["model_version"])

    def xcom_of(eval_run_id: str) -> list[dict]:
        value = _api(port, "GET", f"/dags/arf_evaluate/dagRuns/{eval_run_id}"
                                  "/taskInstances/evaluate/xcomEntries/return_value")["value"]
        return value if isinstance(value, list) else json.loads(value)

    def evaluated():
        # Earlier tests of this session may have left Asset events of their own: the scheduler
        # turns those into runs as well. Ours is the one that evaluated our version.
        runs = _api(port, "GET", "/dags/arf_evaluate/dagRuns")["dag_runs"]
        failed = [r for r in runs if r["state"] == "failed"]
        assert not failed, f"arf_evaluate failed: {failed}"
        return [result for r in runs
                if r["run_type"] == "asset_triggered" and r["state"] == "success"
                for result in xcom_of(r["dag_run_id"])
                if result["model_name"] == "reach_bc_policy"
                and str(result["model_version"]) == version]

    [result] = _poll(f"an asset-triggered arf_evaluate run of version {version}", evaluated, 600)

    from mlflow.tracking import MlflowClient

    uri = embedded_default.environment()["ARF_TRACKING_URI"]
    model_version = MlflowClient(uri, uri).get_model_version("reach_bc_policy", version)
    assert float(model_version.tags["arf.eval.success_rate"]) == pytest.approx(
        result["success_rate"])
    assert model_version.tags["arf.dag_run_id"] == run_id
