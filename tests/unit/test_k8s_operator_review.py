"""Review findings on the PyTorchJob operator, its trigger and the `ARF_K8S_*` settings.

Driven against the in-memory Kubernetes API (`fake_k8s`, the only fake): the provider's hooks
run for real. Each test failed before its fix.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason
from airflow.sdk.exceptions import TaskDeferralError, TaskDeferralTimeout, TaskDeferred
from fake_k8s import FakeCluster, install
from test_kubernetes_backend import NAMESPACE as BACKEND_NS
from test_kubernetes_backend import context as backend_context
from test_kubernetes_backend import k8s_dags, k8s_env  # noqa: F401 (fixtures)
from test_pytorchjob_operator import KEY, NAME, NS, TINY, manifest, operator, run_trigger

from arf_training.kubernetes.config import KubernetesConfigError, KubernetesSettings
from arf_training.kubernetes.operators import PyTorchJobFailed
from arf_training.kubernetes.triggers import PLURAL, PyTorchJobTrigger


@pytest.fixture
def cluster(monkeypatch) -> FakeCluster:
    return install(monkeypatch, FakeCluster())


def labelled(run_id: str, name: str = NAME) -> dict:
    body = manifest(name)
    body["metadata"]["labels"].update({"arf.dev/run-id": run_id, "arf.dev/try-number": "1"})
    return body


# -- execution_timeout while deferred -------------------------------------------------------


def test_deferral_carries_what_is_left_of_the_execution_timeout(cluster):
    """Before: the trigger got no timeout, so a deferred job (Pending forever: no controller,
    a queue that never admits it) outlived the task's execution_timeout without bound."""
    cluster.script(NAME, "Created")
    op = operator(execution_timeout=timedelta(minutes=10))
    started = datetime.now(timezone.utc) - timedelta(minutes=4)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context={"ti": SimpleNamespace(start_date=started)})
    left = deferred.value.timeout
    assert left is not None
    assert timedelta(minutes=5, seconds=50) < left <= timedelta(minutes=6)


def test_deferral_without_a_start_date_gets_the_whole_execution_timeout(cluster):
    cluster.script(NAME, "Created")
    with pytest.raises(TaskDeferred) as deferred:
        operator(execution_timeout=timedelta(minutes=3)).execute(context={})
    assert deferred.value.timeout == timedelta(minutes=3)


@pytest.mark.parametrize(("error", "raised"), [
    pytest.param(TriggerFailureReason.TRIGGER_TIMEOUT, TaskDeferralTimeout, id="timeout"),
    pytest.param(TriggerFailureReason.TRIGGER_FAILURE, TaskDeferralError, id="trigger-crashed"),
])
def test_a_failed_deferral_stops_the_job(cluster, error, raised):
    """Before: the task failed (TaskDeferralTimeout) and its job kept training; the retry, under
    a new name, then trained beside it on the same checkpoints."""
    cluster.script(NAME, "Created", "Running")
    op = operator(execution_timeout=timedelta(minutes=1))
    with pytest.raises(TaskDeferred):
        op.execute(context={})
    resumed = operator(execution_timeout=timedelta(minutes=1))  # Airflow builds a fresh one
    with pytest.raises(raised):
        resumed.resume_execution(TRIGGER_FAIL_REPR, {"error": error}, context={})
    assert KEY not in cluster.objects
    assert cluster.verbs("delete") == [("delete", PLURAL, NS, NAME, "Foreground")]


def test_a_failed_deferral_still_reports_the_timeout_when_the_delete_is_refused(cluster):
    cluster.script(NAME, "Created")
    with pytest.raises(TaskDeferred):
        operator().execute(context={})
    cluster.fail("delete", 403)
    with pytest.raises(TaskDeferralTimeout):
        operator().resume_execution(
            TRIGGER_FAIL_REPR, {"error": TriggerFailureReason.TRIGGER_TIMEOUT}, context={})


