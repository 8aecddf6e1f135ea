"""`evaluation.gate.approval: required` end to end through the REST API of a real Airflow:
the gate proposes a promotion, the ApprovalOperator waits with the evidence, a person approves
(the alias moves) or rejects (the rejection is recorded, the alias stays).

Its own Airflow deployment (api-server, scheduler, dag-processor, triggerer) over a templates
folder holding one template with approval required; models logged straight into MLflow (the
expert and a zero policy), so no training run is needed.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from airflow_procs import AirflowProcesses

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL = "approval_policy"
MARGIN = "  promotion_margin: 0.02\n"
TIMEOUT = "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"


def _template() -> str:
    text = (REPO / "config_templates" / "reach_bc.yaml").read_text()
    assert MARGIN in text and "name: reach_bc_policy" in text and "name: reach_bc\n" in text
    text = text.replace("name: reach_bc_policy", f"name: {MODEL}")
    text = text.replace("name: reach_bc\n", "name: approval_bc\n")
    text = text.replace("  episodes: 50\n", "  episodes: 10\n")
    return text.replace(MARGIN, MARGIN + "  gate: {approval: required, max_episodes: 20}\n")


@pytest.fixture(scope="module")
def stack(embedded, arf_home, tmp_path_factory):
    import os

    from arf_training.settings import ArfSettings

    folder = tmp_path_factory.mktemp("approval-templates")
    (folder / "approval_bc.yaml").write_text(_template())
    saved = {k: os.environ.get(k) for k in ("ARF_TEMPLATES_DIR", TIMEOUT)}
    os.environ["ARF_TEMPLATES_DIR"] = str(folder)
    # The workers' calls to the execution API time out after 5 s by default: on a loaded
    # machine the task then dies before it starts (httpx ReadTimeout in the scheduler log).
    os.environ[TIMEOUT] = "60"
    base = ArfSettings.from_env()
    home = arf_home / "approval-stack"
    home.mkdir(exist_ok=True)
    procs = AirflowProcesses(ArfSettings(home=home, tracking_uri=base.tracking_uri,
                                         datahub_uri=base.datahub_uri,
                                         artifact_root=base.artifact_root))
    try:
        procs.start()
        procs.wait_for_dags(["approval_bc"], timeout_s=600)  # arf_evaluate: same file
        yield procs, base.tracking_uri
    finally:
        procs.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Api:
    def __init__(self, procs: AirflowProcesses) -> None:
        self.url = procs.url
        token = self._call("POST", f"{self.url}/auth/token",
                           {"username": procs.username, "password": procs.password}, None)
        self.token = token["access_token"]

    @staticmethod
    def _call(method: str, url: str, body: dict | None, token: str | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, method=method, headers=headers,
                                         data=json.dumps(body).encode() if body else None)
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (localhost)
            return json.loads(resp.read() or b"{}")

    def __call__(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._call(method, f"{self.url}/api/v2{path}", body, self.token)


def _poll(what: str, fn, timeout: float = 600, interval: float = 2.0):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except OSError as exc:  # 404 until the task has asked, etc.
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def _register(uri: str) -> None:
    """v1: a zero policy (fails), v2 and v3: the expert; v1 is the champion."""
    import mlflow
    from mlflow import MlflowClient
    from torch import nn

    from approval_policies import ExpertPolicy

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    zero = nn.Linear(10, 2)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    from arf_training.settings import ArfSettings

    # With an artifact location of the test home's: MLflow's default is ./mlruns of the checkout.
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("approval-e2e", artifact_location=str(
        Path(ArfSettings.from_env().artifact_root) / "approval-e2e"))
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(zero, name="zero", registered_model_name=MODEL,
                                 serialization_format="pt2", pip_requirements=["torch"],
                                 input_example=np.zeros((2, 10), dtype=np.float32))
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pytorch.log_model(ExpertPolicy(), name="expert", registered_model_name=MODEL,
                                     serialization_format="pickle", pip_requirements=["torch"],
                                     code_paths=[str(Path(__file__).with_name(
                                         "approval_policies.py"))])
    client.set_registered_model_alias(MODEL, "champion", "1")


def _evaluate_and_answer(api: Api, version: str, answer: str) -> tuple[str, dict]:
    run = api("POST", "/dags/arf_evaluate/dagRuns",
              {"logical_date": None, "conf": {"model_name": MODEL, "model_version": version}})
    run_id = run["dag_run_id"]
    runs = f"/dags/arf_evaluate/dagRuns/{run_id}"
    path = f"{runs}/taskInstances/approve_promotion/-1/hitlDetails"
    waiting_since: dict[int, float] = {}
    answered: set[int] = set()

    def asked():
        state = api("GET", runs)["state"]
        assert state != "failed", f"arf_evaluate {run_id} failed before asking"
        # Answer only once the task has waited a few seconds (Airflow 3.3: awaiting_input;
        # before: deferred). Airflow 3.3.2's scheduler treats the worker's exit event of the
        # paused try as "state changed externally" if the answer re-queued the task before
        # that event was processed (its resume-after-defer exception covers SCHEDULED, not
        # QUEUED) and retries the task, which asks afresh: seen in CI with an answer 1 s in.
        ti = api("GET", f"{runs}/taskInstances/approve_promotion")
        if ti["state"] not in ("awaiting_input", "deferred") or ti["try_number"] in answered:
            return None
        since = waiting_since.setdefault(ti["try_number"], time.monotonic())
        if time.monotonic() - since < 5:
            return None
        detail = api("GET", path)
        api("PATCH", path, {"chosen_options": [answer], "params_input": {}})
        answered.add(ti["try_number"])
        return detail

    def finished():
        state = api("GET", runs)["state"]
        if state in ("success", "failed"):
            return state
        asked()  # the race above despite the wait (a slow scheduler loop): answer the retry
        return None

    detail = _poll(f"the approval question of v{version}", asked)
    assert _poll(f"arf_evaluate {run_id} to finish", finished) == "success"
    return run_id, detail


def _task_state(api: Api, run_id: str, task_id: str) -> str:
    return api("GET", f"/dags/arf_evaluate/dagRuns/{run_id}/taskInstances/{task_id}")["state"]


def test_approve_moves_the_alias_and_reject_is_recorded(stack):
    from mlflow import MlflowClient

    procs, uri = stack
    _register(uri)
    client = MlflowClient(uri, uri)
    api = Api(procs)
    _poll("arf_evaluate to be parsed", lambda: api("GET", "/dags/arf_evaluate"), 300)

    run_id, detail = _evaluate_and_answer(api, "2", "Approve")
    body = detail.get("body") or ""
    assert "v2" in body and "v1" in body and "p-value" in body, body
    assert detail["options"] == ["Approve", "Reject"]
    assert _task_state(api, run_id, "promote_approved") == "success"
    assert _task_state(api, run_id, "record_rejection") == "skipped"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, "previous-champion").version) == "1"
    tags = client.get_model_version(MODEL, "2").tags
    assert tags["arf.gate.approval"] == "approved" and tags["arf.gate.approved_by"]
    assert tags["arf.gate.decision"] == "promoted" and "McNemar" in tags["arf.gate.test"]

    client.set_registered_model_alias(MODEL, "champion", "1")
    run_id, _ = _evaluate_and_answer(api, "3", "Reject")
    assert _task_state(api, run_id, "promote_approved") == "skipped"
    assert _task_state(api, run_id, "record_rejection") == "success"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    tags = client.get_model_version(MODEL, "3").tags
    assert tags["arf.gate.approval"] == "rejected" and tags["arf.gate.rejected_by"]
