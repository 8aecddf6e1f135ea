"""The Kubernetes backend: same DAGs as the local backend, steps as Pods and PyTorchJobs.

DAGs are built by the factory with ARF_BACKEND=kubernetes (as the DAG file does). The run-time
path of each operator (StepSpec -> manifest) runs with a small fake task context and is validated
like the renderers' own output (`test_k8s_render`): Pods with `kubernetes-validate` in strict
mode, PyTorchJobs against the vendored Kubeflow CRD schema. The only fakes are at the Kubernetes
API boundary (`fake_k8s`) and the task context.
"""

from __future__ import annotations

import collections
import datetime
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from fake_k8s import FakeCluster, install
from kubernetes.client import (
    ApiClient,
    V1ContainerState,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodStatus,
)
from test_dagbag import _bag_in_subprocess
from test_k8s_render import K8S_VERSIONS, _pods_of, pytorchjob_schema  # noqa: F401 (fixture)

from arf_training.errors import ArfError, StepFailed
from arf_training.kubernetes.operators import PyTorchJobOperator
from arf_training.kubernetes.triggers import GROUP, PLURAL, VERSION
from arf_training.templates import load_template, template_files

REPO = Path(__file__).resolve().parents[2]
ALL_SHIPPED = list(map(load_template, template_files(REPO / "config_templates")))
# The step-by-step checks below; a federated template's tasks differ (its prepare is mapped over
# sites, it federates instead of training): test_k8s_federated_operators.
SHIPPED = [t for t in ALL_SHIPPED if t.template.federated is None]
NAMESPACE = "arf-ml"
RUN_ID = "manual__2026-01-02T03:04:05+00:00"
RUN_AFTER = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
XCOM_RESULT = "/airflow/xcom/return.json"
STEP_OF = {"prepare_data": "prepare", "train": "train", "register_model": "register"}


def _world_size(loaded) -> int:
    d = loaded.template.training.distributed
    return d.nodes * d.procs_per_node


def _custom(loaded) -> bool:
    return loaded.template.training.command is not None


@pytest.fixture
def k8s_env(monkeypatch):
    monkeypatch.setenv("ARF_BACKEND", "kubernetes")
    monkeypatch.setenv("ARF_K8S_NAMESPACE", NAMESPACE)
    # A pod cannot reach the embedded PostgreSQL: a deployment names its Optuna database.
    monkeypatch.setenv("ARF_OPTUNA_STORAGE", "postgresql+psycopg://optuna@postgres.arf.svc/optuna")
    # The provider's hook reads its connection (xcom sidecar image, in-cluster flag) even for a
    # dry run; a plain connection from the environment, as a deployment would define it.
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                       json.dumps({"conn_type": "kubernetes", "extra": {"in_cluster": False}}))


@pytest.fixture
def k8s_dags(k8s_env) -> dict[str, Any]:
    from arf_training.factory import build_dags

    return build_dags(REPO / "config_templates")


@pytest.fixture
def local_dags(monkeypatch) -> dict[str, Any]:
    from arf_training.factory import build_dags

    monkeypatch.delenv("ARF_BACKEND", raising=False)
    return build_dags(REPO / "config_templates")


def context(dag, task_id: str, *, conf: dict | None = None, params: dict | None = None,
            try_number: int = 1, events: dict | None = None) -> dict[str, Any]:
    """The parts of an Airflow task context the operators and the provider read."""
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task_id, try_number=try_number, map_index=-1)
    return {"ti": ti, "dag": dag, "run_id": RUN_ID, "params": params or {},
            "dag_run": SimpleNamespace(run_id=RUN_ID, conf=conf or {}, logical_date=None,
                                       run_after=RUN_AFTER),
            "triggering_asset_events": events or {},
            "outlet_events": collections.defaultdict(SimpleNamespace)}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _validate(manifest: dict[str, Any], schema: dict[str, Any]) -> None:
    if manifest["kind"] == "PyTorchJob":
        jsonschema.validate(manifest, schema)
    for pod in _pods_of(manifest):
        for version in K8S_VERSIONS:
            assert kubernetes_validate.validate(pod, version, strict=True) == version


# --- the DAGs ---------------------------------------------------------------------------------


def test_same_dags_and_graphs_as_the_local_backend(k8s_dags, local_dags):
    assert any("federate" in dag.task_ids for dag in k8s_dags.values())
    assert sorted(k8s_dags) == sorted(local_dags)
    for dag_id, local in local_dags.items():
        dag = k8s_dags[dag_id]
        assert [t.task_id for t in dag.topological_sort()] == \
            [t.task_id for t in local.topological_sort()]
        for task in local.tasks:
            other = dag.get_task(task.task_id)
            assert other.downstream_task_ids == task.downstream_task_ids
            assert [o.uri for o in other.outlets] == [o.uri for o in task.outlets]
            assert other.retries == task.retries
            assert other.execution_timeout == task.execution_timeout
        assert dag.params.keys() == local.params.keys()
        assert type(dag.timetable) is type(local.timetable)
        assert dag.max_active_runs == local.max_active_runs and dag.tags == local.tags
        if dag_id != "arf_evaluate":  # a training DAG's doc names its backend
            assert "| backend | `kubernetes` |" in dag.doc_md
            assert "| backend | `local` |" in local.doc_md


