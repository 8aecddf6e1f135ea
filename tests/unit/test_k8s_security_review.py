"""Least privilege of what a cluster admin installs (helm_values/) and of the rendered pods.

Each test pins a finding of the security review: the RBAC verbs match the API calls the code
makes, the NetworkPolicies (evaluated here by a small model of their semantics) keep a site's
pods inside the namespace and every pod away from the cloud metadata endpoint, the federation's
pods carry no Secret they do not use, and MLflow's Host-header guard admits the in-cluster name
the steps dial. No cluster: the manifests are what `kubectl apply` and `arf templates render`
would send.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from arf_training.kubernetes import KubernetesSettings
from arf_training.kubernetes.render import placeholder_identity, render_step_manifests, steps_of
from arf_training.templates import load_template

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "helm_values"
NS = "arf-training"
FEDERATED = load_template(REPO / "config_templates" / "reach_bc_federated.yaml")
SMOKE = load_template(REPO / "config_templates" / "digits_smoke.yaml")
TRACKING_SECRET, HUB_SECRET = "arf-tracking-credentials", "arf-datahub-credentials"

# Destinations a step pod might dial: (namespace, labels) for a pod, an IP for the rest.
MLFLOW = {"namespace": "mlflow", "labels": {"app.kubernetes.io/name": "mlflow"}}
KUBE_DNS = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
AIRFLOW_POD = {"namespace": "airflow", "labels": {"component": "worker"}}
OBJECT_STORE = {"ip": "52.216.10.20"}
METADATA_ENDPOINTS = [{"ip": "169.254.169.254"}, {"ip": "fd00:ec2::254"}]


def _rbac() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((VALUES / "rbac.yaml").read_text()) if d]


def _settings() -> KubernetesSettings:
    # What helm_values/airflow.yaml sets: both credential Secrets named.
    return dataclasses.replace(KubernetesSettings.from_env({}), workspace_pvc="arf-workspace",
                               datahub_pvc="arf-datahub", mlflow_secret=TRACKING_SECRET,
                               datahub_secret=HUB_SECRET)


def _pods(loaded: Any) -> list[dict[str, Any]]:
    """Every pod (spec) of every step: bare Pods, and each PyTorchJob replica's template."""
    pods = []
    for step in steps_of(loaded):
        for m in render_step_manifests(loaded, step, _settings(),
                                       placeholder_identity(loaded.name, step)):
            if m["kind"] == "Pod":
                pods.append(m)
            elif m["kind"] == "PyTorchJob":
                pods += [{"metadata": r["template"]["metadata"], "spec": r["template"]["spec"]}
                         for r in m["spec"]["pytorchReplicaSpecs"].values()]
    return pods


def _is_site_pod(pod: dict[str, Any]) -> bool:
    return "arf.dev/site" in pod["metadata"]["labels"]


# --- RBAC: the verbs are the calls ------------------------------------------------------------

VERB_OF_CALL = {"list": "list", "create": "create", "delete": "delete", "read": "get",
                "patch": "patch", "replace": "update"}


def test_service_rights_are_exactly_the_calls_the_federate_task_makes():
    """The worker touches Services only for the SuperLink (backends/kubernetes_supernodes.py);
    a verb no call needs is a right an attacker holding the token gets for free."""
    code = (REPO / "plugins" / "arf_training" / "backends" /
            "kubernetes_supernodes.py").read_text()
    called = {VERB_OF_CALL[m] for m in re.findall(r"\.(\w+?)_namespaced_service\b", code)}
    assert called == {"list", "create", "delete"}  # the parse found the calls
    granted = {v for role in _rbac() if role["kind"] == "Role" for rule in role["rules"]
               if "services" in rule["resources"] for v in rule["verbs"]}
    assert granted == called


def _verbs(role: str, resource: str) -> set[str]:
    (doc,) = [d for d in _rbac() if d["kind"] == "Role" and d["metadata"]["name"] == role]
    return {v for rule in doc["rules"] if resource in rule["resources"] for v in rule["verbs"]}