# -- API errors in the wait ------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_trigger_fails_at_once_when_it_may_not_read_the_job(cluster, status):
    """Before: 401/403 counted as transient: max_api_errors polls (5 minutes by default), then
    "could not read ... 10 times in a row"."""
    cluster.objects[KEY] = manifest()
    cluster.fail("get", *[status] * 10)
    trigger = PyTorchJobTrigger(name=NAME, namespace=NS, poll_interval=TINY, max_api_errors=5)
    (event,) = run_trigger(trigger)
    assert len(cluster.verbs("get")) == 1
    assert event["status"] == "error"
    assert str(status) in event["message"] and "pytorchjobs" in event["message"]


def test_trigger_retries_transient_errors_and_carries_on(cluster):
    cluster.objects[KEY] = manifest()
    cluster.script(NAME, "Running", "Succeeded")
    cluster.fail("get", 503, 500, 504)
    (event,) = run_trigger(PyTorchJobTrigger(name=NAME, namespace=NS, poll_interval=TINY,
                                             max_api_errors=4))
    assert event["status"] == "success"


def test_giving_up_on_api_errors_stops_the_job_that_may_still_run(cluster):
    """Before: an "error" event (the API unreachable for max_api_errors polls) failed the task
    and left the job running (delete_on_finish="on_success"); the retry's job then trained
    beside it, on the same checkpoint folder."""
    cluster.script(NAME, "Created", "Running")
    op = operator(delete_on_finish="on_success")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context={})
    trigger = deferred.value.trigger
    trigger.max_api_errors = 3
    cluster.fail("get", 503, 503, 503)
    (event,) = run_trigger(trigger)
    assert event["status"] == "error"
    with pytest.raises(PyTorchJobFailed, match="stopped it"):
        op.execute_complete(context={}, event=event)
    assert KEY not in cluster.objects
    assert cluster.verbs("delete")[-1] == ("delete", PLURAL, NS, NAME, "Foreground")


def test_synchronous_wait_turns_a_forbidden_read_into_a_clear_failure(cluster):
    """Before: a raw ApiException escaped `execute` and the job kept running."""
    cluster.script(NAME, "Created", "Running")
    op = operator(deferrable=False, delete_on_finish="never")
    original_get = cluster.get

    def forbidden_after_create(exc_type, *args):
        if cluster.verbs("create"):
            raise exc_type(status=403, reason="Forbidden")
        return original_get(exc_type, *args)

    cluster.get = forbidden_after_create
    with pytest.raises(PyTorchJobFailed, match=r"403.*pytorchjobs"):
        op.execute(context={})
    assert KEY not in cluster.objects  # stopped: its state is unknown, a retry must not race it


def test_a_job_deleted_by_someone_else_is_not_deleted_again(cluster):
    cluster.script(NAME, "Created")
    op = operator(delete_on_finish="never")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context={})
    del cluster.objects[KEY]
    (event,) = run_trigger(deferred.value.trigger)
    with pytest.raises(PyTorchJobFailed, match="no longer exists"):
        op.execute_complete(context={}, event=event)
    assert cluster.verbs("delete") == []


# -- reattach only to this try's own job -----------------------------------------------------


def test_reattach_refuses_a_job_of_another_run_with_the_same_name(cluster):
    """Before: any job with the name was adopted: a manifest named without the run (e.g.
    `{{ dag.dag_id }}-{{ ti.try_number }}`) made run B report run A's outcome as its own."""
    cluster.objects[KEY] = {**labelled("run-a"), "status": {"conditions": [
        {"type": "Succeeded", "status": "True", "lastTransitionTime": "2026-01-01T00:00:01Z"}]}}
    with pytest.raises(PyTorchJobFailed, match=r"arf.dev/run-id.*run-a.*run-b"):
        operator(body=labelled("run-b")).execute(context={})
    assert cluster.verbs("create") == [] and cluster.verbs("delete") == []
    assert KEY in cluster.objects  # the other run's job is left alone


def test_a_409_race_with_another_runs_job_is_refused_too(cluster):
    cluster.conflict_on_next_create = True
    # The concurrent creator is another run: its job lands under our name.
    original_store = cluster._store
    cluster._store = lambda key, body: original_store(key, labelled("run-a"))
    with pytest.raises(PyTorchJobFailed, match="run-a"):
        operator(body=labelled("run-b")).execute(context={})