@pytest.mark.parametrize("loaded", [pytest.param(t, id=t.name) for t in SHIPPED])
def test_operator_classes_and_settings(k8s_dags, loaded):
    from arf_training.backends.kubernetes import StepPodOperator, StepPyTorchJobOperator

    dag = k8s_dags[loaded.name]
    for task_id, step in STEP_OF.items():
        task = dag.get_task(task_id)
        assert task.namespace == NAMESPACE and task.deferrable is True
        assert task.loaded is loaded or task.loaded.sha256 == loaded.sha256
        if step == "train" and _world_size(loaded) > 1:
            assert isinstance(task, StepPyTorchJobOperator)
            assert isinstance(task, PyTorchJobOperator)
            assert task.delete_on_finish == "on_success" and task.fetch_logs is True
            continue
        # A light operator in the DAG; the provider's pod operator is created when it runs.
        assert isinstance(task, StepPodOperator) and not isinstance(task, KubernetesPodOperator)
        pod = task.pod_operator()
        assert isinstance(pod, KubernetesPodOperator) and pod.task_id == task_id
        assert pod.namespace == NAMESPACE and pod.deferrable is True
        assert pod.on_finish_action.value == "delete_succeeded_pod"
        assert pod.get_logs is True and pod.base_container_name == "step"
        assert pod.execution_timeout == task.execution_timeout
        # The result comes back through the xcom sidecar, except from a custom train command.
        assert task.do_xcom_push is pod.do_xcom_push is not (step == "train" and _custom(loaded))


def test_evaluate_operator(k8s_dags):
    from arf_training.backends.kubernetes import EvaluatePodOperator

    (task,) = k8s_dags["arf_evaluate"].tasks
    assert isinstance(task, EvaluatePodOperator) and not isinstance(task, KubernetesPodOperator)
    assert task.deferrable is True and task.namespace == NAMESPACE and task.do_xcom_push
    pod = task.pod_operator()
    assert isinstance(pod, KubernetesPodOperator) and pod.templates == task.templates
    assert pod.on_finish_action.value == "delete_succeeded_pod" and pod.do_xcom_push
    # A fine-tune registers under its base model's name: one entry per model.
    assert sorted(task.templates) == sorted({t.template.model.name for t in ALL_SHIPPED
                                             if t.template.evaluation})


def test_shipped_shapes_cover_both_train_operators():
    # Guards the parametrized tests above: a template change must not silently drop a path.
    assert {_world_size(t) > 1 for t in SHIPPED} == {True, False}


def test_switching_backend_needs_no_template_change_and_parses_cleanly(k8s_env):
    result = _bag_in_subprocess(REPO / "dags", REPO / "config_templates")
    assert result["errors"] == {}
    assert result["dags"] == sorted([t.name for t in ALL_SHIPPED] + ["arf_evaluate"])
    # Not even the Kubernetes clients: the provider's pod operator is created at run time.
    assert result["heavy"] == []


def test_unknown_backend_lists_the_valid_ones(monkeypatch):
    from arf_training.factory import build_training_dag

    monkeypatch.setenv("ARF_BACKEND", "slurm")
    with pytest.raises(ArfError, match=r"'slurm'.*'local'.*'kubernetes'"):
        build_training_dag(SHIPPED[0])


# --- run time: StepSpec -> manifest, per template and step -----------------------------------


RENDER_CASES = [pytest.param(t, task_id, id=f"{t.name}-{task_id}")
                for t in SHIPPED for task_id in STEP_OF]


