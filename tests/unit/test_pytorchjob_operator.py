"""PyTorchJobOperator and PyTorchJobTrigger against an in-memory Kubernetes API (fake_k8s).

The provider's hooks run for real; only their API clients are fakes. The trigger's async
generator is driven with asyncio directly, as the triggerer would.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
from fake_k8s import FakeCluster, install

from arf_training.errors import ArfError
from arf_training.kubernetes.operators import (
    InvalidJobBody,
    PyTorchJobFailed,
    PyTorchJobOperator,
)
from arf_training.kubernetes.triggers import (
    GROUP,
    PLURAL,
    VERSION,
    PyTorchJobTrigger,
    job_outcome,
)

NS = "arf"
NAME = "arf-demo-train-t1-a1b2c3"
KEY = (GROUP, VERSION, PLURAL, NS, NAME)
TINY = 0.001


def manifest(name: str = NAME) -> dict:
    container = {"name": "pytorch", "image": "arf-trainer:1", "command": ["arf-trainer", "train"]}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "arf-training"}},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "restartPolicy": "OnFailure",
                           "template": {"spec": {"containers": [container]}}},
                "Worker": {"replicas": 1, "restartPolicy": "OnFailure",
                           "template": {"spec": {"containers": [container]}}},
            },
        },
    }


@pytest.fixture
def cluster(monkeypatch) -> FakeCluster:
    return install(monkeypatch, FakeCluster())


def operator(**kwargs) -> PyTorchJobOperator:
    kwargs.setdefault("body", manifest())
    kwargs.setdefault("namespace", NS)
    kwargs.setdefault("poll_interval", TINY)
    return PyTorchJobOperator(task_id="train", **kwargs)


def run_trigger(trigger: PyTorchJobTrigger) -> list[dict]:
    async def collect():
        return [event.payload async for event in trigger.run()]

    return asyncio.run(collect())


def execute_deferred(op: PyTorchJobOperator) -> PyTorchJobTrigger:
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context={})
    assert deferred.value.method_name == "execute_complete"
    return deferred.value.trigger


def run_to_end(op: PyTorchJobOperator) -> dict:
    """execute -> defer -> the trigger's run loop -> execute_complete, as Airflow would."""
    events = run_trigger(execute_deferred(op))
    assert len(events) == 1, events
    return op.execute_complete(context={}, event=events[0])


# -- job_outcome ---------------------------------------------------------------------------


def cond(ctype: str, status: str = "True", at: int = 1, reason: str = "", message: str = ""):
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": f"2026-01-01T00:00:{at:02d}Z"}


@pytest.mark.parametrize(("conditions", "expected"), [
    pytest.param([], (False, "Pending"), id="no-conditions"),
    pytest.param([cond("Created")], (False, "Created"), id="created"),
    pytest.param([cond("Created", at=1), cond("Running", at=2)], (False, "Running"),
                 id="running"),
    pytest.param([cond("Created", at=1), cond("Running", "False", at=3),
                  cond("Restarting", at=3)], (False, "Restarting"), id="restarting"),
    pytest.param([cond("Created", at=1), cond("Running", "False", at=2),
                  cond("Suspended", at=2)], (False, "Suspended"), id="suspended"),
    pytest.param([cond("Created", at=1), cond("Running", "False", at=4),
                  cond("Succeeded", at=4)], (True, "success"), id="succeeded"),
    pytest.param([cond("Created", at=1), cond("Running", "False", at=4),
                  cond("Failed", at=4)], (True, "failed"), id="failed"),
    pytest.param([cond("Created", at=1), cond("Succeeded", "False", at=2),
                  cond("Failed", "False", at=2), cond("Running", at=3)], (False, "Running"),
                 id="terminal-types-not-true"),
    # In-place updates: list order is not time order; the newest True condition wins.
    pytest.param([cond("Running", at=5), cond("Restarting", "False", at=5),
                  cond("Created", at=1)], (False, "Running"), id="in-place-update-order"),
    pytest.param([cond("Created", at=1), cond("Running", "Unknown", at=2)], (False, "Created"),
                 id="unknown-is-not-true"),
])
def test_job_outcome(conditions, expected):
    outcome = job_outcome({"status": {"conditions": conditions}})
    assert (outcome.terminal, outcome.status) == expected