def test_reattach_to_this_runs_job_still_works(cluster):
    cluster.objects[KEY] = {**labelled("run-b"), "status": {"conditions": [
        {"type": "Succeeded", "status": "True", "lastTransitionTime": "2026-01-01T00:00:01Z"}]}}
    cluster.objects[KEY]["metadata"]["labels"]["added-by-a-webhook"] = "x"
    result = operator(body=labelled("run-b"), fetch_logs=False).execute(context={})
    assert result["status"] == "success"
    assert cluster.verbs("create") == []


# -- settings the API server (or the kubelet) would refuse -----------------------------------

TOLERATION = "ARF_K8S_TOLERATIONS"


@pytest.mark.parametrize(("env", "words"), [
    pytest.param({"ARF_K8S_WORKSPACE_PVC": "a..b"}, "ARF_K8S_WORKSPACE_PVC='a..b'", id="pvc-dots"),
    pytest.param({"ARF_K8S_MLFLOW_SECRET": "a.-b"}, "ARF_K8S_MLFLOW_SECRET='a.-b'",
                 id="secret-dot-dash"),
    pytest.param({"ARF_K8S_PRIORITY_CLASS": "High"}, "ARF_K8S_PRIORITY_CLASS='High'",
                 id="uppercase"),
    pytest.param({"ARF_K8S_IMAGE_PULL_SECRETS": "ok,b..c"}, "'b..c'", id="pull-secret-dots"),
    pytest.param({"ARF_K8S_SECRET_ENV": '{"TOKEN": "a..b/key"}'}, "a..b/key",
                 id="secret-env-name"),
    pytest.param({"ARF_K8S_SECRET_ENV": '{"TOKEN": "s/bad key"}'}, "s/bad key",
                 id="secret-env-key"),
    pytest.param({TOLERATION: '[{"key": "gpu", "operator": "exists"}]'}, "'exists'",
                 id="toleration-operator-case"),
    pytest.param({TOLERATION: '[{"key": "gpu", "operator": "Exists", "value": "x"}]'},
                 "value", id="toleration-exists-with-value"),
    pytest.param({TOLERATION: '[{"operator": "Equal", "value": "x"}]'}, "key",
                 id="toleration-equal-without-key"),
    pytest.param({TOLERATION: '[{"key": "gpu", "effect": "NoSchedul"}]'}, "'NoSchedul'",
                 id="toleration-effect"),
    pytest.param({TOLERATION: '[{"key": "bad key!", "operator": "Exists"}]'}, "'bad key!'",
                 id="toleration-key"),
    pytest.param({TOLERATION: '[{"key": "k", "value": "a b"}]'}, "'a b'",
                 id="toleration-value"),
    pytest.param({TOLERATION: '[{"key": "k", "effect": "NoExecute", "tolerationSeconds": "60"}]'},
                 "tolerationSeconds", id="toleration-seconds-string"),
    pytest.param({TOLERATION: '[{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 60}]'},
                 "NoExecute", id="toleration-seconds-not-noexecute"),
    pytest.param({"ARF_K8S_IMAGE": "ghcr.io/arf/arf-trainer"}, "no tag", id="image-no-tag"),
    pytest.param({"ARF_K8S_IMAGE": "arf trainer:1"}, "'arf trainer:1'", id="image-space"),
    pytest.param({"ARF_K8S_IMAGE": "GHCR.io/Arf/Trainer:1"}, "lower-case", id="image-uppercase"),
    pytest.param({"ARF_K8S_IMAGE": "arf-trainer:"}, "'arf-trainer:'", id="image-empty-tag"),
    pytest.param({"ARF_K8S_DATAHUB_URI": "datahub"}, "ARF_K8S_DATAHUB_URI='datahub'",
                 id="datahub-relative"),
    pytest.param({"ARF_K8S_DATAHUB_URI": "./hub"}, "absolute", id="datahub-dot-relative"),
    pytest.param({"ARF_K8S_DATAHUB_URI": "s3://bucket/hub"}, "CSI", id="datahub-s3"),
])
def test_settings_the_cluster_would_refuse_fail_at_load(env, words):
    with pytest.raises(KubernetesConfigError, match=re.escape(words)):
        KubernetesSettings.from_env(env)


