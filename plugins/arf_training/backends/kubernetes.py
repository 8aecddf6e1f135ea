"""The production backend: each step is a Pod, multi-process training a Kubeflow PyTorchJob.

Selected with `ARF_BACKEND=kubernetes`; deployment settings come from the `ARF_K8S_*` variables
(`arf_training.kubernetes.config.KubernetesSettings`). The DAGs are the same as with the local
backend: only the operator class of each task changes, no template edit is needed.

    prepare_data, register_model, evaluate,   `StepPodOperator` / `EvaluatePodOperator`
    train when its world size is 1            (the provider's KubernetesPodOperator)
    train when its world size is above 1      `StepPyTorchJobOperator` (arf's PyTorchJobOperator)

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

Importing this module imports the provider's `KubernetesPodOperator` (the kubernetes clients,
about 1-2 s, no torch/MLflow). It is imported only when ARF_BACKEND=kubernetes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

from arf_training.backends.base import Backend
from arf_training.errors import BAD_INPUT_EXIT, SKIP_EXIT, StepFailed
from arf_training.kubernetes.config import KubernetesSettings
from arf_training.kubernetes.jobs import DistributedJobRenderer, PyTorchJobRenderer
from arf_training.kubernetes.operators import PyTorchJobOperator
from arf_training.kubernetes.pod import (
    CONTAINER_NAME,
    pod_env,
    render_pod,
    resource_name,
    restricted_container_security_context,
)
from arf_training.kubernetes.render import pod_arf_settings
from arf_training.runtime import (
    emit_model_event,
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


def _exit_code(pod: Any, container: str = CONTAINER_NAME) -> int | None:
    status = getattr(pod, "status", None)
    for item in getattr(status, "container_statuses", None) or []:
        if item.name != container:
            continue
        for state in (item.state, item.last_state):
            terminated = getattr(state, "terminated", None) if state else None
            if terminated is not None and terminated.exit_code is not None:
                return int(terminated.exit_code)
    return None


class _ArfPodOperator(KubernetesPodOperator):
    """A KubernetesPodOperator whose pod is rendered from a StepSpec when the task runs.

    The rendered Pod is handed over as `pod_template_dict`; the provider merges its own
    arguments over it (`PodGenerator.reconcile_pods`), so those left unset here keep the
    rendered values (image, command, env, resources, security contexts, volumes, deadline).
    The xcom sidecar and the provider's pod labels (used to reattach after a worker restart)
    are added by the provider.
    """

    ui_color = "#e5eefc"

    def __init__(self, *, namespace: str, kubernetes_conn_id: str | None = "kubernetes_default",
                 **kwargs: Any):
        kwargs.setdefault("deferrable", True)
        kwargs.setdefault("get_logs", True)
        kwargs.setdefault("on_finish_action", ON_FINISH_ACTION)
        kwargs.setdefault("do_xcom_push", True)
        # A step that found nothing to do (prepare, dataset.skip_if_empty) exits 99: the
        # provider raises AirflowSkipException, so the later tasks are skipped, not failed.
        kwargs.setdefault("skip_on_exit_code", SKIP_EXIT)
        kwargs.setdefault("xcom_sidecar_container_security_context",
                          dict(XCOM_SIDECAR_SECURITY_CONTEXT))
        super().__init__(
            namespace=namespace,
            kubernetes_conn_id=kubernetes_conn_id,
            # The rendered container's name: logs and exit status are read from it.
            base_container_name=CONTAINER_NAME,
            # The rendered name is already unique per (dag_id, run_id, task_id, try_number).
            random_name_suffix=False,
            **kwargs,
        )

    # -- rendering (pure; tests call it with a fake context) ---------------------------------

    def render_pod(self, context: Any) -> dict[str, Any]:
        """The v1 Pod of this try (a plain dict). Validates the trigger conf first."""
        raise NotImplementedError

    def _use(self, pod: dict[str, Any]) -> None:
        self.pod_template_dict = pod
        self.pod_request_obj = None
        self.pod = None
        self.remote_pod = None
        # The provider's on_kill deletes with this grace: let the step checkpoint on SIGTERM.
        self.termination_grace_period = pod["spec"].get("terminationGracePeriodSeconds")

    # -- outcome -----------------------------------------------------------------------------

    def _fail_fast_on_bad_input(self, exc: Exception) -> None:
        """Exit code 2 (bad input) fails the task without retries, as with the local backend."""
        pod = getattr(self, "remote_pod", None) or getattr(self, "pod", None)
        if _exit_code(pod) == BAD_INPUT_EXIT:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{exc} (exit code {BAD_INPUT_EXIT}: bad input; "
                                       "not retried)") from exc

    def _run(self, context: Any, run: Any, *args: Any) -> Any:
        from airflow.sdk.exceptions import AirflowException, TaskDeferred

        try:
            return run(context, *args)
        except TaskDeferred:
            raise
        except AirflowException as exc:
            self._fail_fast_on_bad_input(exc)
            raise

    def _expect_result(self, result: Any, what: str) -> Any:
        if self.do_xcom_push and result is None:
            raise StepFailed(f"{what} exited 0 but wrote no result at {XCOM_RESULT_PATH} "
                             "(ARF_RESULT_PATH); a step must write its result JSON last")
        return result


class StepPodOperator(_ArfPodOperator):
    """Runs one step (prepare, register, or a 1-process train) as a Pod.

    :param loaded: the validated template (with its path and content hash).
    :param step: prepare, train or register.
    :param namespace: where the pod runs (`ARF_K8S_NAMESPACE` when the DAG was built).
    """

    def __init__(self, *, loaded: LoadedTemplate, step: str,
                 trial: dict[str, Any] | None = None, **kwargs: Any):
        if not writes_result_to_xcom(loaded, step):
            kwargs.setdefault("do_xcom_push", False)
        super().__init__(**kwargs)
        self.loaded = loaded
        self.step = step
        self.trial = trial

    def render_pod(self, context: Any) -> dict[str, Any]:
        settings = runtime_settings(self.namespace)
        with fail_fast_on_bad_input():
            spec = pod_step_spec(self.loaded, self.step, context, settings, trial=self.trial)
        if writes_result_to_xcom(self.loaded, self.step):
            spec = with_xcom_result(spec)
        return render_pod(spec, trial_identity(context, self.trial), settings)

    def execute(self, context: Any) -> Any:
        self._use(self.render_pod(context))
        # Returns here only when not deferrable; otherwise trigger_reentry finishes the task.
        return self._finish(context, self._run(context, super().execute))

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        return self._finish(context, self._run(context, super().trigger_reentry, event))

    def _finish(self, context: Any, result: Any) -> Any:
        if not self.do_xcom_push:
            return None  # a template's own training command: see the module docstring
        result = self._expect_result(result, f"step {self.step!r}")
        if self.step == "register":
            emit_model_event(context, self.loaded, result)
        return result


class EvaluatePodOperator(_ArfPodOperator):
    """Evaluates each model version named by the triggering Asset events (or params), one Pod
    per version, and returns the list of their results (as `LocalEvaluateOperator` does).

    One version (the usual case: one Asset event, or a manual run) waits in the triggerer.
    Several versions in one run are evaluated one after the other on the worker (a deferred
    task resumes with the outcome of one pod only).
    """

    ui_color = "#fdf2e0"

    def __init__(self, *, templates: dict[str, LoadedTemplate], **kwargs: Any):
        super().__init__(**kwargs)
        self.templates = templates

    def targets(self, context: Any) -> list[dict[str, str]]:
        with fail_fast_on_bad_input():
            return models_to_evaluate(context, self.templates)

    def render_pod(self, context: Any, target: dict[str, str] | None = None) -> dict[str, Any]:
        """The Pod that evaluates `target` (default: the only target of this run)."""
        if target is None:
            (target,) = self.targets(context)
        settings = runtime_settings(self.namespace)
        loaded = self.templates[target["model_name"]]
        with fail_fast_on_bad_input():
            # Evaluation is configured by the template, not by this run's conf.
            spec = with_xcom_result(pod_step_spec(loaded, "evaluate", context, settings,
                                                  conf={}, inputs=target))
        identity = run_identity(context)
        pod = render_pod(spec, identity, settings)
        # One pod per version within this try: the version joins the name's identity.
        pod["metadata"]["name"] = resource_name(RunIdentity(
            dag_id=identity.dag_id, run_id=identity.run_id,
            task_id=f"{identity.task_id}:{target['model_name']}:{target['model_version']}",
            try_number=identity.try_number))
        pod["metadata"]["labels"]["app.kubernetes.io/instance"] = pod["metadata"]["name"]
        return pod

    def execute(self, context: Any) -> list[Any]:
        targets = self.targets(context)
        results = []
        for target in targets:
            self.log.info("evaluating %s version %s (from %s)", target["model_name"],
                          target["model_version"], target["source"])
            self._use(self.render_pod(context, target))
            if len(targets) == 1 and self.deferrable:
                self.execute_async(context)  # defers: trigger_reentry returns the result
            result = self._run(context, self.execute_sync)
            results.append(self._expect_result(result, f"evaluation of {target['model_name']} "
                                                       f"version {target['model_version']}"))
        return results

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> list[Any]:
        result = self._run(context, super().trigger_reentry, event)
        return [self._expect_result(result, "evaluation")]


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

    def describe(self, template: Any) -> str:
        shape = "PyTorchJob" if is_distributed(template) else "Pod"
        return f"{self.name} (train as a {shape} in namespace {self.settings.namespace})"
