"""The production backend: each step is a Pod, multi-process training a Kubeflow PyTorchJob.

Selected with `ARF_BACKEND=kubernetes`; deployment settings come from the `ARF_K8S_*` variables
(`arf_training.kubernetes.config.KubernetesSettings`). The DAGs are the same as with the local
backend: only the operator class of each task changes, no template edit is needed.

    prepare_data, register_model, evaluate,   `StepPodOperator` / `EvaluatePodOperator`
    train when its world size is 1            (the provider's KubernetesPodOperator)
    train when its world size is above 1      `StepPyTorchJobOperator` (arf's PyTorchJobOperator)
    a `federated:` template's prepare_data    `SitePodOperator`, mapped over the sites
    and federate                              `FederateOperator`: SuperLink Pod + Service +
                                              a SuperNode Pod per site (`kubernetes_federated`)

A step that exits 75 ("preempted, resume me") is resumed without spending an Airflow retry, as
with the local backend: a PyTorchJob replica is restarted by the Training Operator, a Pod step gets
a new pod in the same task try (`arf_training.kubernetes.restarts`).

Every operator builds the step's `StepSpec` at task run time exactly as the local operators do
(`build_step_spec` with the run's identity and trigger conf, under `fail_fast_on_bad_input`, so a
bad conf fails the first task without retries), renders it with the pure renderers of
`arf_training.kubernetes` and hands the manifest to the provider's machinery. Nothing is rendered
at parse time: a manifest depends on the run (names, workspace, conf).

How the step's result JSON becomes the task's XCom (contract item 4):

* **Pods**: `ARF_RESULT_PATH` is pointed at `/airflow/xcom/return.json`, the emptyDir that the
  provider mounts when `do_xcom_push=True`; the provider's xcom sidecar reads it with
  `kubectl exec`-style `cat` (the Airflow worker's service account needs `pods/exec`). Safe
  because no later step reads a prepare/register/evaluate result file, and the built-in trainer
  writes `<workspace>/train/result.json` itself (register reads that one). The exception is a
  train step with the template's own `training.command`: that command's `$ARF_RESULT_PATH` *is*
  `<workspace>/train/result.json`, which `arf-trainer register` reads, so it keeps the workspace
  path and its task returns no XCom (nothing downstream consumes it).
* **PyTorchJob**: rank 0 writes the result into the run workspace on the shared volume, which the
  Airflow worker does not mount; the task returns the job's status summary plus `result_path`
  (the file in the pods), not the result itself. See `StepPyTorchJobOperator`.

Parse time: this module imports no Kubernetes client. The Pod steps are light operators that
create the provider's KubernetesPodOperator (`arf_training.backends.kubernetes_pods`, which loads
both Kubernetes clients, about a second) only when the task runs; the PyTorchJob operator talks to
the API through the provider's hook, also imported at run time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from arf_training.backends.base import Backend
from arf_training.kubernetes.config import KubernetesSettings
from arf_training.kubernetes.jobs import DistributedJobRenderer, PyTorchJobRenderer
from arf_training.kubernetes.operators import PyTorchJobOperator
from arf_training.kubernetes.pod import pod_env, restricted_container_security_context
from arf_training.kubernetes.render import pod_arf_settings
from arf_training.links import JOB_LINKS, STEP_LINKS
from arf_training.runtime import (
    fail_fast_on_bad_input,
    models_to_evaluate,
    run_identity,
    trigger_conf,
)
from arf_training.stepspec import RunIdentity, StepSpec, build_step_spec

if TYPE_CHECKING:
    from arf_training.templates import LoadedTemplate

# The provider's xcom volume (`utils.xcom_sidecar.PodDefaults.XCOM_MOUNT_PATH`) + its file name.
XCOM_RESULT_PATH = "/airflow/xcom/return.json"
# Keep a failed pod (and its events, exit code, files) for `kubectl` debugging; its log is
# already in the task log.
ON_FINISH_ACTION = "delete_succeeded_pod"
# The provider's xcom sidecar, admitted under the "restricted" Pod Security Standard like the
# step container (alpine's `sh -c 'while true; do sleep 1; done'` needs no privilege).
XCOM_SIDECAR_SECURITY_CONTEXT: dict[str, Any] = restricted_container_security_context()


def runtime_settings(namespace: str | None) -> KubernetesSettings:
    """`ARF_K8S_*` as the worker sees them, with the operator's namespace (set at parse time)."""
    settings = KubernetesSettings.from_env()
    return dataclasses.replace(settings, namespace=namespace) if namespace else settings