@pytest.mark.parametrize("env", [
    pytest.param({"ARF_K8S_WORKSPACE_PVC": "arf.workspace-1"}, id="dotted-pvc"),
    pytest.param({"ARF_K8S_IMAGE": "ghcr.io/arf/arf-trainer:0.1.0"}, id="image-tag"),
    pytest.param({"ARF_K8S_IMAGE": "localhost:5000/arf-trainer:dev"}, id="image-registry-port"),
    pytest.param({"ARF_K8S_IMAGE": "ghcr.io/arf/arf-trainer@sha256:" + "a" * 64},
                 id="image-digest"),
    pytest.param({"ARF_K8S_IMAGE": "ghcr.io/arf/arf-trainer:0.1@sha256:" + "0" * 64},
                 id="image-tag-and-digest"),
    pytest.param({"ARF_K8S_IMAGE": "   "}, id="image-blank-is-unset"),
    pytest.param({TOLERATION: '[{"operator": "Exists"}]'}, id="tolerate-everything"),
    pytest.param({TOLERATION: '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": '
                              '"NoSchedule"}, {"key": "spot", "value": "true"}, {"key": "k", '
                              '"operator": "Equal", "value": "", "effect": "NoExecute", '
                              '"tolerationSeconds": 30}]'}, id="usual-tolerations"),
    pytest.param({"ARF_K8S_DATAHUB_URI": "file:///datahub"}, id="datahub-file-uri"),
    pytest.param({"ARF_K8S_SECRET_ENV": '{"AWS_KEY": "arf-s3/secret-key.v1_A"}'},
                 id="secret-env"),
])
def test_good_settings_still_load(env):
    KubernetesSettings.from_env(env)


# -- the backend's PyTorchJob step ------------------------------------------------------------


def test_a_distributed_train_step_times_out_and_stops_its_job(k8s_dags, monkeypatch):
    """The factory's execution_timeout reaches the trigger, and the fresh operator Airflow
    resumes after the trigger's timeout finds (renders) its job's name and deletes it. Before:
    no timeout, and a resumed StepPyTorchJobOperator had no name to delete (body {})."""
    cluster = install(monkeypatch, FakeCluster())
    dag = k8s_dags["reach_bc"]
    task = dag.get_task("train")
    assert task.execution_timeout is not None
    ctx = backend_context(dag, "train")
    name = task.render_body(ctx)["metadata"]["name"]
    cluster.script(name, "Created")
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(ctx)
    assert deferred.value.timeout == task.execution_timeout  # the context has no start_date
    fresh = type(task)(task_id="train", loaded=task.loaded, namespace=BACKEND_NS)
    with pytest.raises(TaskDeferralTimeout):
        fresh.resume_execution(TRIGGER_FAIL_REPR,
                               {"error": TriggerFailureReason.TRIGGER_TIMEOUT}, ctx)
    assert cluster.verbs("delete") == [("delete", PLURAL, BACKEND_NS, name, "Foreground")]


# -- rank 0's log and exit code of an elastic job ------------------------------------------


def test_an_elastic_job_shows_worker_0s_log_and_its_bad_input_exit(cluster):
    """An elastic PyTorchJob (ARF_K8S_ELASTIC) has Worker replicas only. Before: "no master pod
    left": no log in the task, and its exit code (2: bad input, not retried) went unread."""
    from airflow.sdk.exceptions import AirflowFailException

    cluster.script(NAME, "Running", ("Failed", "PyTorchJobFailed", "Worker failed"))
    cluster.add_pod(NS, f"{NAME}-worker-1", job=NAME, replica_type="worker", index=1,
                    exit_code=1, log="worker 1: peer gone\n")
    cluster.add_pod(NS, f"{NAME}-worker-0", job=NAME, replica_type="worker", index=0,
                    exit_code=2, log="bad job spec: epochs must be > 0\n")
    with pytest.raises(AirflowFailException, match="epochs must be > 0") as failed:
        op = operator()
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context={})
        (event,) = run_trigger(deferred.value.trigger)
        op.execute_complete(context={}, event=event)
    assert "peer gone" not in str(failed.value)
    assert cluster.verbs("read_log") == [("read_log", "pods", NS, f"{NAME}-worker-0", "pytorch")]
