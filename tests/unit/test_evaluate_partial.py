"""One arf_evaluate run, several model versions: a version whose evaluation fails does not cost
the others their approval question, and an unanswered question ends as a Reject after
`evaluation.gate.approval_timeout_hours`.

Real Airflow: `dag.test()` runs the DAG through the task runner, with the run's Asset events
linked as the scheduler links them, a person's answer given through the REST API's handler and
the scheduler's own HITL timeout sweep. Real evaluate steps against a real sqlite MLflow (a
zero policy as champion, the scripted expert as candidate). The Kubernetes backend runs against
`fake_k8s`, the only fake.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from fake_k8s import FakeCluster, install
from test_kubernetes_backend import NAMESPACE, context, k8s_dags, k8s_env  # noqa: F401 (fixtures)

from arf_training.approval import APPROVAL_TASK
from arf_training.errors import StepFailed
from arf_training.factory import EVALUATE_DAG_ID

REPO = Path(__file__).resolve().parents[2]
MODEL = "partial_policy"
MARGIN = "  promotion_margin: 0.02\n"


# --- real Airflow, real evaluate steps --------------------------------------------------------


def _template(gate: str) -> str:
    text = (REPO / "config_templates" / "reach_bc.yaml").read_text()
    assert MARGIN in text and "name: reach_bc_policy" in text and "  episodes: 50\n" in text
    text = text.replace("name: reach_bc_policy", f"name: {MODEL}")
    text = text.replace("  episodes: 50\n", "  episodes: 10\n")  # a clear win in one look
    gate = f"  gate: {{approval: required, max_episodes: 20{gate}}}\n"
    return text.replace(MARGIN, MARGIN + gate)


@pytest.fixture()
def evaluate_dag(embedded, tmp_path, monkeypatch):
    """Returns a builder of arf_evaluate for a gate setting, over a fresh MLflow store holding
    MODEL v1 (a zero policy, champion) and v2 (the expert: the gate proposes it)."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from torch import nn
    from trainer_testkit import fresh_tracking_uri

    uri = fresh_tracking_uri(tmp_path / "mlflow")
    monkeypatch.setenv("ARF_TRACKING_URI", uri)  # the evaluate step and the approval tasks
    monkeypatch.setenv("ARF_ARTIFACT_ROOT", str(tmp_path / "eval-artifacts"))
    monkeypatch.syspath_prepend(str(REPO / "tests" / "integration"))
    from approval_policies import ExpertPolicy

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = MlflowClient(uri, uri).create_experiment(
        "partial", artifact_location=(tmp_path / "artifacts").as_uri())
    zero = nn.Linear(10, 2)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(zero, name="zero", registered_model_name=MODEL,
                                 serialization_format="pt2", pip_requirements=["torch"],
                                 input_example=np.zeros((2, 10), dtype=np.float32))
    with mlflow.start_run(experiment_id=experiment):
        # Pickled with its module, so that the evaluate subprocess can load it.
        mlflow.pytorch.log_model(ExpertPolicy(), name="expert", registered_model_name=MODEL,
                                 serialization_format="pickle", pip_requirements=["torch"],
                                 code_paths=[str(REPO / "tests" / "integration"
                                                 / "approval_policies.py")])
    client = MlflowClient(uri, uri)
    client.set_registered_model_alias(MODEL, "champion", "1")
    monkeypatch.setenv("ARF_TEMPLATES_DIR", str(tmp_path))  # dag.test() parses the DAG folder

    def build(gate: str = ""):
        from arf_training.factory import build_evaluate_dag
        from arf_training.templates import load_template

        (tmp_path / "partial.yaml").write_text(_template(gate))
        dag = build_evaluate_dag([load_template(tmp_path / "partial.yaml")], "local")
        # A retry would evaluate every version again after retry_delay (30 s): not under test.
        dag.get_task("evaluate").retries = 0
        return dag

    return SimpleNamespace(build=build, client=client)