def test_pytorchjob_rights_are_exactly_the_calls_the_operator_and_trigger_make():
    """The worker runs PyTorchJobOperator (the provider's KubernetesHook custom-object helpers),
    the triggerer PyTorchJobTrigger (kubernetes_asyncio's CustomObjectsApi). Before: both roles
    also held list and watch on pytorchjobs, which no call needs."""
    calls = {}
    for module in ("operators", "triggers"):
        code = (REPO / "plugins" / "arf_training" / "kubernetes" / f"{module}.py").read_text()
        calls[module] = set(re.findall(r"\.(\w+?)_(?:namespaced_)?custom_object\(", code))
    assert calls == {"operators": {"create", "get", "delete"}, "triggers": {"get", "delete"}}
    assert _verbs("arf-step-launcher", "pytorchjobs") == calls["operators"]
    assert _verbs("arf-step-watcher", "pytorchjobs") == calls["triggers"]


# --- NetworkPolicy: a model of the union semantics --------------------------------------------

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    # The model reads matchLabels only: anything else must fail loudly, not match by accident.
    assert set(selector) <= {"matchLabels"}, f"model cannot evaluate {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(peer: dict[str, Any], where: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        # As Cilium does: an ipBlock never matches a pod, so in-cluster reach needs a selector.
        if "ip" not in where:
            return False
        ip, block = ipaddress.ip_address(where["ip"]), peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if "ip" in where:
        return False
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"],
                         {"kubernetes.io/metadata.name": where["namespace"]})
    else:
        ns_ok = where["namespace"] == NS
    return ns_ok and _selects(peer.get("podSelector", {}), where["labels"])


def _allowed(direction: str, pod_labels: dict[str, str], peer: dict[str, Any], port: int,
             protocol: str = "TCP", docs: list[dict[str, Any]] | None = None) -> bool:
    """Whether the policies of `docs` (rbac.yaml) let traffic out of (Egress) / into (Ingress)
    a pod."""
    kind, field, peers = {"Egress": ("Egress", "egress", "to"),
                          "Ingress": ("Ingress", "ingress", "from")}[direction]
    policies = [d["spec"] for d in (_rbac() if docs is None else docs)
                if d["kind"] == "NetworkPolicy"
                and d["metadata"]["namespace"] == NS and _selects(d["spec"]["podSelector"],
                                                                  pod_labels)]
    isolating = [p for p in policies if kind in p.get("policyTypes", ["Ingress"])]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy.get(field) or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == protocol
                                 for p in ports):
                continue
            if not rule.get(peers) or any(_peer_matches(x, peer) for x in rule[peers]):
                return True
    return False


def test_the_model_reads_the_policies_it_is_given():
    """Against the policy rbac.yaml shipped before the review (ingress only): everything out."""
    open_policy = [{"kind": "NetworkPolicy", "metadata": {"namespace": NS}, "spec": {
        "podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [
            {"podSelector": {}}]}]}}]
    assert _allowed("Egress", {}, METADATA_ENDPOINTS[0], 80, docs=open_policy)
    assert _allowed("Ingress", {}, {"namespace": NS, "labels": {}}, 9092, docs=open_policy)
    assert not _allowed("Ingress", {}, AIRFLOW_POD, 9092, docs=open_policy)


@pytest.mark.parametrize("loaded", [FEDERATED, SMOKE], ids=lambda t: t.name)
def test_no_step_pod_reaches_the_cloud_metadata_endpoint_but_all_resolve_names(loaded):
    pods = _pods(loaded)
    assert pods
    for pod in pods:
        labels = pod["metadata"]["labels"]
        for endpoint in METADATA_ENDPOINTS:
            assert not _allowed("Egress", labels, endpoint, 80), pod["metadata"].get("name")
        assert _allowed("Egress", labels, KUBE_DNS, 53, "UDP")
        assert _allowed("Egress", labels, {"ip": "169.254.20.10"}, 53, "UDP")  # NodeLocal DNS
        assert not _allowed("Ingress", labels, AIRFLOW_POD, 9092)