def pod_step_spec(loaded: LoadedTemplate, step: str, context: Any,
                  settings: KubernetesSettings, *, conf: dict[str, Any] | None = None,
                  inputs: dict[str, Any] | None = None,
                  trial: dict[str, Any] | None = None) -> StepSpec:
    """The step's StepSpec as the local operators build it, with the pod's workspace root.

    `conf` None means the run's trigger conf (evaluate passes {}: the template configures it).
    Call under `fail_fast_on_bad_input()`.
    """
    return build_step_spec(loaded, step, run_identity(context),
                           trigger_conf(context) if conf is None else conf,
                           pod_arf_settings(settings), inputs=inputs, trial=trial)


def trial_identity(context: Any, trial: dict[str, Any] | None) -> RunIdentity:
    """The run identity that names a step's Pod/PyTorchJob; a study's trials (mapped instances
    of one task) each get their own name, with the trial number in the identity."""
    identity = run_identity(context)
    if trial is None:
        return identity
    return dataclasses.replace(identity, task_id=f"{identity.task_id}:trial-{trial['number']}")


def is_distributed(template: Any) -> bool:
    """Whether the train step of `template` (a TrainingTemplate) is a PyTorchJob."""
    distributed = template.training.distributed
    return distributed.nodes * distributed.procs_per_node > 1


def writes_result_to_xcom(loaded: LoadedTemplate, step: str) -> bool:
    """False only for a template's own training command (see the module docstring)."""
    return not (step == "train" and loaded.template.training.command is not None)


def with_xcom_result(spec: StepSpec) -> StepSpec:
    """The spec with its result file in the provider's xcom volume."""
    return dataclasses.replace(spec, env={**spec.env, "ARF_RESULT_PATH": XCOM_RESULT_PATH},
                               result_path=Path(XCOM_RESULT_PATH))


class PodTask(BaseOperator):
    """A task whose step runs in a Pod, through the provider's KubernetesPodOperator.

    The DAG holds this light operator; the provider's operator (`kubernetes_pods`) is created
    when the task runs, because importing it loads both Kubernetes clients (about a second per
    DAG parse). Its arguments are kept here and passed on; the run is handed over whole:
    `execute`, `trigger_reentry` (a deferred task resumes on this object) and `on_kill`.

    :param namespace: where the pod runs (`ARF_K8S_NAMESPACE` when the DAG was built).
    :param kubernetes_conn_id: the provider's Kubernetes connection.
    :param deferrable: wait for the pod in the triggerer instead of a worker slot.
    :param get_logs: stream the step's output into the task log.
    :param on_finish_action: the provider's `on_finish_action` (default: keep failed pods).
    """

    ui_color = "#e5eefc"
    operator_extra_links = STEP_LINKS  # MLflow run, model version (arf_training.links)

    def __init__(self, *, namespace: str, kubernetes_conn_id: str | None = "kubernetes_default",
                 deferrable: bool = True, get_logs: bool = True,
                 on_finish_action: str = ON_FINISH_ACTION, do_xcom_push: bool = True,
                 **kwargs: Any):
        super().__init__(do_xcom_push=do_xcom_push, **kwargs)
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.deferrable = deferrable
        self.get_logs = get_logs
        self.on_finish_action = on_finish_action
        self._pod_operator: Any = None

    def _pod_arguments(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "namespace": self.namespace,
                "kubernetes_conn_id": self.kubernetes_conn_id, "deferrable": self.deferrable,
                "get_logs": self.get_logs, "on_finish_action": self.on_finish_action,
                "do_xcom_push": self.do_xcom_push, "execution_timeout": self.execution_timeout}

    def _create_pod_operator(self, pods: Any) -> Any:
        raise NotImplementedError

    def pod_operator(self) -> Any:
        """The provider operator that runs this try (created on first use)."""
        if self._pod_operator is None:
            from arf_training.backends import kubernetes_pods

            self._pod_operator = self._create_pod_operator(kubernetes_pods)
        return self._pod_operator

    def execute(self, context: Any) -> Any:
        from airflow.sdk.bases.operator import ExecutorSafeguard

        operator = self.pod_operator()
        # The task runner marks the task it runs for Airflow's ExecutorSafeguard, which warns
        # that an operator executed inside another is "called outside of the Task Runner".
        # The provider's operator *is* this task's work: mark it instead while it runs.
        token = ExecutorSafeguard.tracker.set(operator)
        try:
            return operator.execute(context)
        finally:
            ExecutorSafeguard.tracker.reset(token)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        return self.pod_operator().trigger_reentry(context, event)

    def on_kill(self) -> None:
        if self._pod_operator is not None:
            self._pod_operator.on_kill()