@contextlib.contextmanager
def queued_events(versions: list[str]):
    """Link one Asset event per version to the run that dag.test() creates, as the scheduler
    does for Asset events queued into one run (`dag_run.consumed_asset_events.extend`):
    dag.test() itself creates a manual run, which would evaluate at most one version."""
    from airflow.models.asset import AssetEvent, AssetModel, association_table
    from airflow.models.dagrun import DagRun
    from airflow.sdk import timezone
    from sqlalchemy import event, insert, select

    def link(_mapper: Any, connection: Any, run: Any) -> None:
        if run.dag_id != EVALUATE_DAG_ID:
            return
        asset = connection.scalar(select(AssetModel.id).where(
            AssetModel.name == f"arf-model://{MODEL}"))
        for version in versions:
            event_id = connection.scalar(insert(AssetEvent.__table__).values(
                asset_id=asset, extra={"model_name": MODEL, "model_version": version},
                timestamp=timezone.utcnow()).returning(AssetEvent.__table__.c.id))
            connection.execute(insert(association_table).values(dag_run_id=run.id,
                                                                event_id=event_id))

    event.listen(DagRun, "after_insert", link)
    try:
        yield
    finally:
        event.remove(DagRun, "after_insert", link)


class Approver(threading.Thread):
    """Beside dag.test(): once the question waits, answers `choice` after `after_s` seconds as
    a person does (the REST API's PATCH hitlDetails handler), and meanwhile runs the
    scheduler's HITL timeout sweep, which dag.test() does not run. Keeps the question's body.
    If it breaks, it fails the waiting question (else dag.test() would wait forever) and `_test`
    raises its error."""

    def __init__(self, choice: str, after_s: float) -> None:
        super().__init__(daemon=True)
        self.choice, self.after_s, self.body = choice, after_s, None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread by _test
            self.error = exc
            self._fail_question()

    def _waiting(self, session: Any) -> Any:
        from airflow.models.taskinstance import TaskInstance
        from sqlalchemy import select
        from sqlalchemy.orm import joinedload

        return session.scalars(select(TaskInstance).where(
            TaskInstance.dag_id == EVALUATE_DAG_ID, TaskInstance.task_id == APPROVAL_TASK,
            TaskInstance.state == "awaiting_input").options(
            joinedload(TaskInstance.hitl_detail))).first()

    def _serve(self) -> None:
        from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
        from airflow.utils.session import create_session

        asked = None
        while not self.done.wait(0.5):
            SchedulerJobRunner.check_awaiting_input_timeouts(
                SimpleNamespace(log=logging.getLogger("sweep")))
            with create_session() as session:
                ti = self._waiting(session)
                if ti is None:
                    continue
                self.body = ti.hitl_detail.body
                asked = asked or time.monotonic()
                if time.monotonic() - asked >= self.after_s:
                    self._answer(ti, session)

    def _fail_question(self) -> None:
        from airflow.utils.session import create_session

        while not self.done.wait(0.5):
            with create_session() as session:
                ti = self._waiting(session)
                if ti is not None:
                    ti.state = "failed"

    def _answer(self, ti: Any, session: Any) -> None:
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
        from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail

        update_hitl_detail(dag_id=ti.dag_id, dag_run_id=ti.run_id, task_id=ti.task_id,
                           update_hitl_detail_payload=UpdateHITLDetailPayload(
                               chosen_options=[self.choice]),
                           user=SimpleAuthManagerUser(username="alice", role="admin"),
                           session=session)


def _test(dag: Any, approver: Approver, **kwargs: Any) -> Any:
    approver.start()
    try:
        run = dag.test(**kwargs)
    finally:
        approver.done.set()
        approver.join()
    if approver.error is not None:
        raise approver.error
    return run


