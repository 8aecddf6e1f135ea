"""The client side of `fake_k8s`: stand-ins for the `kubernetes` / `kubernetes_asyncio` API
classes the provider's hooks build, each call routed to a `FakeCluster` with the real method's
signature; plus the urllib3-like log response and the websocket `exec` stream they hand back.

Kept apart from `fake_k8s` (the in-memory API server: objects, pods and their lifecycle) because
these are only the boundary's shape: no state, no semantics, one line per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import kubernetes.client
import kubernetes_asyncio.client

if TYPE_CHECKING:
    from fake_k8s import FakeCluster

API_CLIENT = kubernetes.client.ApiClient()  # (de)serialization only: it never connects


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
    api_client = API_CLIENT  # the provider's PodManager sanitizes a pod with it before creating it

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