class StepPodOperator(PodTask):
    """Runs one step (prepare, register, or a 1-process train) as a Pod.

    :param loaded: the validated template (with its path and content hash).
    :param step: prepare, train or register.
    :param trial: for the mapped trials of an `hpo:` template, the trial to train.
    """

    def __init__(self, *, loaded: LoadedTemplate, step: str,
                 trial: dict[str, Any] | None = None, **kwargs: Any):
        if not writes_result_to_xcom(loaded, step):
            kwargs.setdefault("do_xcom_push", False)
        super().__init__(**kwargs)
        self.loaded = loaded
        self.step = step
        self.trial = trial

    def _create_pod_operator(self, pods: Any) -> Any:
        return pods.StepPod(loaded=self.loaded, step=self.step, trial=self.trial,
                            **self._pod_arguments())

    def render_pod(self, context: Any) -> dict[str, Any]:
        """The v1 Pod of this try (a plain dict). Validates the trigger conf first."""
        return self.pod_operator().render_pod(context)


class EvaluatePodOperator(PodTask):
    """Evaluates each model version named by the triggering Asset events (or params), one Pod
    per version (see `kubernetes_pods.EvaluatePod`).

    :param templates: model name -> the template whose `evaluation` section scores it.
    """

    ui_color = "#fdf2e0"

    def __init__(self, *, templates: dict[str, LoadedTemplate], **kwargs: Any):
        super().__init__(**kwargs)
        self.templates = templates

    def _create_pod_operator(self, pods: Any) -> Any:
        return pods.EvaluatePod(templates=self.templates, **self._pod_arguments())

    def targets(self, context: Any) -> list[dict[str, str]]:
        with fail_fast_on_bad_input():
            return models_to_evaluate(context, self.templates)

    def render_pod(self, context: Any, target: dict[str, str] | None = None) -> dict[str, Any]:
        """The Pod that evaluates `target` (default: the only target of this run)."""
        return self.pod_operator().render_pod(context, target)