def _states(run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


@pytest.mark.integration
def test_a_failed_version_does_not_cost_the_others_their_question(evaluate_dag, capfd):
    """Two Asset events in one run: v2 is evaluated (the gate proposes it), v9 fails (not in
    the registry). v2's question must still be asked, and its Reject recorded; the run fails,
    and evaluate names v9 and why."""
    dag = evaluate_dag.build()
    with queued_events(["2", "9"]):
        run = _test(dag, Approver("Reject", after_s=2))
    states = _states(run)
    assert str(run.state) == "failed"
    assert (states["evaluate"], states["approval_needed"], states[APPROVAL_TASK]) == (
        "failed", "success", "success"), states
    assert (states["promote_approved"], states["record_rejection"]) == ("skipped", "success")
    assert states["fail_run_on_error"] == "failed"
    tags = evaluate_dag.client.get_model_version(MODEL, "2").tags
    assert (tags["arf.gate.approval"], tags["arf.gate.rejected_by"]) == ("rejected", "alice")
    assert str(evaluate_dag.client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    out = capfd.readouterr().out
    assert (f"evaluation failed for 1 of 2 model version(s): models:/{MODEL}/9: step "
            "'evaluate' failed") in out, out[-5000:]
    assert f"model version models:/{MODEL}/9 is not in the registry" in out
    assert f"Evaluated: models:/{MODEL}/2" in out


@pytest.mark.integration
def test_an_unanswered_question_is_rejected_after_the_timeout(evaluate_dag):
    """approval_timeout_hours=0.0005 (1.8 s): the scheduler's sweep answers with the default,
    Reject, and record_rejection records it as rejected by "timeout". (Without a timeout the
    question would wait forever: the approver then approves after 60 s, failing the test.)"""
    dag = evaluate_dag.build(", approval_timeout_hours: 0.0005")
    approver = Approver("Approve", after_s=60)
    run = _test(dag, approver, run_conf={"model_name": MODEL, "model_version": "2"})
    states = _states(run)
    assert str(run.state) == "success", states
    assert (states[APPROVAL_TASK], states["promote_approved"], states["record_rejection"]) == (
        "success", "skipped", "success"), states
    assert "No answer within 0.0005 h counts as Reject." in approver.body
    tags = evaluate_dag.client.get_model_version(MODEL, "2").tags
    assert (tags["arf.gate.approval"], tags["arf.gate.rejected_by"]) == ("rejected", "timeout")
    assert str(evaluate_dag.client.get_model_version_by_alias(MODEL, "champion").version) == "1"


# --- the loop itself --------------------------------------------------------------------------


class PushTI:
    def __init__(self) -> None:
        self.pushed: list[tuple[str, Any]] = []

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed.append((key, value))


def _targets(*versions: str) -> list[dict[str, str]]:
    return [{"model_name": "m", "model_version": v, "source": "test"} for v in versions]


def _evaluate(fail: dict[str, BaseException]):
    def evaluate(target: dict[str, str]) -> dict[str, str]:
        if target["model_version"] in fail:
            raise fail[target["model_version"]]
        return {"model_name": "m", "model_version": target["model_version"]}
    return evaluate


def test_every_version_evaluated_returns_the_results_without_a_push():
    from arf_training.backends.evaluate_each import evaluate_each

    ti = PushTI()
    results = evaluate_each({"ti": ti}, _targets("1", "2"), _evaluate({}), logging.getLogger())
    assert [r["model_version"] for r in results] == ["1", "2"] and ti.pushed == []


@pytest.mark.parametrize("fail, raised", [
    pytest.param({"2": StepFailed("step 'evaluate' failed\nboom")}, StepFailed, id="retryable"),
    pytest.param({"2": StepFailed("bad", retryable=False),
                  "3": AirflowFailException("bad too")}, AirflowFailException,
                 id="none-retryable"),
    pytest.param({"2": StepFailed("bad", retryable=False), "3": RuntimeError("mlflow down")},
                 StepFailed, id="one-retryable"),
])
def test_a_failed_version_is_named_after_the_others_are_pushed(fail, raised):
    from arf_training.backends.evaluate_each import evaluate_each

    ti = PushTI()
    with pytest.raises(Exception) as failure:
        evaluate_each({"ti": ti}, _targets("1", "2", "3", "4"), _evaluate(fail),
                      logging.getLogger())
    assert failure.type is raised
    assert f"evaluation failed for {len(fail)} of 4 model version(s): models:/m/2: " \
        in str(failure.value)
    done = [v for v in "1234" if v not in fail]
    assert ti.pushed == [("return_value", [{"model_name": "m", "model_version": v}
                                           for v in done])]


@pytest.mark.parametrize("stop", [
    pytest.param(RuntimeError("killed"), id="killed"),
    pytest.param(KeyboardInterrupt(), id="time-limit"),
])
def test_a_stopped_task_keeps_the_finished_results_and_evaluates_no_more(stop):
    """on_kill (the task stopped by hand) or the task's time limit (a BaseException): the
    versions finished so far still reach the approval tasks; the rest are not started."""
    from arf_training.backends.evaluate_each import evaluate_each

    ti, started = PushTI(), []
    evaluate = _evaluate({"2": stop})

    def tracked(target: dict[str, str]) -> dict[str, str]:
        started.append(target["model_version"])
        return evaluate(target)

    with pytest.raises(type(stop)):
        evaluate_each({"ti": ti}, _targets("1", "2", "3"), tracked, logging.getLogger(),
                      stopped=lambda: True)
    assert started == ["1", "2"]
    assert ti.pushed == [("return_value", [{"model_name": "m", "model_version": "1"}])]


# --- the Kubernetes backend -------------------------------------------------------------------


def _event(version: str, event_id: int) -> SimpleNamespace:
    return SimpleNamespace(id=event_id, extra={"model_name": "reach_bc_policy",
                                               "model_version": version})


@pytest.mark.parametrize("exit_code, raised", [
    pytest.param(1, StepFailed, id="retryable"),
    pytest.param(2, AirflowFailException, id="bad-input-not-retried"),
])
def test_kubernetes_evaluate_goes_on_after_a_failed_pod(k8s_dags, monkeypatch, exit_code,
                                                        raised):
    """Three versions, one pod each; the middle one fails. The other two are evaluated, their
    results pushed as the task's XCom, and the task fails naming the failed version and why
    (retried unless the step said its input was bad)."""
    from arf_training.backends.kubernetes import EvaluatePodOperator

    cluster = install(monkeypatch, FakeCluster())

    def kubelet(cluster: FakeCluster, namespace: str, name: str) -> None:
        pod = cluster.pods.get((namespace, name))
        if pod is None or pod.status.phase != "Pending":
            return
        spec = json.loads(next(e.value for e in pod.spec.containers[0].env
                               if e.name == "ARF_JOB_SPEC_JSON"))
        version = spec["inputs"]["model_version"]
        result = {"model_name": "reach_bc_policy", "model_version": version}
        if version != "4":
            cluster.finish_with_result(namespace, name, 0, json.dumps(result))
            return
        # The step failed before writing its result; the xcom sidecar still runs, as in a pod.
        cluster.finish_with_result(namespace, name, exit_code, "",
                                   log="EvaluationError: no weights\n")
        del cluster.xcom[(namespace, name)]

    cluster.kubelet = kubelet
    dag = k8s_dags["arf_evaluate"]
    task = EvaluatePodOperator(task_id="evaluate", templates=dag.get_task("evaluate").templates,
                               namespace=NAMESPACE, deferrable=False)
    ctx = context(dag, "evaluate",
                  events={"asset": [_event("3", 1), _event("4", 2), _event("5", 3)]})
    pushed: list[tuple[str, Any]] = []
    ctx["ti"].xcom_push = lambda key, value: pushed.append((key, value))
    with pytest.raises(Exception) as failure:
        task.execute(ctx)
    assert failure.type is raised, failure.value
    message = str(failure.value)
    assert "evaluation failed for 1 of 3 model version(s): models:/reach_bc_policy/4: " in message
    assert "Evaluated: models:/reach_bc_policy/3, models:/reach_bc_policy/5" in message
    assert len(cluster.created_pods) == 3
    assert [value for key, value in pushed if key == "return_value"] == [[
        {"model_name": "reach_bc_policy", "model_version": "3"},
        {"model_name": "reach_bc_policy", "model_version": "5"}]]
