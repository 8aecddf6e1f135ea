"""What the real-cluster suite needs: its settings, the objects it creates, and waits.

Kept apart from the test so that the parts that need no cluster (reading the settings, the seed
Pod and the development MLflow manifests) are checked on every run by
`tests/k8s/test_k8s_suite_parts.py`, where there is no cluster.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from arf_training.kubernetes.config import KubernetesSettings
from arf_training.kubernetes.pod import RUN_AS_UID, restricted_container_security_context

HERE = Path(__file__).resolve().parent
DEV_MANIFESTS = HERE / "dev-cluster.yaml"
# What the suite cannot guess: which image the cluster can pull, where the run workspaces and
# the data hub live, and how the test machine reaches MLflow.
REQUIRED = {
    "ARF_K8S_IMAGE": "the training image the cluster can pull (kind: `kind load docker-image`)",
    "ARF_K8S_WORKSPACE_PVC": "ReadWriteMany claim (one node: ReadWriteOnce) for run workspaces",
    "ARF_K8S_DATAHUB_PVC": "claim holding the data hub; the suite seeds it",
    "ARF_K8S_DATAHUB_URI": "the data hub's path inside the pods, e.g. /datahub",
    "ARF_K8S_TRACKING_URI": "MLflow as the pods reach it, e.g. http://mlflow.arf-training:5000",
    "ARF_K8S_TEST_TRACKING_URI": "the same MLflow as this machine reaches it, e.g. "
                                 "http://127.0.0.1:5000 through `kubectl port-forward`",
}


class ClusterSuiteConfigError(RuntimeError):
    """KUBECONFIG is set but the suite's other settings are missing or invalid."""


@dataclass(frozen=True)
class ClusterSuiteConfig:
    settings: KubernetesSettings
    test_tracking_uri: str
    env: dict[str, str]  # the ARF_K8S_* variables handed to Airflow

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClusterSuiteConfig:
        missing = [name for name in REQUIRED if not env.get(name, "").strip()]
        if missing:
            lines = "\n".join(f"  {name}: {REQUIRED[name]}" for name in missing)
            raise ClusterSuiteConfigError(
                "KUBECONFIG is set, so tests/k8s runs against that cluster, but these variables "
                f"are not set:\n{lines}\nSee README.md, 'Running on Kubernetes' -> 'The real-"
                "cluster suite' (or unset KUBECONFIG to skip the suite).")
        k8s_env = {k: v for k, v in env.items() if k.startswith("ARF_K8S_")}
        settings = KubernetesSettings.from_env(k8s_env)
        return cls(settings=settings, test_tracking_uri=env["ARF_K8S_TEST_TRACKING_URI"].strip(),
                   env=k8s_env)


def seed_pod(settings: KubernetesSettings, name: str = "arf-datahub-seed") -> dict[str, Any]:
    """A Pod that seeds the demo tables into the data hub claim (read-write only here: steps
    mount it read-only). `arf-trainer datahub seed` does nothing when the tables exist."""
    hub = settings.datahub_uri.removeprefix("file://")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": settings.namespace,
                     "labels": {"app.kubernetes.io/part-of": "arf-training",
                                "app.kubernetes.io/component": "datahub-seed"}},
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": 900,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_UID,
                                "runAsGroup": RUN_AS_UID, "fsGroup": RUN_AS_UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "seed",
                "image": settings.image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["arf-trainer", "datahub", "seed", "--hub", hub, "--episodes", "80"],
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                              "limits": {"memory": "2Gi"}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "datahub", "mountPath": hub}],
                "securityContext": restricted_container_security_context(),
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}},
                        {"name": "datahub",
                         "persistentVolumeClaim": {"claimName": settings.datahub_pvc}}],
        },
    }


def dev_cluster_manifests() -> list[dict[str, Any]]:
    """The objects of `dev-cluster.yaml` (claims + a throwaway MLflow for kind)."""
    return [d for d in yaml.safe_load_all(DEV_MANIFESTS.read_text()) if d]


def run_pod_to_completion(core: Any, pod: dict[str, Any], timeout_s: float) -> str:
    """Create `pod` (replacing a finished one of the same name), wait until it ends, return its
    log; raise with the log if it failed."""
    from kubernetes.client.exceptions import ApiException

    name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
    try:
        core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        _wait(lambda: _gone(core, name, ns), 120, f"old pod {ns}/{name} to go")
    except ApiException as exc:
        if exc.status != 404:
            raise
    core.create_namespaced_pod(ns, pod)
    phase = _wait(lambda: _phase_if_done(core, name, ns), timeout_s, f"pod {ns}/{name}")
    log = core.read_namespaced_pod_log(name, ns)
    if phase != "Succeeded":
        raise AssertionError(f"pod {ns}/{name} ended {phase}:\n{log[-5000:]}")
    core.delete_namespaced_pod(name, ns)
    return log


def _gone(core: Any, name: str, ns: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_pod(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def _phase_if_done(core: Any, name: str, ns: str) -> str | None:
    phase = core.read_namespaced_pod(name, ns).status.phase
    return phase if phase in ("Succeeded", "Failed") else None


def _wait(probe, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(2)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