class StepPyTorchJobOperator(PyTorchJobOperator):
    """Runs a multi-process train step as a PyTorchJob, rendered when the task runs.

    :param loaded: the validated template.
    :param step: "train" (the only distributed step).
    :param namespace: where the job runs (`ARF_K8S_NAMESPACE` when the DAG was built).

    Result: rank 0 writes the result JSON to `ARF_RESULT_PATH` in the run workspace (the shared
    volume), where `register` reads it; the Airflow worker does not mount that volume, so this
    task's XCom is the job's status summary with `result_path` (the file's path in the pods),
    not the result JSON itself.
    """

    renderer: ClassVar[DistributedJobRenderer] = PyTorchJobRenderer()
    # Its result stays in the pods (see above): the job is what there is to link to.
    operator_extra_links = JOB_LINKS

    def __init__(self, *, loaded: LoadedTemplate, step: str = "train",
                 trial: dict[str, Any] | None = None, **kwargs: Any):
        kwargs.setdefault("deferrable", True)
        # Like the pods: keep a failed job (and its pods) for `kubectl` debugging; the job's
        # runPolicy.ttlSecondsAfterFinished garbage-collects it later.
        kwargs.setdefault("delete_on_finish", "on_success")
        super().__init__(body={}, **kwargs)
        self.loaded = loaded
        self.step = step
        self.trial = trial

    def step_spec(self, context: Any) -> tuple[StepSpec, KubernetesSettings]:
        settings = runtime_settings(self.namespace)
        with fail_fast_on_bad_input():
            return pod_step_spec(self.loaded, self.step, context, settings,
                                 trial=self.trial), settings

    def render_body(self, context: Any) -> dict[str, Any]:
        """The PyTorchJob of this try (a plain dict). Validates the trigger conf first."""
        spec, settings = self.step_spec(context)
        return self.renderer.render(spec, trial_identity(context, self.trial), settings)

    def execute(self, context: Any) -> dict[str, Any]:
        self.body = self.render_body(context)
        return super().execute(context)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None,
                         context: Any) -> Any:
        # Airflow resumes a fresh operator: the job's name (which a failed deferral needs, to
        # stop the job) is rendered from the run, as in `execute`.
        if not self.body:
            self.body = self.render_body(context)
        return super().resume_execution(next_method, next_kwargs, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        summary = super().execute_complete(context, event)
        spec, settings = self.step_spec(context)
        return {**summary, "result_path": pod_env(spec, settings)["ARF_RESULT_PATH"]}


class KubernetesBackend(Backend):
    """Steps as Pods (KubernetesPodOperator) and PyTorchJobs, in `ARF_K8S_NAMESPACE`."""

    name: ClassVar[str] = "kubernetes"

    def __init__(self, settings: KubernetesSettings | None = None):
        # Parse time reads only the namespace from these; the rest is read when a task runs.
        self.settings = settings or KubernetesSettings.from_env()

    def step_task(self, *, task_id: str, loaded: LoadedTemplate, step: str, **kwargs: Any):
        kwargs.setdefault("namespace", self.settings.namespace)
        if step == "train" and is_distributed(loaded.template):
            return StepPyTorchJobOperator(task_id=task_id, loaded=loaded, step=step, **kwargs)
        return StepPodOperator(task_id=task_id, loaded=loaded, step=step, **kwargs)

    def trial_task(self, *, task_id: str, loaded: LoadedTemplate, trials: Any, **kwargs: Any):
        kwargs.setdefault("namespace", self.settings.namespace)
        cls = StepPyTorchJobOperator if is_distributed(loaded.template) else StepPodOperator
        return cls.partial(task_id=task_id, loaded=loaded, step="train",
                           **kwargs).expand(trial=trials)

    def evaluate_task(self, *, task_id: str, templates: dict[str, LoadedTemplate], **kwargs: Any):
        kwargs.setdefault("namespace", self.settings.namespace)
        return EvaluatePodOperator(task_id=task_id, templates=templates, **kwargs)

    def site_task(self, *, task_id: str, loaded: LoadedTemplate, **kwargs: Any):
        """A template's `federated:` prepare, mapped over its sites (`kubernetes_federated`)."""
        from arf_training.backends.kubernetes_federated import SitePodOperator

        kwargs.setdefault("namespace", self.settings.namespace)
        sites = [site.name for site in loaded.template.federated.sites]
        return SitePodOperator.partial(task_id=task_id, loaded=loaded,
                                       map_index_template="{{ task.site }}",
                                       **kwargs).expand(site=sites)

    def federate_task(self, *, task_id: str, loaded: LoadedTemplate, **kwargs: Any):
        from arf_training.backends.kubernetes_federated import FederateOperator

        kwargs.setdefault("namespace", self.settings.namespace)
        return FederateOperator(task_id=task_id, loaded=loaded, **kwargs)

    def describe(self, template: Any) -> str:
        if getattr(template, "federated", None) is not None:
            return (f"{self.name} (federate as a SuperLink Pod and a SuperNode Pod per site "
                    f"in namespace {self.settings.namespace})")
        shape = "PyTorchJob" if is_distributed(template) else "Pod"
        return f"{self.name} (train as a {shape} in namespace {self.settings.namespace})"