def test_job_outcome_carries_reason_and_message_and_tolerates_missing_status():
    outcome = job_outcome({"status": {"conditions": [
        cond("Running", "False", at=2),
        cond("Failed", at=3, reason="PyTorchJobFailed", message="1 Master replica(s) failed")]}})
    assert outcome == (True, "failed", "PyTorchJobFailed", "1 Master replica(s) failed")
    assert job_outcome({}) == (False, "Pending", "", "")
    assert job_outcome({"status": None}).terminal is False


# -- the trigger ---------------------------------------------------------------------------


def test_trigger_serialize_round_trip():
    trigger = PyTorchJobTrigger(name=NAME, namespace=NS, kubernetes_conn_id="k8s_prod",
                                poll_interval=7, in_cluster=True, max_api_errors=3)
    classpath, kwargs = trigger.serialize()
    module, _, cls_name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), cls_name)(**kwargs)
    assert type(rebuilt) is PyTorchJobTrigger
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["name"] == NAME and kwargs["poll_interval"] == 7.0


def test_trigger_yields_one_error_event_when_the_job_vanishes(cluster):
    events = run_trigger(PyTorchJobTrigger(name="gone", namespace=NS, poll_interval=TINY))
    assert len(events) == 1
    assert events[0]["status"] == "error" and events[0]["reason"] == "NotFound"


def test_trigger_tolerates_transient_api_errors_then_gives_up(cluster, monkeypatch):
    trigger = PyTorchJobTrigger(name=NAME, namespace=NS, poll_interval=TINY, max_api_errors=3)
    reads = []

    async def flaky():
        reads.append(1)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(trigger, "get_job", flaky)
    events = run_trigger(trigger)
    assert len(reads) == 3
    assert [e["status"] for e in events] == ["error"]
    assert "connection reset" in events[0]["message"]


# -- the operator, end to end against the fake ----------------------------------------------


def test_create_running_succeeded(cluster):
    cluster.script(NAME, "Created", "Running", "Running", "Succeeded")
    cluster.add_pod(NS, f"{NAME}-master-0", job=NAME, exit_code=0,
                    log="rank 0: epoch 1 loss 0.5\nrank 0: done ✓\n")
    cluster.add_pod(NS, f"{NAME}-worker-0", job=NAME, replica_type="worker", log="worker\n")
    op = operator()

    trigger = execute_deferred(op)
    assert len(cluster.verbs("create")) == 1
    created = cluster.objects[KEY]
    assert created["metadata"]["namespace"] == NS
    assert created["spec"] == manifest()["spec"]

    events = run_trigger(trigger)
    assert len(events) == 1
    event = events[0]
    assert event["status"] == "success" and event["name"] == NAME and event["namespace"] == NS
    assert [c["type"] for c in event["conditions"] if c["status"] == "True"] == \
        ["Created", "Succeeded"]

    result = op.execute_complete(context={}, event=event)
    assert result["status"] == "success"
    assert result["conditions"] == event["conditions"]
    # Only the master's log is read, from the "pytorch" container, and the job is cleaned up.
    assert cluster.verbs("read_log") == [("read_log", "pods", NS, f"{NAME}-master-0", "pytorch")]
    assert cluster.verbs("delete") == [("delete", PLURAL, NS, NAME, "Background")]
    assert KEY not in cluster.objects


def test_master_log_goes_to_the_task_log(cluster, monkeypatch):
    cluster.script(NAME, "Running", "Succeeded")
    cluster.add_pod(NS, f"{NAME}-master-0", job=NAME, exit_code=0,
                    log=b"epoch 1 loss 0.5\nbad byte \xff here\nlast line without newline")
    op = operator()
    lines = []
    monkeypatch.setattr(type(op), "log", property(lambda self: _Recorder(lines)))
    run_to_end(op)
    assert "epoch 1 loss 0.5" in lines
    assert "bad byte \ufffd here" in lines
    assert "last line without newline" in lines


class _Recorder:
    def __init__(self, lines):
        self.lines = lines

    def info(self, fmt, *args):
        self.lines.append(fmt % args)

    warning = debug = error = info


