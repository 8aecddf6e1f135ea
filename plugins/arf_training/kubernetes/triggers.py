"""The deferrable wait for a Kubeflow PyTorchJob, and how its status is read.

`job_outcome` interprets a PyTorchJob's `status.conditions` (Kubeflow Training Operator v1 API).
It is pure and shared by `PyTorchJobTrigger` (the deferrable path, in the triggerer) and by
`PyTorchJobOperator`'s synchronous path, so both decide "finished?" the same way.

The trigger polls the job through the Kubernetes provider's `AsyncKubernetesHook` (its
`kubernetes_asyncio` client) and yields exactly one event, built by `job_event`:
`{status: success|failed|error, name, namespace, reason, message, conditions}`.

Nothing heavy is imported at module level: the provider and `kubernetes_asyncio` are imported
when a trigger runs, not when a DAG file is parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

# Kubeflow Training Operator v1 (release-1.9 line): kubeflow.org/v1 PyTorchJob.
GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
# Condition types of training-operator v1 (`JobConditionType`): Created, Running, Restarting,
# Succeeded, Suspended, Failed. Only the last two of these mean the job will not change again.
TERMINAL_CONDITIONS = {"Succeeded": "success", "Failed": "failed"}
PENDING = "Pending"  # no condition is True yet (the operator has not reconciled the job)
_CONDITION_KEYS = ("type", "status", "reason", "message", "lastTransitionTime", "lastUpdateTime")
# Worth another read: the server was busy or the request timed out (the provider's hooks retry
# the same codes, `kubernetes_helper_functions.TRANSIENT_STATUS_CODES`). Any other status (401,
# 403: credentials or RBAC; 400, 422) answers the same way every time.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class JobOutcome(NamedTuple):
    """What a PyTorchJob's conditions say.

    `terminal` is True only for a `Succeeded` or `Failed` condition whose status is "True";
    `status` is then "success" or "failed". Otherwise `status` is the type of the newest True
    condition (`Created`, `Running`, `Restarting`, `Suspended`) or "Pending" when none is True.
    `reason` and `message` are those of that condition ("" when absent).
    """

    terminal: bool
    status: str
    reason: str
    message: str


def conditions_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's `status.conditions`, reduced to JSON-safe fields (they travel in an event)."""
    conditions = ((job or {}).get("status") or {}).get("conditions") or []
    return [{k: c[k] for k in _CONDITION_KEYS if c.get(k) is not None}
            for c in conditions if isinstance(c, dict)]


def job_outcome(job: dict[str, Any]) -> JobOutcome:
    """Interpret a PyTorchJob (the dict the custom-objects API returns). Pure."""
    active = [c for c in conditions_of(job) if str(c.get("status")) == "True"]
    # The controller updates conditions in place, so list order is not time order: sort by the
    # transition time (RFC 3339 strings sort chronologically); the sort is stable for ties.
    active.sort(key=lambda c: c.get("lastTransitionTime") or "")
    for cond in reversed(active):
        if cond.get("type") in TERMINAL_CONDITIONS:
            return JobOutcome(True, TERMINAL_CONDITIONS[cond["type"]], cond.get("reason", ""),
                              cond.get("message", ""))
    if active:
        newest = active[-1]
        return JobOutcome(False, str(newest.get("type")), newest.get("reason", ""),
                          newest.get("message", ""))
    return JobOutcome(False, PENDING, "", "")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed API call may succeed when repeated: an HTTP status of
    `TRANSIENT_STATUSES`, or no HTTP answer at all (connection reset, timeout)."""
    status = getattr(exc, "status", None)
    return not isinstance(status, int) or status in TRANSIENT_STATUSES


def api_error_text(exc: BaseException, where: str, who: str) -> str:
    """What a failed read of PyTorchJob `where` means, and how to fix it; `who` is the Airflow
    component that read it (its service account needs the RBAC rule)."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    code = f"{status} {reason}" if status else reason
    if status in (401, 403):
        return (f"the {who} may not read PyTorchJob {where} ({code}): check the Kubernetes "
                f"connection's credentials and grant its service account get, create and "
                f"delete on {PLURAL}.{GROUP} in namespace {where.split('/', 1)[0]}")
    return f"could not read PyTorchJob {where} ({code}): {str(exc).strip()}"