@pytest.mark.parametrize("loaded, task_id", RENDER_CASES)
def test_run_time_manifest_is_valid(k8s_dags, loaded, task_id, pytorchjob_schema):
    dag = k8s_dags[loaded.name]
    task = dag.get_task(task_id)
    ctx = context(dag, task_id, conf={"seed": 7}, try_number=3)
    if hasattr(task, "render_pod"):
        manifest = task.render_pod(ctx)
        box = manifest["spec"]["containers"][0]
    else:
        manifest = task.render_body(ctx)
        box = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"][0]
        assert manifest["kind"] == "PyTorchJob"
    _validate(manifest, pytorchjob_schema)
    assert manifest["metadata"]["namespace"] == NAMESPACE
    assert manifest["metadata"]["labels"]["arf.dev/try-number"] == "3"
    env = _env(box)
    job_spec = json.loads(env["ARF_JOB_SPEC_JSON"])
    assert job_spec["step"] == STEP_OF[task_id] and job_spec["seed"] == 7
    assert job_spec["run"] == {"dag_id": loaded.name, "run_id": RUN_ID, "task_id": task_id,
                               "try_number": 3, "logical_date": None,
                               "data_interval_start": None, "data_interval_end": None,
                               "run_after": RUN_AFTER.isoformat()}
    # The step claims the run's folder on the workspace volume (arf_trainer.dag_run_dir).
    assert env["ARF_DAG_RUN_DIR"] == env["ARF_WORKSPACE"]
    workspace = env["ARF_WORKSPACE"]
    assert workspace.startswith("/workspace/" + loaded.name + "/")
    if task_id == "train" and (_custom(loaded) or _world_size(loaded) > 1):
        assert env["ARF_RESULT_PATH"] == f"{workspace}/train/result.json"
    else:
        assert env["ARF_RESULT_PATH"] == XCOM_RESULT


@pytest.mark.parametrize("loaded, task_id",
                         [c for c in RENDER_CASES if c.values[1] != "train"
                          or _world_size(c.values[0]) == 1])
def test_pod_request_as_the_provider_builds_it(k8s_dags, loaded, task_id):
    """The provider merges its arguments over the rendered pod: the result must stay valid and
    keep the rendered container, plus a restricted xcom sidecar on the xcom emptyDir."""
    dag = k8s_dags[loaded.name]
    task = dag.get_task(task_id)
    ctx = context(dag, task_id)
    rendered = task.render_pod(ctx)
    provider = task.pod_operator()
    provider._use(rendered)
    pod = ApiClient().sanitize_for_serialization(provider.build_pod_request_obj(ctx, dry_run=True))
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(pod, version, strict=True) == version
    assert pod["metadata"]["name"] == rendered["metadata"]["name"]  # no random suffix
    assert pod["metadata"]["namespace"] == NAMESPACE
    step, *sidecars = pod["spec"]["containers"]
    want = rendered["spec"]["containers"][0]
    for key in ("name", "image", "command", "resources", "securityContext", "envFrom"):
        assert step.get(key) == want.get(key), key
    assert step["env"] == want["env"]
    for key in ("activeDeadlineSeconds", "terminationGracePeriodSeconds", "securityContext",
                "automountServiceAccountToken", "restartPolicy"):
        assert pod["spec"][key] == rendered["spec"][key], key
    if not task.do_xcom_push:
        assert sidecars == []
        return
    (sidecar,) = sidecars
    assert sidecar["name"] == "airflow-xcom-sidecar"
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    xcom = {"name": "xcom", "mountPath": "/airflow/xcom"}
    assert xcom in step["volumeMounts"] and xcom in sidecar["volumeMounts"]
    # Writable despite readOnlyRootFilesystem: an emptyDir, group-owned by the step's fsGroup.
    assert {"name": "xcom", "emptyDir": {}} in pod["spec"]["volumes"]
    assert pod["spec"]["securityContext"]["fsGroup"] == step["securityContext"]["runAsGroup"]
    # No recursive chown of the (large) workspace and data hub volumes at every step's start.
    assert pod["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert _env(step)["ARF_RESULT_PATH"] == XCOM_RESULT


def test_bad_trigger_conf_fails_fast_before_any_api_call(k8s_dags):
    dag = k8s_dags["reach_bc"]
    for task_id in STEP_OF:
        task = dag.get_task(task_id)
        with pytest.raises(AirflowFailException, match="no_such_param"):
            task.execute(context(dag, task_id, conf={"no_such_param": 1}))


# --- evaluate -------------------------------------------------------------------------------


def _event(model: str, version: str, event_id: int) -> SimpleNamespace:
    return SimpleNamespace(id=event_id, extra={"model_name": model, "model_version": version})


def test_evaluate_renders_one_pod_per_model_version(k8s_dags, pytorchjob_schema):
    dag = k8s_dags["arf_evaluate"]
    (task,) = dag.tasks
    # Every evaluable model: reach_bc's (its fine-tune shares it) and the from-scratch retrain's.
    assert set(task.templates) == {"reach_bc_policy", "reach_bc_policy_retrain",
                                   "reach_pixels_bc_policy", "reach_bc_federated_policy"}
    model = "reach_bc_policy"
    ctx = context(dag, "evaluate", events={"asset": [_event(model, "3", 1), _event(model, "4", 2)]})
    targets = task.targets(ctx)
    assert [t["model_version"] for t in targets] == ["3", "4"]
    pods = [task.render_pod(ctx, t) for t in targets]
    for pod in pods:
        _validate(pod, pytorchjob_schema)
    assert len({p["metadata"]["name"] for p in pods}) == 2
    inputs = [json.loads(_env(p["spec"]["containers"][0])["ARF_JOB_SPEC_JSON"])["inputs"]
              for p in pods]
    assert [(i["model_name"], i["model_version"]) for i in inputs] == [(model, "3"), (model, "4")]
    # Manual run: the version comes from the params; the template configures the evaluation.
    manual = context(dag, "evaluate", params={"model_name": model, "model_version": "5"},
                     conf={"model_name": model, "model_version": "5"})
    spec = json.loads(_env(task.render_pod(manual)["spec"]["containers"][0])["ARF_JOB_SPEC_JSON"])
    assert spec["inputs"]["model_version"] == "5" and spec["conf"] == {}
    assert _env(task.render_pod(manual)["spec"]["containers"][0])["ARF_RESULT_PATH"] == XCOM_RESULT


def test_evaluate_with_nothing_to_evaluate_fails_fast(k8s_dags):
    dag = k8s_dags["arf_evaluate"]
    (task,) = dag.tasks
    with pytest.raises(AirflowFailException, match="nothing to evaluate"):
        task.execute(context(dag, "evaluate"))


# --- results and failures -------------------------------------------------------------------


def test_register_result_becomes_the_model_asset_event(k8s_dags):
    dag = k8s_dags["reach_bc"]
    task = dag.get_task("register_model")
    ctx = context(dag, "register_model")
    result = {"model_name": "reach_bc_policy", "model_version": 4, "model_uri": "models:/x/4",
              "training_run_id": "abc"}
    assert task.pod_operator()._finish(ctx, result) == result
    (event,) = ctx["outlet_events"].values()
    assert event.extra["model_version"] == "4" and event.extra["dag_run_id"] == RUN_ID
    with pytest.raises(StepFailed, match="wrote no result"):
        task.pod_operator()._finish(ctx, None)


def _terminated_pod(exit_code: int) -> V1Pod:
    state = V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=exit_code))
    return V1Pod(metadata=V1ObjectMeta(name="p", namespace=NAMESPACE),
                 status=V1PodStatus(container_statuses=[V1ContainerStatus(
                     name="step", state=state, image="i", image_id="", ready=False,
                     restart_count=0)]))


