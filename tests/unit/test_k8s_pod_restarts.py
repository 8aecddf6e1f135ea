"""A single-pod train step (world size 1: the provider's KubernetesPodOperator) that exits 75
("preempted, resume me") is resumed in a new pod within the same task try, as the local backend
and a PyTorchJob replica resume it: no Airflow retry is spent (`arf_training.kubernetes.restarts`).

The provider's operator and its trigger run for real; the Kubernetes API is `fake_k8s` (the only
fake), where the test plays the kubelet: it ends each created pod with an exit code.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import kubernetes_validate
import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred
from fake_k8s import FakeCluster, install
from test_k8s_render import K8S_VERSIONS
from test_kubernetes_backend import NAMESPACE, context, k8s_dags, k8s_env  # noqa: F401 (fixtures)

from arf_training.kubernetes.restarts import START_LABEL


def _context(dag) -> dict[str, Any]:
    ctx = context(dag, "train")
    ctx["ti"].xcom_push = lambda key, value: None  # the pod's name, pushed by the provider
    ctx["ti"].start_date = datetime.now(timezone.utc)
    return ctx


def _fresh(task):
    """The task's operator as Airflow builds it for each entry (execute, then after a
    deferral): nothing is carried over in memory."""
    return type(task)(task_id=task.task_id, loaded=task.loaded, step=task.step,
                      namespace=NAMESPACE, execution_timeout=task.execution_timeout)


def _event(deferred: pytest.ExceptionInfo) -> dict[str, Any]:
    """The provider's pod trigger, run until its one event."""
    async def first(trigger):
        async for event in trigger.run():
            return event.payload

    return asyncio.run(first(deferred.value.trigger))


def _start_train(k8s_dags, monkeypatch) -> tuple[FakeCluster, Any, dict, pytest.ExceptionInfo]:
    cluster = install(monkeypatch, FakeCluster())
    dag = k8s_dags["digits_sklearn"]  # a template's own command, one process: a bare Pod
    task = dag.get_task("train")
    assert type(task).__name__ == "StepPodOperator"
    ctx = _context(dag)
    with pytest.raises(TaskDeferred) as deferred:
        _fresh(task).execute(ctx)
    return cluster, task, ctx, deferred


def test_a_pod_that_exits_75_is_resumed_in_a_new_pod_in_the_same_try(k8s_dags, monkeypatch):
    cluster, task, ctx, deferred = _start_train(k8s_dags, monkeypatch)
    (first,) = cluster.created_pods
    cluster.finish_pod(NAMESPACE, first["metadata"]["name"], 75, log="preempted at step 40\n")
    event = _event(deferred)
    assert event["status"] == "failed"

    with pytest.raises(TaskDeferred) as deferred:  # not a failure: waits for the new pod
        _fresh(task).trigger_reentry(ctx, event)

    _, second = cluster.created_pods
    name = second["metadata"]["name"]
    assert name != first["metadata"]["name"] and second["metadata"]["labels"][START_LABEL] == "1"
    assert second["metadata"]["labels"]["try_number"] == "1"
    # The same step: same command and environment (workspace, ARF_CHECKPOINT_DIR), and
    # custom-setup runs again first (it finds the DAG run's MLflow run and base model pin).
    for key in ("command", "env", "image"):
        assert second["spec"]["containers"][0][key] == first["spec"]["containers"][0][key]
    assert second["spec"]["initContainers"] == first["spec"]["initContainers"]
    assert 0 < second["spec"]["activeDeadlineSeconds"] <= first["spec"]["activeDeadlineSeconds"]
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(second, version, strict=True) == version
    # The preempted pod is kept and marked, so that no later start reattaches to it.
    assert cluster.pods[(NAMESPACE, first["metadata"]["name"])].metadata.labels[
        "already_checked"] == "True"

    cluster.finish_pod(NAMESPACE, name, 0, log="done\n")
    assert _fresh(task).trigger_reentry(ctx, _event(deferred)) is None  # the try succeeds
    assert len(cluster.created_pods) == 2
    assert ("delete", "pods", NAMESPACE, name) in cluster.calls


@pytest.mark.parametrize(("exit_code", "reason"), [
    pytest.param(1, None, id="a-failure"),
    pytest.param(75, "DeadlineExceeded", id="stopped-at-its-deadline"),
])
def test_other_endings_still_fail_the_try(k8s_dags, monkeypatch, exit_code, reason):
    cluster, task, ctx, deferred = _start_train(k8s_dags, monkeypatch)
    (first,) = cluster.created_pods
    cluster.finish_pod(NAMESPACE, first["metadata"]["name"], exit_code, reason=reason)
    with pytest.raises(AirflowException, match="returned a failure"):
        _fresh(task).trigger_reentry(ctx, _event(deferred))
    assert len(cluster.created_pods) == 1


def test_on_the_worker_too(k8s_dags, monkeypatch):
    """deferrable=False: the provider waits on the worker; the new pod is waited for there."""
    cluster = install(monkeypatch, FakeCluster())
    cluster.pod_exits.extend([75, 75, 0])
    dag = k8s_dags["digits_sklearn"]
    operator = _fresh(dag.get_task("train"))
    operator.deferrable = False
    assert operator.execute(_context(dag)) is None
    assert [p["metadata"]["labels"].get(START_LABEL) for p in cluster.created_pods] == \
        [None, "1", "2"]