def job_event(*, name: str, namespace: str, status: str, reason: str = "", message: str = "",
              conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The one event payload both wait paths produce (status: success, failed or error)."""
    return {"status": status, "name": name, "namespace": namespace, "reason": reason or "",
            "message": message or "", "conditions": list(conditions or [])}


class PyTorchJobTrigger(BaseTrigger):
    """Waits in the triggerer until a PyTorchJob has succeeded or failed.

    :param name: the PyTorchJob's name.
    :param namespace: its namespace.
    :param kubernetes_conn_id: the Kubernetes connection (the provider's connection type).
    :param poll_interval: seconds between two reads of the job's status.
    :param cluster_context: kubeconfig context, overriding the connection's.
    :param config_file: kubeconfig path, overriding the connection's.
    :param in_cluster: use the in-cluster service account, overriding the connection.
    :param max_api_errors: consecutive failed reads (API down, timeouts) tolerated before the
        trigger gives up with an error event. A 404 ends the wait at once (the job is gone), and
        so does any other status outside `TRANSIENT_STATUSES` (401/403: credentials, RBAC).
    :param delete_on_kill: delete the job when a user kills the deferred task (mark failed,
        clear, mark success); see `on_kill`.
    """

    def __init__(self, *, name: str, namespace: str,
                 kubernetes_conn_id: str | None = "kubernetes_default",
                 poll_interval: float = 30.0, cluster_context: str | None = None,
                 config_file: str | None = None, in_cluster: bool | None = None,
                 max_api_errors: int = 10, delete_on_kill: bool = True):
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.poll_interval = float(poll_interval)
        self.cluster_context = cluster_context
        self.config_file = config_file
        self.in_cluster = in_cluster
        self.max_api_errors = int(max_api_errors)
        self.delete_on_kill = bool(delete_on_kill)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "poll_interval": self.poll_interval,
                "cluster_context": self.cluster_context,
                "config_file": self.config_file,
                "in_cluster": self.in_cluster,
                "max_api_errors": self.max_api_errors,
                "delete_on_kill": self.delete_on_kill,
            },
        )

    @cached_property
    def hook(self) -> AsyncKubernetesHook:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        return AsyncKubernetesHook(conn_id=self.kubernetes_conn_id, in_cluster=self.in_cluster,
                                   config_file=self.config_file,
                                   cluster_context=self.cluster_context)

    async def get_job(self) -> dict[str, Any]:
        """Read the job. The async hook has no custom-object helpers, so this uses its client."""
        from kubernetes_asyncio import client

        async with self.hook.get_conn() as api_client:
            return await client.CustomObjectsApi(api_client).get_namespaced_custom_object(
                group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL,
                name=self.name)

    def _event(self, status: str, reason: str, message: str,
               conditions: list[dict[str, Any]] | None = None) -> TriggerEvent:
        return TriggerEvent(job_event(name=self.name, namespace=self.namespace, status=status,
                                      reason=reason, message=message, conditions=conditions))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from kubernetes_asyncio.client import ApiException

        where = f"{self.namespace}/{self.name}"
        last_status: str | None = None
        errors = 0
        while True:
            try:
                job = await self.get_job()
            except ApiException as exc:
                if exc.status == 404:
                    yield self._event("error", "NotFound",
                                      f"PyTorchJob {where} no longer exists: it was deleted "
                                      f"before it finished (by hand, or by a TTL policy)")
                    return
                if not is_transient(exc):
                    yield self._event("error", str(exc.reason or exc.status),
                                      api_error_text(exc, where, "triggerer"))
                    return
                errors += 1
                error: Exception = exc
            except Exception as exc:  # connection resets, timeouts: retried below
                errors += 1
                error = exc
            else:
                errors = 0
                outcome = job_outcome(job)
                if outcome.status != last_status:  # log each transition once
                    self.log.info("PyTorchJob %s: %s%s", where, outcome.status,
                                  f" ({outcome.reason}: {outcome.message})"
                                  if outcome.reason or outcome.message else "")
                    last_status = outcome.status
                if outcome.terminal:
                    yield self._event(outcome.status, outcome.reason, outcome.message,
                                      conditions_of(job))
                    return
                await asyncio.sleep(self.poll_interval)
                continue
            if errors >= self.max_api_errors:
                yield self._event("error", type(error).__name__,
                                  f"could not read PyTorchJob {where} {errors} times in a row; "
                                  f"last error: {error}")
                return
            self.log.warning("reading PyTorchJob %s failed (%d/%d): %s", where, errors,
                             self.max_api_errors, error)
            await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """A user killed the deferred task: delete the job and its pods (Foreground), so that
        no training keeps running unowned. Already gone (404) is fine."""
        if not self.delete_on_kill:
            return
        from kubernetes_asyncio import client

        async with self.hook.get_conn() as api_client:
            try:
                await client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
                    group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL,
                    name=self.name, propagation_policy="Foreground")
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
        self.log.info("deleted PyTorchJob %s/%s", self.namespace, self.name)
