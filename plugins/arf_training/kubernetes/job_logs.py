"""The rank-0 log and exit code of a finished PyTorchJob, for `PyTorchJobOperator`'s task log.

Read through the provider's `KubernetesHook` (its CoreV1 client: list the job's pods by the
training operator's labels, then read one pod's log), when the job has ended.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from arf_training.kubernetes.pod import container_exit_code

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

# Pod labels set by the training operator (kubeflow/common `constants.go`); the replica type
# value is the lower-cased replica name.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
# A PyTorchJob's training container must be called "pytorch" (the operator finds it by name).
CONTAINER_NAME = "pytorch"
TAIL_LINES = 60


def master_logs(hook: KubernetesHook, log: Any, name: str, namespace: str, *,
                fetch_logs: bool = True) -> tuple[list[str], int | None]:
    """Copy the master pod's log into `log` (the task log). Returns (last lines, exit code).

    An elastic job has Workers only: worker 0 (its rendezvous host) stands in for the master.
    Best effort: a pod already removed (`runPolicy.cleanPodPolicy`) or an API error is logged as
    a warning and never hides the job's own outcome. `fetch_logs` False: the exit code only."""
    job = f"{JOB_NAME_LABEL}={name},{REPLICA_TYPE_LABEL}="
    try:
        pods = [pod for selector in ("master", f"worker,{REPLICA_INDEX_LABEL}=0")
                for pod in hook.core_v1_client.list_namespaced_pod(
                    namespace=namespace, label_selector=job + selector).items][:1]
    except Exception as exc:
        log.warning("could not list the pods of PyTorchJob %s/%s: %s", namespace, name, exc)
        return [], None
    if not pods:
        log.warning("PyTorchJob %s/%s has no master pod left (cleaned up by its "
                    "runPolicy.cleanPodPolicy?): no log to show", namespace, name)
        return [], None
    pod = pods[0]
    exit_code = container_exit_code(pod, CONTAINER_NAME)
    if not fetch_logs:
        return [], exit_code
    pod_name = pod.metadata.name
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    log.info("----- log of %s (master, rank 0) -----", pod_name)
    try:
        response = hook.get_pod_logs(pod_name, container=CONTAINER_NAME, namespace=namespace)
        try:
            for line in _lines(response):
                tail.append(line)
                log.info("%s", line)
        finally:
            response.release_conn()
    except Exception as exc:
        log.warning("could not read the log of pod %s/%s: %s", namespace, pod_name, exc)
    log.info("----- end of log of %s -----", pod_name)
    return list(tail), exit_code


def _lines(response: Any):
    """Lines of a raw (`_preload_content=False`) log response, decoded leniently: training
    output may hold bytes that are not UTF-8."""
    pending = b""
    for chunk in response.stream(65536):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", errors="replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", errors="replace").rstrip("\r")