def test_failed_surfaces_reason_message_and_log_tail(cluster):
    cluster.script(NAME, "Created", "Running",
                   ("Failed", "PyTorchJobFailed",
                    f"PyTorchJob {NS}/{NAME} is failed because 1 Master replica(s) failed."))
    cluster.add_pod(NS, f"{NAME}-master-0", job=NAME, exit_code=1,
                    log="Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    op = operator(delete_on_finish="on_success")

    with pytest.raises(PyTorchJobFailed) as failed:
        run_to_end(op)
    text = str(failed.value)
    assert "PyTorchJobFailed" in text and "1 Master replica(s) failed" in text
    assert "master exit code 1" in text
    assert "RuntimeError: CUDA out of memory" in text
    assert isinstance(failed.value, AirflowException) and isinstance(failed.value, ArfError)
    assert failed.value.retryable is True
    assert KEY in cluster.objects  # on_success: a failed job is kept for debugging
    assert cluster.verbs("delete") == []


def test_bad_input_exit_code_fails_without_retries(cluster):
    cluster.script(NAME, "Running", ("Failed", "PyTorchJobFailed", "Master failed"))
    cluster.add_pod(NS, f"{NAME}-master-0", job=NAME, exit_code=2,
                    log="bad job spec: training.epochs must be > 0\n")
    with pytest.raises(AirflowFailException, match="training.epochs must be > 0"):
        run_to_end(operator())


def test_restarting_is_not_terminal(cluster):
    cluster.script(NAME, "Created", "Running", ("Restarting", "PyTorchJobRestarting",
                                                "Worker restarting after OOMKilled"),
                   "Restarting", "Running", "Succeeded")
    op = operator(fetch_logs=False)
    trigger = execute_deferred(op)
    events = run_trigger(trigger)
    assert [e["status"] for e in events] == ["success"]
    types = {c["type"]: c["status"] for c in events[0]["conditions"]}
    assert types["Restarting"] == "False" and types["Succeeded"] == "True"
    # create's read + every scripted transition read by the trigger: it waited through all.
    assert len(cluster.verbs("get")) == 1 + 6
    assert op.execute_complete(context={}, event=events[0])["status"] == "success"


def test_synchronous_wait_when_not_deferrable(cluster):
    cluster.script(NAME, "Created", "Running", "Restarting", "Running", "Succeeded")
    cluster.add_pod(NS, f"{NAME}-master-0", job=NAME, exit_code=0, log="ok\n")
    result = operator(deferrable=False).execute(context={})
    assert result["status"] == "success"
    assert len(cluster.verbs("create")) == 1


def test_synchronous_wait_fails_with_reason(cluster):
    cluster.script(NAME, "Running", ("Failed", "DeadlineExceeded",
                                     "running longer than activeDeadlineSeconds"))
    with pytest.raises(PyTorchJobFailed, match="DeadlineExceeded.*activeDeadlineSeconds"):
        operator(deferrable=False, fetch_logs=False).execute(context={})


def test_retry_after_scheduler_restart_reattaches(cluster):
    cluster.script(NAME, "Created", "Running")
    execute_deferred(operator())
    assert len(cluster.verbs("create")) == 1
    uid = cluster.objects[KEY]["metadata"]["uid"]

    # The scheduler/worker restarts and runs this same try again: same deterministic name.
    cluster.script(NAME, "Running", "Succeeded")
    again = operator()
    result = run_to_end(again)
    assert len(cluster.verbs("create")) == 1  # no second job
    assert result["status"] == "success"
    assert len([k for k in cluster.objects if k[-1] == NAME]) <= 1
    assert uid == "uid-1"


def test_reattach_to_a_job_that_already_finished_completes_without_deferring(cluster):
    cluster.objects[KEY] = {**manifest(), "status": {"conditions": [
        cond("Created", at=1), cond("Running", "False", at=2), cond("Succeeded", at=2)]}}
    result = operator(fetch_logs=False).execute(context={})
    assert result["status"] == "success"
    assert cluster.verbs("create") == []


def test_conflict_on_create_is_a_reattach(cluster):
    cluster.conflict_on_next_create = True  # someone else creates it between our get and create
    cluster.script(NAME, "Created", "Running", "Succeeded")
    result = run_to_end(operator(fetch_logs=False))
    assert result["status"] == "success"
    assert len(cluster.verbs("create")) == 1


def test_other_create_errors_are_raised(cluster):
    body = manifest()
    body["apiVersion"] = "kubeflow.org/v2"
    from kubernetes.client import ApiException

    with pytest.raises(ApiException) as err:
        operator(body=body).execute(context={})
    assert err.value.status == 400


def test_on_kill_deletes_the_job_and_is_idempotent(cluster):
    cluster.script(NAME, "Created", "Running")
    cluster.add_pod(NS, f"{NAME}-master-0", job=NAME)
    op = operator()
    execute_deferred(op)
    op.on_kill()
    assert KEY not in cluster.objects
    assert cluster.pods == {}  # Foreground: the pods go with it
    assert cluster.verbs("delete") == [("delete", PLURAL, NS, NAME, "Foreground")]
    op.on_kill()  # already gone: no error
    operator().on_kill()  # a fresh instance (worker restarted) finds the job by its name


def test_trigger_on_kill_deletes_the_job(cluster):
    cluster.script(NAME, "Created")
    trigger = execute_deferred(operator())
    asyncio.run(trigger.on_kill())
    assert KEY not in cluster.objects
    asyncio.run(trigger.on_kill())  # idempotent
    assert cluster.verbs("delete")[0][-1] == "Foreground"


def test_vanished_job_fails_the_task(cluster):
    cluster.script(NAME, "Created")
    op = operator()
    trigger = execute_deferred(op)
    del cluster.objects[KEY]
    events = run_trigger(trigger)
    with pytest.raises(PyTorchJobFailed, match="no longer exists"):
        op.execute_complete(context={}, event=events[0])


def test_missing_pods_do_not_hide_the_outcome(cluster):
    cluster.script(NAME, "Running", "Succeeded")  # cleanPodPolicy removed the pods already
    assert run_to_end(operator())["status"] == "success"


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param({"delete_on_finish": "sometimes"}, "delete_on_finish='sometimes'",
                 id="bad-policy"),
    pytest.param({"body": "apiVersion: kubeflow.org/v1"}, "body must be the PyTorchJob manifest",
                 id="body-not-a-dict"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(InvalidJobBody, match=match):
        operator(**kwargs)


def test_a_manifest_without_a_name_is_rejected(cluster):
    body = manifest()
    del body["metadata"]["name"]
    with pytest.raises(InvalidJobBody, match="metadata.name"):
        operator(body=body).execute(context={})
    assert cluster.calls == []


def test_namespace_defaults_to_the_manifest_then_the_connection(cluster, monkeypatch):
    body = manifest()
    body["metadata"]["namespace"] = "from-manifest"
    assert operator(body=body, namespace=None).job_ref() == (NAME, "from-manifest")
    monkeypatch.setenv("AIRFLOW_CONN_K8S_TEST",
                       '{"conn_type": "kubernetes", "extra": {"namespace": "from-conn"}}')
    assert operator(namespace=None, kubernetes_conn_id="k8s_test").job_ref() == (NAME,
                                                                                 "from-conn")


def test_modules_import_nothing_heavy():
    code = ("import sys, arf_training.kubernetes.operators, arf_training.kubernetes.triggers\n"
            "heavy = [m for m in ('kubernetes', 'kubernetes_asyncio', 'torch', 'mlflow',"
            " 'airflow.providers.cncf.kubernetes.hooks.kubernetes') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_operator_serializes_in_a_dag():
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG(dag_id="arf_k8s_serialize", schedule=None) as dag:
        operator(body=manifest("{{ dag.dag_id }}-{{ ti.try_number }}"))
    data = DagSerialization.to_dict(dag)
    rebuilt = DagSerialization.from_dict(data)
    assert tuple(rebuilt.get_task("train").template_fields) == ("body", "namespace")


def test_body_is_templated():
    from types import SimpleNamespace

    op = operator(body=manifest("arf-train-{{ ti.try_number }}"), namespace="{{ params.ns }}")
    op.render_template_fields({"ti": SimpleNamespace(try_number=3), "params": {"ns": "team-a"}})
    assert op.job_ref() == ("arf-train-3", "team-a")
    assert op.body["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
