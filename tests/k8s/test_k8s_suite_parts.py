"""The real-cluster suite's own parts, checked without a cluster (this runs on every `make test`):
its settings fail clearly, and the objects it creates strict-validate and run restricted."""

from __future__ import annotations

import kubernetes_validate
import pytest

from arf_training.kubernetes.pod import restricted_container_security_context
from k8s_cluster import REQUIRED, ClusterSuiteConfig, ClusterSuiteConfigError, \
    dev_cluster_manifests, seed_pod

K8S_VERSIONS = ("1.30", "1.33")
FULL_ENV = {
    "KUBECONFIG": "/tmp/kubeconfig",
    "ARF_K8S_IMAGE": "registry.example/arf-trainer:dev",
    "ARF_K8S_WORKSPACE_PVC": "arf-workspaces",
    "ARF_K8S_DATAHUB_PVC": "arf-datahub",
    "ARF_K8S_DATAHUB_URI": "/datahub",
    "ARF_K8S_TRACKING_URI": "http://mlflow.arf-training:5000",
    "ARF_K8S_TEST_TRACKING_URI": "http://127.0.0.1:5000",
}


def test_missing_settings_are_named_with_what_to_set():
    env = {k: v for k, v in FULL_ENV.items() if k not in ("ARF_K8S_IMAGE", "ARF_K8S_DATAHUB_PVC")}
    with pytest.raises(ClusterSuiteConfigError) as err:
        ClusterSuiteConfig.from_env(env)
    message = str(err.value)
    assert "ARF_K8S_IMAGE" in message and "ARF_K8S_DATAHUB_PVC" in message
    assert "ARF_K8S_WORKSPACE_PVC" not in message
    assert "unset KUBECONFIG" in message


def test_settings_pass_through_to_the_backend():
    suite = ClusterSuiteConfig.from_env(FULL_ENV)
    assert suite.settings.image == FULL_ENV["ARF_K8S_IMAGE"]
    assert suite.settings.workspace_pvc == "arf-workspaces"
    assert suite.test_tracking_uri == "http://127.0.0.1:5000"
    assert set(suite.env) == set(REQUIRED)  # KUBECONFIG stays out of the ARF_K8S_* hand-over


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_seed_pod_is_valid_and_restricted(version):
    pod = seed_pod(ClusterSuiteConfig.from_env(FULL_ENV).settings)
    assert kubernetes_validate.validate(pod, version, strict=True) == version
    (box,) = pod["spec"]["containers"]
    assert box["securityContext"] == restricted_container_security_context()
    assert box["command"][:5] == ["arf-trainer", "datahub", "seed", "--hub", "/datahub"]
    mount = next(m for m in box["volumeMounts"] if m["name"] == "datahub")
    assert mount["mountPath"] == "/datahub" and not mount.get("readOnly")
    assert pod["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_dev_cluster_manifests_are_valid_and_restricted(version):
    docs = dev_cluster_manifests()
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "Deployment", "Service"}
    for doc in docs:
        assert kubernetes_validate.validate(doc, version, strict=True) == version
        assert doc["metadata"]["namespace"] == "arf-training"
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    for box in deployment["spec"]["template"]["spec"]["containers"]:
        assert box["securityContext"] == restricted_container_security_context()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims == {FULL_ENV["ARF_K8S_WORKSPACE_PVC"], FULL_ENV["ARF_K8S_DATAHUB_PVC"]}