@pytest.mark.parametrize("loaded", [FEDERATED, SMOKE], ids=lambda t: t.name)
def test_steps_reach_mlflow_and_the_object_store_and_a_sites_pods_reach_nothing_outside(loaded):
    pods = _pods(loaded)
    for pod in pods:
        labels, name = pod["metadata"]["labels"], pod["metadata"].get("name")
        outside = _allowed("Egress", labels, MLFLOW, 5000) or \
            _allowed("Egress", labels, OBJECT_STORE, 443)
        if _is_site_pod(pod):
            assert not outside, f"{name} holds a site's data and could send it out"
        else:
            assert _allowed("Egress", labels, MLFLOW, 5000), name
            assert _allowed("Egress", labels, OBJECT_STORE, 443), name
    assert any(_is_site_pod(p) for p in pods) == (loaded is FEDERATED)


def test_supernodes_still_reach_the_superlink_on_its_fleet_port():
    pods = _pods(FEDERATED)
    (link,) = [p for p in pods if p["metadata"]["labels"].get("arf.dev/federation-role")
               == "superlink"]
    nodes = [p for p in pods if p["metadata"]["labels"].get("arf.dev/federation-role")
             == "supernode"]
    port = link["spec"]["containers"][0]["ports"][0]["containerPort"]
    target = {"namespace": NS, "labels": link["metadata"]["labels"]}
    assert nodes
    for node in nodes:
        source = {"namespace": NS, "labels": node["metadata"]["labels"]}
        assert _allowed("Egress", node["metadata"]["labels"], target, port)
        assert _allowed("Ingress", link["metadata"]["labels"], source, port)


# --- Secrets of the federation's pods ---------------------------------------------------------

def _secrets_of(pod: dict[str, Any]) -> set[str]:
    (box,) = pod["spec"]["containers"]
    names = {e["secretRef"]["name"] for e in box.get("envFrom", [])}
    names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in box["env"] if "valueFrom" in e}
    return names | {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}


def test_federated_pods_carry_only_the_secrets_they_use():
    """Site prepare reads its claim and never MLflow; the SuperLink reads no hub. Each Secret
    more is a key a site's data or a hostile update could leave with."""
    pods = _pods(FEDERATED)
    sites = [p for p in pods if _is_site_pod(p)
             and p["metadata"]["labels"].get("app.kubernetes.io/component") == "prepare"]
    assert len(sites) == len(FEDERATED.template.federated.sites)
    for pod in sites:
        assert _secrets_of(pod) == set(), pod["metadata"]["name"]
    (link,) = [p for p in pods if p["metadata"]["labels"].get("arf.dev/federation-role")
               == "superlink"]
    assert _secrets_of(link) == {TRACKING_SECRET, "arf-federation-tls"}
    # The steps that do read the hub keep its credentials.
    (evaluate,) = [p for p in pods
                   if p["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluate"]
    assert {TRACKING_SECRET, HUB_SECRET} <= _secrets_of(evaluate)


def test_a_plain_prepare_pod_carries_no_tracking_secret():
    """`arf-trainer prepare` reads the data hub and writes shards; it never talks to MLflow.
    Before: its pod got the tracking Secret like every other step's."""
    pods = _pods(SMOKE)
    by_step = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in pods}
    assert _secrets_of(by_step.pop("prepare")) == {HUB_SECRET}
    assert by_step and all(TRACKING_SECRET in _secrets_of(p) for p in by_step.values())


# --- MLflow's Host-header guard ---------------------------------------------------------------

def test_mlflow_admits_the_tracking_uris_host_and_nothing_else():
    """MLflow 3 refuses (403) a Host it does not list; unset it lists only localhost and
    private IPs, so the steps' in-cluster name was refused. "*" would turn the guard off."""
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = yaml.safe_load((VALUES / "mlflow.yaml").read_text()).get("serverAllowedHosts")
    assert allowed and "*" not in allowed
    env = {e["name"]: e["value"]
           for e in yaml.safe_load((VALUES / "airflow.yaml").read_text())["env"]}
    uri = urlparse(env["ARF_K8S_TRACKING_URI"])
    # requests sends the port in Host unless it is the scheme's default.
    for host in (uri.hostname, uri.netloc):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example")
    assert not is_allowed_host_header(allowed, f"{uri.hostname}.attacker.example")
