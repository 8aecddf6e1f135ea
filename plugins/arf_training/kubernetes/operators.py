"""`PyTorchJobOperator`: runs one step as a Kubeflow PyTorchJob (Master + Workers).

The operator receives the rendered manifest as a plain dict (`body`, built by the pure renderers
in `arf_training.kubernetes.jobs`); the provider's `KubernetesHook` owns the API client; the wait
is `PyTorchJobTrigger` in the triggerer (deferrable, the default) or a poll loop on the worker.

Retries and restarts never duplicate a job: the renderer names the job deterministically from
(dag_id, run_id, task_id, try_number), so `execute` first looks the name up and *reattaches* to a
job that already exists (a worker or scheduler restart re-runs `execute` for the same try), and a
409 AlreadyExists on create (a race with such a restart) is handled the same way. Not to one that
an earlier DagRun of the same run id created (deleted in the UI, then triggered again): `execute`
annotates the job with its DagRun's start, and a job that names another start is deleted and
created anew (`arf_training.kubernetes.ownership`).

The backend contract (`arf_training.backends.base`), Kubernetes side:

- output: the master pod's log (rank 0) is copied into the task log when the job ends;
- failure: the task fails with the job's `Failed` condition (reason, message) and the tail of the
  master's log; a master exit code of 2 (bad input) fails it without retries;
- kill: `on_kill` (worker) and `PyTorchJobTrigger.on_kill` (deferred) delete the job with
  Foreground propagation, which stops every pod of the step;
- result: the step's result JSON is written by rank 0 into the run's shared workspace (RWX
  volume, `ARF_RESULT_PATH`), where the register step reads it. The Airflow worker does not
  mount that volume, so this operator returns the job's status summary (the trigger event) and
  the result's path as its XCom value.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from arf_training.errors import BAD_INPUT_EXIT, ArfError, StepFailed
from arf_training.kubernetes import job_logs, ownership

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

DeletePolicy = Literal["always", "on_success", "never"]
DELETE_POLICIES: tuple[str, ...] = ("always", "on_success", "never")


class InvalidJobBody(ArfError, ValueError):
    """The PyTorchJob manifest or an operator argument cannot be used as given."""


class PyTorchJobFailed(StepFailed, AirflowException):
    """The PyTorchJob ended `Failed`, or vanished before it finished.

    Both an `ArfError` (the project's root, via `StepFailed`) and an `AirflowException`.
    """


class PyTorchJobOperator(BaseOperator):
    """Creates (or reattaches to) a PyTorchJob and waits for it to finish.

    :param body: the PyTorchJob manifest (`kubeflow.org/v1`), templated. Its `metadata.name` must
        be set and deterministic per (dag_id, run_id, task_id, try_number): it is what makes a
        re-run of `execute` reattach instead of starting a second job.
    :param namespace: where the job runs; default: the manifest's `metadata.namespace`, then the
        connection's namespace, then "default".
    :param kubernetes_conn_id: the Kubernetes connection (the provider's connection type).
    :param poll_interval: seconds between two reads of the job's status.
    :param deferrable: wait in the triggerer (frees the worker slot) instead of on the worker.
    :param fetch_logs: copy the master pod's log into the task log when the job ends.
    :param delete_on_finish: "always" (default: logs are already in the task log), "on_success"
        (keep a failed job and its pods for `kubectl` debugging) or "never" (leave clean-up to
        the manifest's `runPolicy.ttlSecondsAfterFinished`).
    :param cluster_context: kubeconfig context, overriding the connection's.
    :param config_file: kubeconfig path, overriding the connection's.
    :param in_cluster: use the in-cluster service account, overriding the connection.
    """

    template_fields = ("body", "namespace")
    template_fields_renderers: ClassVar[dict[str, str]] = {"body": "json"}
    ui_color = "#e5eefc"

    def __init__(self, *, body: dict[str, Any], namespace: str | None = None,
                 kubernetes_conn_id: str | None = "kubernetes_default",
                 poll_interval: float = 30.0, deferrable: bool = True, fetch_logs: bool = True,
                 delete_on_finish: DeletePolicy = "always", cluster_context: str | None = None,
                 config_file: str | None = None, in_cluster: bool | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        if delete_on_finish not in DELETE_POLICIES:
            raise InvalidJobBody(f"delete_on_finish={delete_on_finish!r} is not a policy; use "
                                 f"one of {', '.join(DELETE_POLICIES)}")
        if not isinstance(body, dict):
            raise InvalidJobBody(f"body must be the PyTorchJob manifest as a dict, got "
                                 f"{type(body).__name__}; render it with "
                                 f"arf_training.kubernetes.jobs")
        self.body = body
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.poll_interval = float(poll_interval)
        self.deferrable = deferrable
        self.fetch_logs = fetch_logs
        self.delete_on_finish = delete_on_finish
        self.cluster_context = cluster_context
        self.config_file = config_file
        self.in_cluster = in_cluster

    # -- plumbing ----------------------------------------------------------------------------

    @cached_property
    def hook(self) -> KubernetesHook:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id, in_cluster=self.in_cluster,
                              config_file=self.config_file, cluster_context=self.cluster_context)

    def job_ref(self) -> tuple[str, str]:
        """(name, namespace) of this try's job, from the (rendered) manifest."""
        metadata = self.body.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            raise InvalidJobBody("the PyTorchJob manifest has no metadata.name; the renderer "
                                 "must name the job from (dag_id, run_id, task_id, try_number) "
                                 "so that a restarted task reattaches instead of duplicating it")
        namespace = (self.namespace or metadata.get("namespace") or self.hook.get_namespace()
                     or "default")
        return str(name), str(namespace)

    def _custom_object_args(self, namespace: str) -> dict[str, str]:
        from arf_training.kubernetes.triggers import GROUP, PLURAL, VERSION

        return {"group": GROUP, "version": VERSION, "plural": PLURAL, "namespace": namespace}

    def _read_job(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The job, or None when it does not exist."""
        from kubernetes.client import ApiException

        try:
            return self.hook.get_custom_object(name=name, **self._custom_object_args(namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _delete_job(self, name: str, namespace: str, propagation: str) -> bool:
        """Delete the job and (through the garbage collector) its pods. False if already gone."""
        from kubernetes.client import ApiException

        try:
            self.hook.delete_custom_object(name=name, propagation_policy=propagation,
                                           **self._custom_object_args(namespace))
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        self.log.info("deleted PyTorchJob %s/%s (%s)", namespace, name, propagation)
        return True

    # -- execute -----------------------------------------------------------------------------

    def create_or_reattach(self, name: str, namespace: str) -> dict[str, Any]:
        """Create this try's job, or return the one a previous run of `execute` created."""
        from kubernetes.client import ApiException

        job = self._read_job(name, namespace)
        if job is not None:
            self._check_owned(job, name, namespace)
            if not self._replaced_stale(job, name, namespace):
                self.log.info("PyTorchJob %s/%s already exists: reattaching (no new job)",
                              namespace, name)
                return job
        body = dict(self.body)
        body["metadata"] = {**(self.body.get("metadata") or {}), "namespace": namespace}
        try:
            job = self.hook.create_custom_object(body=body, **self._custom_object_args(namespace))
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Created between our read and our create (a concurrent run of this same try).
            self.log.info("PyTorchJob %s/%s was created concurrently (409): reattaching",
                          namespace, name)
            job = self._read_job(name, namespace)
            if job is None:
                raise PyTorchJobFailed(f"PyTorchJob {namespace}/{name} was reported as existing "
                                       f"(409) but could not be read back") from exc
            self._check_owned(job, name, namespace)
            if ownership.stale(job.get("metadata") or {}, body["metadata"]):
                raise PyTorchJobFailed(f"PyTorchJob {namespace}/{name} of an earlier DAG run "
                                       f"with this run id appeared (409) between this try's "
                                       f"read and create: not reattaching to it") from exc
            return job
        self.log.info("created PyTorchJob %s/%s", namespace, name)
        return job

    def _replaced_stale(self, job: dict[str, Any], name: str, namespace: str) -> bool:
        """Delete `job` when an earlier DagRun of this run id created it (`ownership.stale`), and
        wait until its name is free. False: it is this run's, or carries no run start."""
        theirs = ownership.stale(job.get("metadata") or {}, self.body.get("metadata") or {})
        if theirs is None:
            return False
        # A run id names one DagRun at a time, so that run was deleted: no task waits for its job.
        self.log.warning("PyTorchJob %s/%s was created by an earlier DAG run with this run id "
                         "(started %s), which no longer exists: deleting it and creating this "
                         "run's job", namespace, name, theirs)
        self._delete_job(name, namespace, "Foreground")
        replicas = ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values()
        timeout = max((ownership.gone_timeout_s(((r.get("template") or {}).get("spec") or {}).get(
            "terminationGracePeriodSeconds")) for r in replicas),
            default=ownership.gone_timeout_s(None))
        if not ownership.wait_until_gone(lambda: self._read_job(name, namespace) is not None,
                                        timeout):
            raise PyTorchJobFailed(
                f"PyTorchJob {namespace}/{name} of an earlier DAG run with this run id (started "
                f"{theirs}) is still there {timeout:g} s after its deletion: a finalizer may "
                f"hold it (kubectl get pytorchjob -n {namespace} {name} -o yaml). A retry "
                f"creates its own job under a new name")
        return True

    def _check_owned(self, job: dict[str, Any], name: str, namespace: str) -> None:
        """Refuse a job of the same name that another run created: the manifest's labels (the
        renderer's carry the run id and try number) must all be on it. Extra labels are fine
        (admission webhooks add some)."""
        labels = (job.get("metadata") or {}).get("labels") or {}
        for key, value in sorted(((self.body.get("metadata") or {}).get("labels") or {}).items()):
            if labels.get(key) != value:
                raise PyTorchJobFailed(
                    f"PyTorchJob {namespace}/{name} already exists but is not this task try's: "
                    f"its label {key}={labels.get(key)!r}, this try's is {value!r}. Not "
                    f"reattaching to another run's job; delete it (kubectl delete pytorchjob -n "
                    f"{namespace} {name}) or name each job from (dag_id, run_id, task_id, "
                    f"try_number)")

    def execute(self, context: Any) -> dict[str, Any]:
        from arf_training.kubernetes.triggers import (
            PyTorchJobTrigger,
            conditions_of,
            job_event,
            job_outcome,
        )

        name, namespace = self.job_ref()
        self.body = ownership.stamped(self.body, context)
        job = self.create_or_reattach(name, namespace)
        outcome = job_outcome(job)
        if outcome.terminal:  # reattached to a job that finished while nobody watched
            return self.execute_complete(context, job_event(
                name=name, namespace=namespace, status=outcome.status, reason=outcome.reason,
                message=outcome.message, conditions=conditions_of(job)))
        if not self.deferrable:
            return self.execute_complete(context, self.wait(name, namespace))
        # Frees the worker slot; Airflow calls execute_complete with the trigger's one event.
        self.defer(trigger=PyTorchJobTrigger(
            name=name, namespace=namespace, kubernetes_conn_id=self.kubernetes_conn_id,
            poll_interval=self.poll_interval, cluster_context=self.cluster_context,
            config_file=self.config_file, in_cluster=self.in_cluster),
            method_name="execute_complete", timeout=self._time_left(context))

    def _time_left(self, context: Any) -> timedelta | None:
        """What is left of `execution_timeout` for the trigger: Airflow does not apply it to a
        deferred task by itself, and a job that never starts would be waited for forever."""
        if self.execution_timeout is None:
            return None
        ti = context.get("ti") if isinstance(context, Mapping) else None
        started = getattr(ti, "start_date", None)
        if not isinstance(started, datetime):
            return self.execution_timeout
        spent = datetime.now(timezone.utc) - started
        return max(self.execution_timeout - spent, timedelta(seconds=1))

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None,
                         context: Any) -> Any:
        from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR

        if next_method == TRIGGER_FAIL_REPR:
            # The trigger timed out (execution_timeout) or crashed: the task fails, and its job
            # must not keep training beside the retry's (a new name, the same checkpoints).
            name, namespace = self.job_ref()
            self.log.warning("the wait for PyTorchJob %s/%s failed: %s", namespace, name,
                             self._stop_unknown(name, namespace))
        return super().resume_execution(next_method, next_kwargs, context)

    def wait(self, name: str, namespace: str) -> dict[str, Any]:
        """The synchronous wait (deferrable=False): the trigger's loop, on the worker."""
        from arf_training.kubernetes.triggers import (
            api_error_text,
            conditions_of,
            job_event,
            job_outcome,
        )

        last_status = None
        while True:
            try:
                job = self._read_job(name, namespace)  # the hook retries transient API errors
            except Exception as exc:  # retries used up, or an answer a retry cannot change
                return job_event(name=name, namespace=namespace, status="error",
                                 reason=type(exc).__name__,
                                 message=api_error_text(exc, f"{namespace}/{name}", "worker"))
            if job is None:
                return job_event(name=name, namespace=namespace, status="error",
                                 reason="NotFound",
                                 message=f"PyTorchJob {namespace}/{name} no longer exists: it "
                                         f"was deleted before it finished")
            outcome = job_outcome(job)
            if outcome.status != last_status:
                self.log.info("PyTorchJob %s/%s: %s", namespace, name, outcome.status)
                last_status = outcome.status
            if outcome.terminal:
                return job_event(name=name, namespace=namespace, status=outcome.status,
                                 reason=outcome.reason, message=outcome.message,
                                 conditions=conditions_of(job))
            time.sleep(self.poll_interval)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Resume after the wait: copy the master's log, clean up, succeed or fail."""
        from arf_training.runtime import fail_fast_on_bad_input

        name, namespace = event["name"], event["namespace"]
        status = event.get("status")
        tail: list[str] = []
        exit_code = None
        if status != "error":
            tail, exit_code = self.master_logs(name, namespace)
        succeeded = status == "success"
        stopped = ""
        if status == "error" and event.get("reason") != "NotFound":
            # The wait gave up (API errors) while the job may still be training: the delete
            # policies are about finished jobs; this one must not run beside the retry's.
            stopped = "; " + self._stop_unknown(name, namespace)
        elif self.delete_on_finish == "always" or (succeeded and self.delete_on_finish ==
                                                   "on_success"):
            self._delete_job(name, namespace, "Background")
        if succeeded:
            self.log.info("PyTorchJob %s/%s succeeded", namespace, name)
            return {k: event.get(k) for k in
                    ("status", "name", "namespace", "reason", "message", "conditions")}
        what = f"{event.get('reason') or 'no reason given'}: {event.get('message') or ''}"
        text = f"PyTorchJob {namespace}/{name} {status or 'ended'} ({what.rstrip(': ')}){stopped}"
        if exit_code is not None:
            text += f"; master exit code {exit_code}"
        if tail:
            text += ". Last lines of the master's output:\n" + "\n".join(tail)
        with fail_fast_on_bad_input():  # exit code 2 = bad input: no retries
            raise PyTorchJobFailed(text, retryable=exit_code != BAD_INPUT_EXIT)

    def _stop_unknown(self, name: str, namespace: str) -> str:
        """Delete a job whose outcome is unknown; says what happened, for the failure text."""
        try:
            self._delete_job(name, namespace, "Foreground")
        except Exception as exc:
            return (f"could not stop it either ({exc}): delete it by hand (kubectl delete "
                    f"pytorchjob -n {namespace} {name}) before a retry runs beside it")
        return "stopped it, so that a retry does not train beside it"

    # -- logs --------------------------------------------------------------------------------

    def master_logs(self, name: str, namespace: str) -> tuple[list[str], int | None]:
        """Copy the master pod's log into the task log (`job_logs.master_logs`)."""
        return job_logs.master_logs(self.hook, self.log, name, namespace,
                                    fetch_logs=self.fetch_logs)

    # -- kill --------------------------------------------------------------------------------

    def on_kill(self) -> None:
        """The task was killed on the worker: delete the job (Foreground, so its pods go
        first). Idempotent: a job already gone is fine."""
        try:
            name, namespace = self.job_ref()
        except InvalidJobBody:
            return
        self._delete_job(name, namespace, "Foreground")

