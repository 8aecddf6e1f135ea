"""A DAG run deleted in the UI and triggered again under the same run id does not adopt the
deleted run's PyTorchJob or Pod (`arf_training.kubernetes.ownership`).

Names and labels come from (dag_id, run_id, task_id, try_number), so the new DagRun's first try
finds the deleted run's objects under its own names. Before: it reattached to them, waited for a
training nobody had asked for, or took over its finished outcome. Now each object is annotated
with the start of the DagRun that created it; one of another start is deleted and created anew,
while this run's own objects (a restart of the same try, a retry) and objects created before the
annotation existed are adopted as before.

The provider's operators, hooks and triggers run for real; the Kubernetes API is `fake_k8s`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred
from fake_k8s import FakeCluster, install
from test_k8s_federated_operators import Kubelet, _federate, _leave
from test_k8s_federated_operators import _context as _fed_context
from test_kubernetes_backend import NAMESPACE, context, k8s_dags, k8s_env  # noqa: F401 (fixtures)

from arf_training.kubernetes import ownership
from arf_training.kubernetes.operators import PyTorchJobFailed
from arf_training.kubernetes.triggers import GROUP, PLURAL, VERSION

STARTED_A = datetime(2026, 1, 2, 3, 4, 6, 123456, tzinfo=timezone.utc)  # the deleted run
STARTED_B = datetime(2026, 1, 2, 9, 0, 0, tzinfo=timezone.utc)  # the run triggered again
SUCCEEDED = {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
             "message": "run A's result", "lastTransitionTime": "2026-01-02T04:00:00Z"}


@pytest.fixture(autouse=True)
def _quick_polls(monkeypatch):
    monkeypatch.setattr(ownership, "GONE_POLL_S", 0.001)


def _context(dag, task_id: str, started: datetime | None, try_number: int = 1) -> dict[str, Any]:
    """The task context of one DagRun of test_kubernetes_backend.RUN_ID (`started`: its start
    date; None: a context without one, as a test's or an older Airflow's)."""
    ctx = context(dag, task_id, try_number=try_number)
    ctx["dag_run"].start_date = started
    ctx["ti"].xcom_push = lambda key, value: None  # the pod's name, pushed by the provider
    ctx["ti"].start_date = datetime.now(timezone.utc)
    return ctx


# --- PyTorchJob ------------------------------------------------------------------------------


def _train(k8s_dags, monkeypatch) -> tuple[FakeCluster, Any]:
    cluster = install(monkeypatch, FakeCluster())
    dag = k8s_dags["reach_bc"]
    task = dag.get_task("train")
    assert type(task).__name__ == "StepPyTorchJobOperator"
    return cluster, dag


def _fresh_train(dag) -> Any:
    task = dag.get_task("train")
    return type(task)(task_id="train", loaded=task.loaded, namespace=NAMESPACE,
                      poll_interval=0.001, fetch_logs=False)


def _job(cluster: FakeCluster, name: str) -> dict[str, Any]:
    return cluster.objects[(GROUP, VERSION, PLURAL, NAMESPACE, name)]


@pytest.mark.parametrize("finished", [pytest.param(False, id="still-running"),
                                      pytest.param(True, id="already-succeeded")])
def test_the_job_of_a_deleted_run_is_replaced_not_adopted(k8s_dags, monkeypatch, finished):
    """Before: run B reattached to run A's job: it waited for A's training, or (finished)
    returned A's success at once as its own, without training anything."""
    cluster, dag = _train(k8s_dags, monkeypatch)
    ctx_a = _context(dag, "train", STARTED_A)
    with pytest.raises(TaskDeferred):
        _fresh_train(dag).execute(ctx_a)
    (name,) = {c[3] for c in cluster.verbs("create")}
    if finished:
        _job(cluster, name).setdefault("status", {})["conditions"] = [SUCCEEDED]
    # Run A is deleted in the UI (nothing reaches the cluster); B is triggered with its run id.
    # Its Foreground deletion takes a few reads: the new job is created once the name is free.
    cluster.deletion_reads = 2
    with pytest.raises(TaskDeferred):
        _fresh_train(dag).execute(_context(dag, "train", STARTED_B))
    assert cluster.verbs("delete") == [("delete", PLURAL, NAMESPACE, name, "Foreground")]
    assert [c[3] for c in cluster.verbs("create")] == [name, name]
    job = _job(cluster, name)
    assert job["metadata"]["annotations"][ownership.RUN_START_ANNOTATION] == STARTED_B.isoformat()
    assert job.get("status") == {}  # a new job, not A's


