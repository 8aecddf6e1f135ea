"""tests/k8s: the real-cluster suite. It runs only when KUBECONFIG is set (kind or any cluster);
without it every test here that needs a cluster is skipped, and the parts that need none run."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "k8s: needs a real Kubernetes cluster (KUBECONFIG); skipped without one")


@pytest.fixture(scope="session")
def cluster():
    """The cluster suite's settings and API clients; skips the test when KUBECONFIG is unset."""
    if not os.environ.get("KUBECONFIG", "").strip():
        pytest.skip("tests/k8s needs a real cluster: set KUBECONFIG (and the ARF_K8S_* variables "
                    "in README.md 'The real-cluster suite') to run it")
    from kubernetes import client, config

    from k8s_cluster import ClusterSuiteConfig

    suite = ClusterSuiteConfig.from_env(os.environ)  # fails, naming what is missing
    config.load_kube_config()
    return {"suite": suite, "core": client.CoreV1Api(),
            "custom": client.CustomObjectsApi(), "ext": client.ApiextensionsV1Api()}
