"""A small in-memory Kubernetes API for unit tests (no cluster, no kubeconfig).

`FakeCluster` stores custom objects, pods, pod logs and Services and answers the calls the arf
Kubernetes code makes: create/get/delete of custom objects, pod list/log reads, the pod calls the
provider's KubernetesPodOperator and its trigger make (create, read, patch labels, delete, and
the `exec` into the xcom sidecar that reads the result), and Service create/list/delete.
`install()` plugs it in at the client boundary only: the provider's real `KubernetesHook` /
`AsyncKubernetesHook` methods run, but their `kubernetes` / `kubernetes_asyncio` API classes (and
the client's websocket `stream` for `exec`) are replaced by the stand-ins of `fake_k8s_clients`
and `get_conn` returns no real connection.

The test plays the kubelet with `add_pod`, `start_pod`, `stall_pod`, `finish_pod` and
`finish_with_result`, or with a `kubelet` callback called before each read of a pod.
`deletion_reads` makes a deletion take time, as a Foreground deletion or a pod's grace period do.

A scripted "controller" moves a job through its conditions: each read of the job applies the next
scripted transition, as the Kubeflow training operator would between two polls.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import kubernetes.client
import kubernetes_asyncio.client
from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook, KubernetesHook
from airflow.providers.cncf.kubernetes.utils import pod_manager
from fake_k8s_clients import (
    API_CLIENT,
    FakeAsyncCoreV1Api,
    FakeAsyncCustomObjectsApi,
    FakeCoreV1Api,
    FakeCustomObjectsApi,
    FakeExecStream,
)
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodList,
    V1PodStatus,
    V1Service,
    V1ServiceList,
)

_T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
# How the training operator flips the other conditions when one becomes True.
_TURNS_OFF = {
    "Running": {"Restarting", "Suspended"},
    "Restarting": {"Running"},
    "Suspended": {"Running"},
    "Succeeded": {"Running"},
    "Failed": {"Running"},
}

_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error",
            503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass
class FakeCluster:
    """Objects keyed by (group, version, plural, namespace, name); every API call recorded."""

    objects: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], V1Pod] = field(default_factory=dict)
    logs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    created_pods: list[dict[str, Any]] = field(default_factory=list)  # the manifests as sent
    # The kubelet, scripted: each created pod at once ends with the next of these exit codes.
    pod_exits: collections.deque = field(default_factory=collections.deque)
    scripts: dict[str, collections.deque] = field(default_factory=dict)
    # Simulate a concurrent creator: the next create stores the object, then answers 409.
    conflict_on_next_create: bool = False
    services: dict[tuple[str, str], V1Service] = field(default_factory=dict)
    # What the xcom sidecar's `cat /airflow/xcom/return.json` prints, per pod.
    xcom: dict[tuple[str, str], str] = field(default_factory=dict)
    # The kubelet, played by the test: called with (cluster, namespace, name) before each read
    # of a pod, so that pods can move on while an operator waits for them.
    kubelet: Callable[[FakeCluster, str, str], None] | None = None
    # Scripted API failures of the custom-objects calls: verb -> HTTP statuses, one raised per
    # call of that verb (an overloaded API server, an RBAC rule that forbids the verb).
    api_errors: dict[str, collections.deque] = field(default_factory=dict)
    # A deleted job or pod stays this many reads longer, with a deletionTimestamp (a Foreground
    # deletion waits for the job's pods, a pod for its grace period); creating its name answers
    # 409 AlreadyExists meanwhile. 0: gone at once.
    deletion_reads: int = 0
    _terminating: dict[tuple[str, ...], int] = field(default_factory=dict)
    _clock: int = 0

    # -- test set-up ---------------------------------------------------------------------------

    def script(self, name: str, *transitions: str | tuple[str, str, str]) -> None:
        """Transitions applied one per read of job `name`: "Running" or (type, reason, msg)."""
        self.scripts[name] = collections.deque(
            t if isinstance(t, tuple) else (t, f"PyTorchJob{t}", f"job is {t.lower()}")
            for t in transitions)

    def fail(self, verb: str, *statuses: int) -> None:
        """The next calls of `verb` ("create", "get", "delete") answer these statuses."""
        self.api_errors.setdefault(verb, collections.deque()).extend(statuses)

    def _scripted_error(self, exc_type: type, verb: str) -> None:
        pending = self.api_errors.get(verb)
        if pending:
            status = pending.popleft()
            raise exc_type(status=status, reason=_REASONS.get(status, "Error"))

    def transition(self, key: tuple[str, ...], ctype: str, reason: str, message: str) -> None:
        self._clock += 1
        stamp = (_T0 + timedelta(seconds=self._clock)).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = self.objects[key].setdefault("status", {}).setdefault("conditions", [])
        for cond in conditions:
            if cond["type"] in _TURNS_OFF.get(ctype, ()) and cond["status"] == "True":
                cond.update(status="False", lastTransitionTime=stamp)
        for cond in conditions:  # updated in place, as the controller does
            if cond["type"] == ctype:
                cond.update(status="True", reason=reason, message=message,
                            lastTransitionTime=stamp, lastUpdateTime=stamp)
                break
        else:
            conditions.append({"type": ctype, "status": "True", "reason": reason,
                               "message": message, "lastTransitionTime": stamp,
                               "lastUpdateTime": stamp})

    def add_pod(self, namespace: str, name: str, *, job: str, replica_type: str = "master",
                log: str | bytes = b"", exit_code: int | None = None, index: int = 0) -> None:
        """A pod as the training operator labels it, with its training container's log."""
        terminated = (V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=exit_code))
                      if exit_code is not None else V1ContainerState())
        self.pods[(namespace, name)] = V1Pod(
            metadata=V1ObjectMeta(name=name, namespace=namespace, labels={
                "training.kubeflow.org/job-name": job,
                "training.kubeflow.org/replica-type": replica_type,
                "training.kubeflow.org/replica-index": str(index),
                "training.kubeflow.org/operator-name": "pytorchjob-controller"}),
            status=V1PodStatus(container_statuses=[V1ContainerStatus(
                name="pytorch", image="arf-trainer", image_id="", ready=False, restart_count=0,
                state=terminated)]))
        self.logs[(namespace, name)] = log.encode() if isinstance(log, str) else log

    def finish_pod(self, namespace: str, name: str, exit_code: int, *, reason: str | None = None,
                   log: str = "") -> None:
        """The kubelet ran a created pod's containers to `exit_code` (status.reason: e.g.
        DeadlineExceeded when it stopped the pod at its activeDeadlineSeconds)."""
        pod = self.pods[(namespace, name)]
        state = V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=exit_code))
        pod.status = V1PodStatus(
            phase="Succeeded" if exit_code == 0 else "Failed", reason=reason,
            container_statuses=[V1ContainerStatus(name=c.name, image=c.image, image_id="",
                                                  ready=False, restart_count=0, state=state)
                                for c in pod.spec.containers])
        self.logs[(namespace, name)] = log.encode()

    def start_pod(self, namespace: str, name: str, *, restart_count: int = 0) -> None:
        """The kubelet started every container of a created pod (phase Running); restarted
        `restart_count` times, each time after exiting with code 1 (its last state)."""
        pod = self.pods[(namespace, name)]
        state = V1ContainerState(running=V1ContainerStateRunning(started_at=_T0))
        last = (V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=1))
                if restart_count else None)
        pod.status = V1PodStatus(phase="Running", container_statuses=[
            V1ContainerStatus(name=c.name, image=c.image, image_id="", ready=True,
                              restart_count=restart_count, state=state, last_state=last)
            for c in pod.spec.containers])

    def stall_pod(self, namespace: str, name: str, reason: str, message: str = "") -> None:
        """The kubelet cannot start a created pod's containers (phase Pending, each container
        waiting with `reason`, e.g. ErrImagePull)."""
        pod = self.pods[(namespace, name)]
        state = V1ContainerState(waiting=V1ContainerStateWaiting(reason=reason, message=message))
        pod.status = V1PodStatus(phase="Pending", container_statuses=[
            V1ContainerStatus(name=c.name, image=c.image, image_id="", ready=False,
                              restart_count=0, state=state)
            for c in pod.spec.containers])

    def finish_with_result(self, namespace: str, name: str, exit_code: int, result: str,
                           *, log: str = "") -> None:
        """Like `finish_pod`, but the step wrote `result` into the xcom volume, and the xcom
        sidecar keeps running (so the pod stays Running) until the operator has read it."""
        self.finish_pod(namespace, name, exit_code, log=log)
        pod = self.pods[(namespace, name)]
        pod.status.phase = "Running"
        for item in pod.status.container_statuses:
            if item.name == "airflow-xcom-sidecar":
                item.state = V1ContainerState(running=V1ContainerStateRunning(started_at=_T0))
        self.xcom[(namespace, name)] = result

    def verbs(self, verb: str) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] == verb]

    # -- API semantics -------------------------------------------------------------------------

    def create(self, exc_type: type, group: str, version: str, namespace: str, plural: str,
               body: dict[str, Any]) -> dict[str, Any]:
        name = (body.get("metadata") or {}).get("name")
        self.calls.append(("create", plural, namespace, str(name)))
        self._scripted_error(exc_type, "create")
        if not name:
            raise exc_type(status=422, reason="Unprocessable Entity: metadata.name required")
        if body.get("apiVersion") != f"{group}/{version}":
            raise exc_type(status=400, reason=f"apiVersion {body.get('apiVersion')!r} != "
                                              f"{group}/{version}")
        if body["metadata"].get("namespace", namespace) != namespace:
            raise exc_type(status=400, reason="the namespace of the object does not match")
        key = (group, version, plural, namespace, name)
        if self.conflict_on_next_create:
            self.conflict_on_next_create = False
            self._store(key, body)
            raise exc_type(status=409, reason="AlreadyExists")
        if key in self.objects:
            raise exc_type(status=409, reason="AlreadyExists")
        return copy.deepcopy(self._store(key, body))

    def _store(self, key: tuple[str, ...], body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        obj["metadata"] = {**obj.get("metadata", {}), "namespace": key[3],
                           "uid": f"uid-{len(self.objects) + 1}"}
        obj.setdefault("status", {})
        self.objects[key] = obj
        return obj

    def get(self, exc_type: type, group: str, version: str, namespace: str, plural: str,
            name: str) -> dict[str, Any]:
        self.calls.append(("get", plural, namespace, name))
        self._scripted_error(exc_type, "get")
        key = (group, version, plural, namespace, name)
        if key not in self.objects or self._deletion_done(key):
            raise exc_type(status=404, reason="Not Found")
        pending = self.scripts.get(name)
        if pending:
            self.transition(key, *pending.popleft())
        return copy.deepcopy(self.objects[key])

    def delete(self, exc_type: type, group: str, version: str, namespace: str, plural: str,
               name: str, **options: Any) -> dict[str, Any]:
        self.calls.append(("delete", plural, namespace, name,
                           str(options.get("propagation_policy"))))
        self._scripted_error(exc_type, "delete")
        key = (group, version, plural, namespace, name)
        if key not in self.objects:
            raise exc_type(status=404, reason="Not Found")
        if self._lingers(key):
            self.objects[key]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            return copy.deepcopy(self.objects[key])
        self._remove(key)
        return {"kind": "Status", "status": "Success"}

    def _lingers(self, key: tuple[str, ...]) -> bool:
        if self.deletion_reads:
            self._terminating.setdefault(key, self.deletion_reads)
        return bool(self.deletion_reads)

    def _deletion_done(self, key: tuple[str, ...]) -> bool:
        """One more read of `key` while it terminates; True once it is gone (removed)."""
        left = self._terminating.get(key)
        if left:
            self._terminating[key] = left - 1
        elif left == 0:
            del self._terminating[key]
            self._remove(key)
        return left == 0

    def _remove(self, key: tuple[str, ...]) -> None:
        if len(key) == 2:  # a pod: (namespace, name)
            del self.pods[key]
            return
        del self.objects[key]
        for pod_key, pod in list(self.pods.items()):  # the garbage collector, at once
            if pod_key[0] == key[3] and \
                    pod.metadata.labels.get("training.kubeflow.org/job-name") == key[4]:
                del self.pods[pod_key]

    def list_pods(self, namespace: str, label_selector: str = "") -> V1PodList:
        self.calls.append(("list_pods", "pods", namespace, label_selector))
        items = [copy.deepcopy(pod) for (ns, _), pod in sorted(self.pods.items())
                 if ns == namespace and _selects(label_selector, pod.metadata.labels or {})]
        return V1PodList(items=items)

    def read_log(self, exc_type: type, namespace: str, name: str, container: str | None) -> bytes:
        self.calls.append(("read_log", "pods", namespace, name, str(container)))
        if (namespace, name) not in self.pods:
            raise exc_type(status=404, reason="Not Found")
        spec = self.pods[(namespace, name)].spec
        names = {c.name for c in spec.containers} if spec else {"pytorch"}
        if container not in (None, "", *names):
            raise exc_type(status=400, reason=f"container {container} is not valid for pod")
        return self.logs.get((namespace, name), b"")

    def create_pod(self, exc_type: type, namespace: str, body: dict[str, Any]) -> V1Pod:
        """Store a pod as sent (a dict: the provider sanitizes its V1Pod first), Pending."""
        name = body["metadata"]["name"]
        self.calls.append(("create", "pods", namespace, name))
        if (namespace, name) in self.pods:
            raise exc_type(status=409, reason="AlreadyExists")
        self.created_pods.append(copy.deepcopy(body))
        pod = API_CLIENT._ApiClient__deserialize(copy.deepcopy(body), "V1Pod")
        pod.metadata.namespace = namespace
        pod.status = V1PodStatus(phase="Pending")
        self.pods[(namespace, name)] = pod
        if self.pod_exits:
            self.finish_pod(namespace, name, self.pod_exits.popleft())
        return copy.deepcopy(pod)

    def read_pod(self, exc_type: type, namespace: str, name: str) -> V1Pod:
        self.calls.append(("read", "pods", namespace, name))
        if self.kubelet is not None:
            self.kubelet(self, namespace, name)
        if (namespace, name) not in self.pods or self._deletion_done((namespace, name)):
            raise exc_type(status=404, reason="Not Found")
        return copy.deepcopy(self.pods[(namespace, name)])

    def patch_pod_labels(self, exc_type: type, namespace: str, name: str,
                         body: dict[str, Any]) -> V1Pod:
        self.calls.append(("patch", "pods", namespace, name))
        pod = self.read_pod(exc_type, namespace, name)
        labels = self.pods[(namespace, name)].metadata.labels
        labels.update((body.get("metadata") or {}).get("labels") or {})
        return pod

    def delete_pod(self, exc_type: type, namespace: str, name: str) -> None:
        self.calls.append(("delete", "pods", namespace, name))
        if (namespace, name) not in self.pods:
            raise exc_type(status=404, reason="Not Found")
        if self._lingers((namespace, name)):
            self.pods[(namespace, name)].metadata.deletion_timestamp = _T0
        else:
            del self.pods[(namespace, name)]

    def exec_output(self, namespace: str, name: str, container: str | None,
                    command: list[str]) -> str | None:
        """What `exec` into the xcom sidecar prints: the result file for the provider's read
        command; None (a shell that answers nothing) for its kill command."""
        self.calls.append(("exec", "pods", namespace, name, str(container)))
        if (namespace, name) not in self.pods:
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        if command[-1].startswith("if [ -s /airflow/xcom/return.json ]"):
            return self.xcom.get((namespace, name), "__airflow_xcom_result_empty__")
        return None

    def create_service(self, exc_type: type, namespace: str, body: dict[str, Any]) -> V1Service:
        name = body["metadata"]["name"]
        self.calls.append(("create", "services", namespace, name))
        if (namespace, name) in self.services:
            raise exc_type(status=409, reason="AlreadyExists")
        service = API_CLIENT._ApiClient__deserialize(copy.deepcopy(body), "V1Service")
        service.metadata.namespace = namespace
        self.services[(namespace, name)] = service
        return copy.deepcopy(service)

    def list_services(self, namespace: str, label_selector: str = "") -> V1ServiceList:
        self.calls.append(("list_services", "services", namespace, label_selector))
        return V1ServiceList(items=[
            copy.deepcopy(s) for (ns, _), s in sorted(self.services.items())
            if ns == namespace and _selects(label_selector, s.metadata.labels or {})])

    def delete_service(self, exc_type: type, namespace: str, name: str) -> None:
        self.calls.append(("delete", "services", namespace, name))
        if self.services.pop((namespace, name), None) is None:
            raise exc_type(status=404, reason="Not Found")


def _selects(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selector: `k=v`, `k!=v`, `k`, `!k`, comma-separated (all hold)."""
    for part in filter(None, selector.split(",")):
        if part.startswith("!"):
            if part[1:] in labels:
                return False
        elif "=" not in part:
            if part not in labels:
                return False
        elif "!=" in part:
            key, value = part.split("!=", 1)
            if labels.get(key) == value:
                return False
        else:
            key, value = part.split("=", 1)
            if labels.get(key) != value:
                return False
    return True


def install(monkeypatch: Any, cluster: FakeCluster) -> FakeCluster:
    """Route the provider hooks' API clients (sync and async) to `cluster`."""
    monkeypatch.setattr(KubernetesHook, "get_conn", lambda self: object())

    @contextlib.asynccontextmanager
    async def fake_async_conn(self):
        yield object()

    monkeypatch.setattr(AsyncKubernetesHook, "get_conn", fake_async_conn)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi",
                        lambda api_client=None: FakeCustomObjectsApi(cluster))
    monkeypatch.setattr(kubernetes.client, "CoreV1Api",
                        lambda api_client=None: FakeCoreV1Api(cluster))
    monkeypatch.setattr(kubernetes_asyncio.client, "CustomObjectsApi",
                        lambda api_client=None: FakeAsyncCustomObjectsApi(cluster))
    monkeypatch.setattr(kubernetes_asyncio.client, "CoreV1Api",
                        lambda api_client=None: FakeAsyncCoreV1Api(cluster))

    def fake_stream(api_method, name, namespace, *, container=None, command=(), **_):
        return FakeExecStream(cluster.exec_output(namespace, name, container, list(command)))

    # The provider's PodManager imports the client's `stream` under this name.
    monkeypatch.setattr(pod_manager, "kubernetes_stream", fake_stream)
    return cluster