def test_this_runs_own_job_and_one_from_before_the_annotation_are_still_adopted(
        k8s_dags, monkeypatch):
    """A restart of the same try (same DagRun) reattaches; so does a job that an ARF version
    without the annotation created, so that an upgrade during a training does not restart it."""
    cluster, dag = _train(k8s_dags, monkeypatch)
    ctx = _context(dag, "train", STARTED_A)
    with pytest.raises(TaskDeferred):
        _fresh_train(dag).execute(ctx)
    (name,) = {c[3] for c in cluster.verbs("create")}
    assert _job(cluster, name)["metadata"]["annotations"][ownership.RUN_START_ANNOTATION] == \
        STARTED_A.isoformat()
    with pytest.raises(TaskDeferred):
        _fresh_train(dag).execute(_context(dag, "train", STARTED_A))  # the same try, again
    del _job(cluster, name)["metadata"]["annotations"][ownership.RUN_START_ANNOTATION]
    with pytest.raises(TaskDeferred):
        _fresh_train(dag).execute(_context(dag, "train", STARTED_B))  # created before upgrade
    assert len(cluster.verbs("create")) == 1 and cluster.verbs("delete") == []


def test_a_stale_job_that_will_not_go_away_fails_the_try_and_says_so(k8s_dags, monkeypatch):
    cluster, dag = _train(k8s_dags, monkeypatch)
    monkeypatch.setattr(ownership, "GONE_MARGIN_S", 0.0)
    with pytest.raises(TaskDeferred):
        _fresh_train(dag).execute(_context(dag, "train", STARTED_A))
    (name,) = {c[3] for c in cluster.verbs("create")}
    for replica in _job(cluster, name)["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["spec"]["terminationGracePeriodSeconds"] = 0
    cluster.deletion_reads = 10 ** 6  # a finalizer nobody removes
    with pytest.raises(PyTorchJobFailed, match=rf"{name}.*earlier DAG run.*still"):
        _fresh_train(dag).execute(_context(dag, "train", STARTED_B))
    assert len(cluster.verbs("create")) == 1


# --- Pods (the provider's KubernetesPodOperator) -----------------------------------------------


def _pod_task(k8s_dags, monkeypatch) -> tuple[FakeCluster, Any]:
    cluster = install(monkeypatch, FakeCluster())
    dag = k8s_dags["digits_sklearn"]  # a template's own command, one process: a bare Pod
    assert type(dag.get_task("train")).__name__ == "StepPodOperator"
    return cluster, dag


def _fresh_pod_task(dag) -> Any:
    task = dag.get_task("train")
    return type(task)(task_id="train", loaded=task.loaded, step="train", namespace=NAMESPACE,
                      execution_timeout=task.execution_timeout)


@pytest.mark.parametrize("left, try_a", [
    pytest.param("running", 1, id="running"),
    # A failed pod is kept for debugging and marked already_checked: the provider does not
    # reattach to it, but it holds the name of the new run's pod (before: 409 AlreadyExists).
    pytest.param("failed", 1, id="failed-and-kept"),
    # Another name (run A got to try 2), but the provider's lookup ignores the try number, and
    # finds a pod while it terminates: the new pod is created only once it is gone.
    pytest.param("running", 2, id="running-of-another-try"),
])
def test_the_pod_of_a_deleted_run_is_replaced_not_adopted(k8s_dags, monkeypatch, left, try_a):
    cluster, dag = _pod_task(k8s_dags, monkeypatch)
    with pytest.raises(TaskDeferred):
        _fresh_pod_task(dag).execute(_context(dag, "train", STARTED_A, try_number=try_a))
    (first,) = cluster.created_pods
    old = first["metadata"]["name"]
    cluster.start_pod(NAMESPACE, old)
    if left == "failed":
        cluster.finish_pod(NAMESPACE, old, 1)
        cluster.pods[(NAMESPACE, old)].metadata.labels["already_checked"] = "True"
    cluster.deletion_reads = 2
    with pytest.raises(TaskDeferred):
        _fresh_pod_task(dag).execute(_context(dag, "train", STARTED_B))
    assert ("delete", "pods", NAMESPACE, old) in cluster.calls
    assert (NAMESPACE, old) not in cluster.pods or try_a == 1
    _, second = cluster.created_pods
    assert second["metadata"]["labels"]["try_number"] == "1"
    assert second["metadata"]["annotations"][ownership.RUN_START_ANNOTATION] == \
        STARTED_B.isoformat()
    assert cluster.pods[(NAMESPACE, second["metadata"]["name"])].status.phase == "Pending"


def test_this_runs_own_pods_and_unannotated_ones_are_still_adopted(k8s_dags, monkeypatch):
    """The provider reattaches a retry to the still-running pod of an earlier try of the same
    run (its selector leaves out the try number); that, pods created before the annotation, and
    a context without a run start (no annotation to compare) stay as they were."""
    cluster, dag = _pod_task(k8s_dags, monkeypatch)
    with pytest.raises(TaskDeferred):
        _fresh_pod_task(dag).execute(_context(dag, "train", STARTED_A))
    (first,) = cluster.created_pods
    name = first["metadata"]["name"]
    assert first["metadata"]["annotations"][ownership.RUN_START_ANNOTATION] == \
        STARTED_A.isoformat()
    cluster.start_pod(NAMESPACE, name)
    for ctx in (_context(dag, "train", STARTED_A, try_number=2), _context(dag, "train", None)):
        with pytest.raises(TaskDeferred):
            _fresh_pod_task(dag).execute(ctx)
    del cluster.pods[(NAMESPACE, name)].metadata.annotations[ownership.RUN_START_ANNOTATION]
    with pytest.raises(TaskDeferred):
        _fresh_pod_task(dag).execute(_context(dag, "train", STARTED_B))
    assert len(cluster.created_pods) == 1
    assert not [c for c in cluster.calls if c[:2] == ("delete", "pods")]


# --- the federate task's SuperNodes ---------------------------------------------------------


def test_a_supernode_of_a_deleted_run_is_replaced_not_reused(k8s_dags, monkeypatch):
    """Before: a SuperNode pod of the deleted run's federate try, still running, was reused."""
    cluster = install(monkeypatch, FakeCluster())
    dag, task = _federate(k8s_dags)
    ctx_a = _fed_context(dag, "federate")
    ctx_a["dag_run"].start_date = STARTED_A
    service, _, *nodes = task.render_federation(ctx_a)
    _leave(cluster, service, nodes, "Running")  # run A is deleted while they run
    cluster.calls.clear()
    cluster.kubelet = Kubelet()
    ctx_b = _fed_context(dag, "federate")
    ctx_b["dag_run"].start_date = STARTED_B
    _, fresh = _federate(k8s_dags)
    assert fresh.execute(ctx_b)["mlflow_run_id"] == "run-1"
    names = [n["metadata"]["name"] for n in nodes]
    creates = [c[3] for c in cluster.verbs("create")]
    assert all(creates.count(name) == 2 for name in names), creates  # a 409, then B's own
    recreated = [p for p in cluster.created_pods if p["metadata"]["name"] in names][-3:]
    assert {p["metadata"]["annotations"][ownership.RUN_START_ANNOTATION] for p in recreated} \
        == {STARTED_B.isoformat()}
