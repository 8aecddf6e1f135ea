"""A small in-memory Kubernetes API for unit tests (no cluster, no kubeconfig).

`FakeCluster` stores custom objects, pods, pod logs and Services and answers the calls the arf
Kubernetes code makes: create/get/delete of custom objects, pod list/log reads, the pod calls the
provider's KubernetesPodOperator and its trigger make (create, read, patch labels, delete, and
the `exec` into the xcom sidecar that reads the result), and Service create/list/delete.
`install()` plugs it in at the client boundary only: the provider's real `KubernetesHook` /
`AsyncKubernetesHook` methods run, but their `kubernetes` / `kubernetes_asyncio` API classes (and
the client's websocket `stream` for `exec`) are replaced by the fakes below and `get_conn`
returns no real connection.

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
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
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
    _clock: int = 0

    # -- test set-up ---------------------------------------------------------------------------

    def script(self, name: str, *transitions: str | tuple[str, str, str]) -> None:
        """Transitions applied one per read of job `name`: "Running" or (type, reason, msg)."""
        self.scripts[name] = collections.deque(
            t if isinstance(t, tuple) else (t, f"PyTorchJob{t}", f"job is {t.lower()}")
            for t in transitions)

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
                log: str | bytes = b"", exit_code: int | None = None) -> None:
        """A pod as the training operator labels it, with its training container's log."""
        terminated = (V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=exit_code))
                      if exit_code is not None else V1ContainerState())
        self.pods[(namespace, name)] = V1Pod(
            metadata=V1ObjectMeta(name=name, namespace=namespace, labels={
                "training.kubeflow.org/job-name": job,
                "training.kubeflow.org/replica-type": replica_type,
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
        """The kubelet started every container of a created pod (phase Running)."""
        pod = self.pods[(namespace, name)]
        state = V1ContainerState(running=V1ContainerStateRunning(started_at=_T0))
        pod.status = V1PodStatus(phase="Running", container_statuses=[
            V1ContainerStatus(name=c.name, image=c.image, image_id="", ready=True,
                              restart_count=restart_count, state=state)
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
        key = (group, version, plural, namespace, name)
        if key not in self.objects:
            raise exc_type(status=404, reason="Not Found")
        pending = self.scripts.get(name)
        if pending:
            self.transition(key, *pending.popleft())
        return copy.deepcopy(self.objects[key])

    def delete(self, exc_type: type, group: str, version: str, namespace: str, plural: str,
               name: str, **options: Any) -> dict[str, Any]:
        self.calls.append(("delete", plural, namespace, name,
                           str(options.get("propagation_policy"))))
        key = (group, version, plural, namespace, name)
        if key not in self.objects:
            raise exc_type(status=404, reason="Not Found")
        del self.objects[key]
        for pod_key, pod in list(self.pods.items()):  # the garbage collector, at once
            if pod_key[0] == namespace and \
                    pod.metadata.labels.get("training.kubeflow.org/job-name") == name:
                del self.pods[pod_key]
        return {"kind": "Status", "status": "Success"}

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
        pod = _API._ApiClient__deserialize(copy.deepcopy(body), "V1Pod")
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
        if (namespace, name) not in self.pods:
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
        if self.pods.pop((namespace, name), None) is None:
            raise exc_type(status=404, reason="Not Found")

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
        service = _API._ApiClient__deserialize(copy.deepcopy(body), "V1Service")
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


_API = kubernetes.client.ApiClient()  # (de)serialization only: it never connects


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


class FakeLogResponse:
    """What `read_namespaced_pod_log(..., _preload_content=False)` returns (urllib3-like)."""

    def __init__(self, data: bytes, chunk: int = 7):
        self.data, self._chunk, self.released = data, chunk, False

    def stream(self, amt: int | None = 65536, decode_content: bool | None = None):
        step = min(amt or self._chunk, self._chunk)  # small chunks: lines arrive split across reads
        for i in range(0, len(self.data), step):
            yield self.data[i:i + step]

    def __iter__(self):  # the provider's pod operator reads the log line by line
        return iter(self.data.splitlines(keepends=True))

    def release_conn(self) -> None:
        self.released = True


class FakeExecStream:
    """The websocket client `kubernetes.stream.stream(..., _preload_content=False)` returns."""

    def __init__(self, output: str | None):
        self.output = output

    def run_forever(self, timeout: float | None = None) -> None:
        pass

    def is_open(self) -> bool:
        return False  # the command has ended

    def peek_stderr(self, timeout: float = 0) -> bool:
        return False

    def read_all(self) -> str | None:
        return self.output

    def close(self) -> None:
        pass


class FakeCustomObjectsApi:
    exc = kubernetes.client.ApiException

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_):
        return self.cluster.create(self.exc, group, version, namespace, plural, body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **_):
        return self.cluster.get(self.exc, group, version, namespace, plural, name)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        return self.cluster.delete(self.exc, group, version, namespace, plural, name, **kw)


class FakeCoreV1Api:
    exc = kubernetes.client.ApiException
    api_client = _API  # the provider's PodManager sanitizes a pod with it before creating it

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster

    def create_namespaced_pod(self, namespace, body, **_):
        return self.cluster.create_pod(self.exc, namespace, body)

    def read_namespaced_pod(self, name, namespace, **_):
        return self.cluster.read_pod(self.exc, namespace, name)

    def patch_namespaced_pod(self, name, namespace, body, **_):
        return self.cluster.patch_pod_labels(self.exc, namespace, name, body)

    def delete_namespaced_pod(self, name, namespace, body=None, **_):
        return self.cluster.delete_pod(self.exc, namespace, name)

    def list_namespaced_pod(self, namespace, label_selector="", **_):
        return self.cluster.list_pods(namespace, label_selector)

    def connect_get_namespaced_pod_exec(self, *_, **__):  # only called through `stream`
        raise AssertionError("exec goes through kubernetes.stream.stream")

    def create_namespaced_service(self, namespace, body, **_):
        return self.cluster.create_service(self.exc, namespace, body)

    def list_namespaced_service(self, namespace, label_selector="", **_):
        return self.cluster.list_services(namespace, label_selector)

    def delete_namespaced_service(self, name, namespace, **_):
        return self.cluster.delete_service(self.exc, namespace, name)

    def read_namespaced_pod_log(self, name, namespace, container=None, _preload_content=True,
                                **_):
        data = self.cluster.read_log(kubernetes.client.ApiException, namespace, name, container)
        return FakeLogResponse(data) if not _preload_content else data.decode()


class FakeAsyncCustomObjectsApi:
    exc = kubernetes_asyncio.client.ApiException

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster

    async def get_namespaced_custom_object(self, group, version, namespace, plural, name, **_):
        return self.cluster.get(self.exc, group, version, namespace, plural, name)

    async def delete_namespaced_custom_object(self, group, version, namespace, plural, name,
                                              **kw):
        return self.cluster.delete(self.exc, group, version, namespace, plural, name, **kw)


class FakeAsyncCoreV1Api:
    """What the provider's KubernetesPodTrigger reads (through AsyncKubernetesHook.get_pod)."""

    exc = kubernetes_asyncio.client.ApiException

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster

    async def read_namespaced_pod(self, name, namespace, **_):
        return self.cluster.read_pod(self.exc, namespace, name)


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