@pytest.mark.parametrize("exit_code, fail_fast", [(2, True), (1, False), (137, False)])
def test_bad_input_exit_code_is_not_retried(k8s_dags, exit_code, fail_fast):
    from airflow.sdk.exceptions import AirflowException

    task = k8s_dags["reach_bc"].get_task("prepare_data").pod_operator()
    task.remote_pod = _terminated_pod(exit_code)

    def failing(_context):
        raise AirflowException("Pod p returned a failure.")

    expected = AirflowFailException if fail_fast else AirflowException
    with pytest.raises(expected) as raised:
        task._run({}, failing)
    assert (type(raised.value) is AirflowFailException) is fail_fast


def test_distributed_train_runs_the_rendered_job(k8s_dags, monkeypatch, pytorchjob_schema):
    """execute renders the job, creates it, defers; the trigger waits; the summary comes back."""
    import asyncio

    cluster = install(monkeypatch, FakeCluster())
    dag = k8s_dags["reach_bc"]
    task = dag.get_task("train")
    ctx = context(dag, "train")
    body = task.render_body(ctx)
    name = body["metadata"]["name"]
    cluster.script(name, "Created", "Running", "Succeeded")
    cluster.add_pod(NAMESPACE, f"{name}-master-0", job=name, exit_code=0, log="rank 0: done\n")
    task.poll_interval = 0.001
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(ctx)
    created = cluster.objects[(GROUP, VERSION, PLURAL, NAMESPACE, name)]
    _validate(created, pytorchjob_schema)
    assert created["spec"] == body["spec"]

    async def collect(trigger):
        return [event.payload async for event in trigger.run()]

    (event,) = asyncio.run(collect(deferred.value.trigger))
    # A fresh operator resumes (as after a deferral): nothing of the first one is needed.
    fresh = type(task)(task_id="train", loaded=task.loaded, namespace=NAMESPACE,
                       poll_interval=0.001)
    summary = fresh.execute_complete(ctx, event)
    assert summary["status"] == "success" and summary["name"] == name
    assert summary["result_path"] == _env(
        body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    )["ARF_RESULT_PATH"]


def test_dags_serialize_for_the_scheduler(k8s_dags):
    from airflow.serialization.serialized_objects import DagSerialization

    for dag in k8s_dags.values():
        rebuilt = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        assert sorted(rebuilt.task_ids) == sorted(dag.task_ids)
