"""The provider's KubernetesPodOperator, specialised to run a step's rendered Pod.

Imported only when a task runs (by `StepPodOperator` and `EvaluatePodOperator` in
`arf_training.backends.kubernetes`), never at DAG parse time: the provider's pod operator pulls
in both Kubernetes clients, about a second per parse, which a DAG file must not pay for every
template. The operators in the DAG are light; each creates one of these when it executes and
hands it the run (`execute`, `trigger_reentry` after a deferral, `on_kill`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import ApiException

from arf_training.backends.evaluate_each import evaluate_each
from arf_training.backends.kubernetes import (
    ON_FINISH_ACTION,
    XCOM_RESULT_PATH,
    XCOM_SIDECAR_SECURITY_CONTEXT,
    pod_step_spec,
    runtime_settings,
    trial_identity,
    with_xcom_result,
    writes_result_to_xcom,
)
from arf_training.custom_launch import PREEMPTED_EXIT
from arf_training.errors import BAD_INPUT_EXIT, SKIP_EXIT, StepFailed
from arf_training.kubernetes import ownership, restarts
from arf_training.kubernetes.ownership import resource_name
from arf_training.kubernetes.pod import CONTAINER_NAME, container_exit_code, render_pod
from arf_training.runtime import (
    emit_model_event,
    fail_fast_on_bad_input,
    models_to_evaluate,
    run_identity,
)
from arf_training.stepspec import RunIdentity

if TYPE_CHECKING:
    from arf_training.templates import LoadedTemplate


class ArfPodOperator(KubernetesPodOperator):
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

    def get_or_create_pod(self, pod_request_obj: Any, context: Any) -> Any:
        """The provider's reattach-or-create, for this DagRun's pods only: the request is
        annotated with the DagRun's start, and a pod of an earlier DagRun of this run id (deleted
        in the UI, then triggered again) is deleted first (`arf_training.kubernetes.ownership`)."""
        meta = pod_request_obj.metadata
        started = ownership.run_start(context)
        if started is not None:
            meta.annotations = {**(meta.annotations or {}), ownership.RUN_START_ANNOTATION: started}
        if self.reattach_on_restart:
            self._delete_pods_of_earlier_runs(meta, context)
        return super().get_or_create_pod(pod_request_obj, context)

    def _delete_pods_of_earlier_runs(self, meta: Any, context: Any) -> None:
        """Delete what the provider would reattach to (this task's unchecked pods, any try) and
        what holds this pod's name, where an earlier DagRun of the run id created it, and wait
        until they are gone (the provider's lookup still finds a pod while it terminates). That
        run's other pods, finished and checked, are left alone."""
        selector = self._build_find_pod_label_selector(context, exclude_checked=False)
        for pod in self.client.list_namespaced_pod(meta.namespace,
                                                   label_selector=selector).items:
            theirs = ownership.stale(pod.metadata, meta)
            checked = (pod.metadata.labels or {}).get(self.POD_CHECKED_KEY) == "True"
            if theirs is None or (checked and pod.metadata.name != meta.name):
                continue
            # A run id names one DagRun at a time, so that run was deleted: no task waits for it.
            self.log.warning("pod %s/%s was created by an earlier DAG run with this run id "
                             "(started %s), which no longer exists: deleting it",
                             meta.namespace, pod.metadata.name, theirs)
            self.pod_manager.delete_pod(pod)
            timeout = ownership.gone_timeout_s(pod.spec.termination_grace_period_seconds)
            if not ownership.wait_until_gone(lambda: self._pod_exists(pod.metadata), timeout):
                raise StepFailed(f"pod {meta.namespace}/{pod.metadata.name} of an earlier DAG "
                                 f"run with this run id is still there {timeout:g} s after its "
                                 f"deletion; a retry creates its own pod under a new name")

    def _pod_exists(self, meta: Any) -> bool:
        try:
            self.client.read_namespaced_pod(meta.name, meta.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _use(self, pod: dict[str, Any]) -> None:
        self.pod_template_dict = pod
        self.pod_request_obj = None
        self.pod = None
        self.remote_pod = None
        # The provider's on_kill deletes with this grace: let the step checkpoint on SIGTERM.
        self.termination_grace_period = pod["spec"].get("terminationGracePeriodSeconds")

    # -- outcome -----------------------------------------------------------------------------

    def _finished_pod(self) -> Any:
        """The pod the provider last read (sync: remote_pod; after a deferral: pod)."""
        return getattr(self, "remote_pod", None) or getattr(self, "pod", None)

    def _fail_fast_on_bad_input(self, exc: Exception) -> None:
        """Exit code 2 (bad input) fails the task without retries, as with the local backend."""
        if container_exit_code(self._finished_pod()) == BAD_INPUT_EXIT:
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


class StepPod(ArfPodOperator):
    """Runs one step (prepare, register, or a 1-process train) as a Pod (for `StepPodOperator`).

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

    def render_pod(self, context: Any, start: int = 0) -> dict[str, Any]:
        """The v1 Pod of this try's `start` (0, or a resume after exit 75: `restarts`)."""
        settings = runtime_settings(self.namespace)
        with fail_fast_on_bad_input():
            spec = pod_step_spec(self.loaded, self.step, context, settings, trial=self.trial)
        if writes_result_to_xcom(self.loaded, self.step):
            spec = with_xcom_result(spec)
        identity = trial_identity(context, self.trial)
        pod = render_pod(spec, identity, settings)
        return restarts.restarted(pod, identity, start, elapsed_s(context)) if start else pod

    def execute(self, context: Any) -> Any:
        self._use(self.render_pod(context))
        # Returns here only when not deferrable; otherwise trigger_reentry finishes the task.
        return self._finish(context, self._resuming(context, super().execute))

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        return self._finish(context, self._resuming(context, super().trigger_reentry, event))

    def _resuming(self, context: Any, run: Any, *args: Any) -> Any:
        """`run`, then a new pod for every start that exited 75 ("preempted, resume me"), in
        this task try: no retry is spent (see `arf_training.kubernetes.restarts`)."""
        from airflow.sdk.exceptions import AirflowException

        while True:
            try:
                return self._run(context, run, *args)
            except AirflowException:
                start = None if self._killed else restarts.next_start(self._finished_pod())
                if start is None:
                    raise
            self.log.warning("step %r was preempted (exit code %d): resuming it in a new pod, "
                             "in this task try (start %d of at most %d)", self.step,
                             PREEMPTED_EXIT, start + 1, restarts.MAX_RESTARTS + 1)
            self._use(self.render_pod(context, start))
            # Not `execute` again: it is guarded as the task runner's entry point.
            run, args = (self.execute_async if self.deferrable else self.execute_sync), ()

    def _finish(self, context: Any, result: Any) -> Any:
        if not self.do_xcom_push:
            return None  # a template's own training command: see the module docstring
        result = self._expect_result(result, f"step {self.step!r}")
        if self.step == "register":
            emit_model_event(context, self.loaded, result)
        return result


def elapsed_s(context: Any) -> float | None:
    """Seconds since this task try started (kept across deferrals), if the context says."""
    started = getattr(context["ti"], "start_date", None)
    return (datetime.now(timezone.utc) - started).total_seconds() if started else None


class EvaluatePod(ArfPodOperator):
    """Evaluates each model version named by the triggering Asset events (or params), one Pod
    per version, and returns the list of their results (as `LocalEvaluateOperator` does); a
    failed version does not stop the others (`arf_training.backends.evaluate_each`).

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

        def evaluate(target: dict[str, str]) -> Any:
            self._use(self.render_pod(context, target))
            if len(targets) == 1 and self.deferrable:
                self.execute_async(context)  # defers: trigger_reentry returns the result
            result = self._run(context, self.execute_sync)
            return self._expect_result(result, f"evaluation of {target['model_name']} "
                                               f"version {target['model_version']}")

        # One failed version must not lose the others' results (`evaluate_each`).
        return evaluate_each(context, targets, evaluate, self.log, lambda: self._killed)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> list[Any]:
        result = self._run(context, super().trigger_reentry, event)
        return [self._expect_result(result, "evaluation")]
