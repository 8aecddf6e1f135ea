"""A `federated:` template on Kubernetes: the site prepare pods and the federation's objects.

Pure renderers like `pod.py` (plain dicts, no cluster), used by `render.render_step_manifests`
(so `arf templates render` prints them) and tested by strict schema validation and checkov.

Where each site's data lives, and who mounts it:

* **Site claims.** Site S has its own PersistentVolumeClaim `<ARF_K8S_SITE_PVC_PREFIX><S>`
  (default `arf-site-north`), mounted at `ARF_K8S_SITE_MOUNT` (default `/site`). It holds the
  site's data hub (the template's relative `hub` path, resolved against the mount, as locally
  against ARF_HOME) and the site's prepared shards, `<mount>/<dag_id>/<run_id>/prepare/`.
* **Site prepare pod** (task `prepare_data`, one per site): mounts its site's claim and nothing
  else of the run (no shared workspace, no platform data hub, no Secret); its job spec names its
  own site only (`arf_training.federation.site_spec`). Site pods are labelled
  `arf.dev/egress: none`: helm_values/rbac.yaml's NetworkPolicy keeps them in the namespace.
* **SuperNode pod** of site S: mounts site S's claim read-only and the federation CA; no other
  claim, no job spec, no tracking credentials. It runs `flower-supernode`, whose ClientApp
  trains on `data-dir` and sends back weights and losses only.
* **SuperLink pod** (+ a ClusterIP Service the SuperNodes dial): `arf-trainer federate` with
  `ARF_FEDERATION_SUPERNODES=external`, TLS from the Secret `ARF_K8S_FEDERATION_TLS_SECRET`
  (`ca.crt`, `tls.crt`, `tls.key`: cert-manager's layout; the certificate names the Service,
  `<federation>.<namespace>.svc`, or a wildcard `*.<namespace>.svc`). It mounts the shared run workspace,
  where it writes the global model in the train step's layout for `register_model`; it mounts no
  site claim.
* **SuperNode authentication**: the SuperLink runs with `--enable-supernode-auth` and registers
  the public keys `<site>.pub` of the ConfigMap `ARF_K8S_FEDERATION_NODE_KEYS`; SuperNode S
  signs with `node.key` from its own Secret `<claim of S>-node-key`. Any other node is refused.

Every pod gets the restricted security context, resources and deadline of `pod.pod_template`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from arf_training.federation import site_spec
from arf_training.kubernetes.config import (KubernetesConfigError, KubernetesSettings, _get,
                                            _name)
from arf_training.kubernetes.ownership import EGRESS_LABEL, resource_name
from arf_training.kubernetes.pod import (pod_template, render_pod,
                                         restricted_container_security_context)
from arf_training.settings import ArfSettings
from arf_training.stepspec import RunIdentity, StepSpec

FLEET_PORT = 9092
TLS_DIR = "/etc/arf/federation-tls"
CA_DIR = "/etc/arf/federation-ca"
NODE_KEYS_DIR = "/etc/arf/federation-nodes"  # SuperLink: every site's public key, <site>.pub
NODE_KEY_DIR = "/etc/arf/federation-node-key"  # SuperNode: its own private key, node.key
FEDERATION_IMAGE = "ghcr.io/arf/arf-trainer-federated:0.1.0"  # the image + Flower (protobuf<7)


@dataclasses.dataclass(frozen=True)
class FederationSettings:
    """`ARF_K8S_*` settings of federated templates (names only; the Secret holds the keys)."""

    site_pvc_prefix: str = "arf-site-"
    site_mount_path: str = "/site"
    tls_secret: str = "arf-federation-tls"
    node_keys_configmap: str = "arf-federation-node-keys"
    image: str = FEDERATION_IMAGE

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "FederationSettings":
        env = os.environ if environ is None else environ
        mount = _get(env, "ARF_K8S_SITE_MOUNT") or "/site"
        if not mount.startswith("/") or mount.rstrip("/") in ("", "/tmp"):
            raise KubernetesConfigError(f"ARF_K8S_SITE_MOUNT={mount!r} must be an absolute "
                                        "path other than / and /tmp, e.g. /site")
        return cls(site_pvc_prefix=_get(env, "ARF_K8S_SITE_PVC_PREFIX") or "arf-site-",
                   site_mount_path=mount.rstrip("/"),
                   tls_secret=_name(env, "ARF_K8S_FEDERATION_TLS_SECRET", "arf-federation-tls",
                                    what="Secret", subdomain=True) or "arf-federation-tls",
                   node_keys_configmap=_name(env, "ARF_K8S_FEDERATION_NODE_KEYS",
                                             "arf-federation-node-keys", what="ConfigMap",
                                             subdomain=True) or "arf-federation-node-keys",
                   image=_get(env, "ARF_K8S_FEDERATION_IMAGE") or FEDERATION_IMAGE)

    def node_key_secret(self, site: str) -> str:
        """The Secret holding site `site`'s SuperNode private key (`node.key`)."""
        return f"{self.claim(site)}-node-key"

    def claim(self, site: str) -> str:
        name = f"{self.site_pvc_prefix}{site}"
        _name({"ARF_K8S_SITE_PVC_PREFIX": name}, "ARF_K8S_SITE_PVC_PREFIX", None,
              what=f"PersistentVolumeClaim (prefix + site {site!r})", subdomain=True)
        return name


def part_identity(identity: RunIdentity, part: str) -> RunIdentity:
    """The identity that names one part of a task's objects (a site, the SuperLink): the part
    joins the task id, so every part of every try has its own deterministic name."""
    return dataclasses.replace(identity, task_id=f"{identity.task_id}:{part}")


def _site_hub(fed: FederationSettings, name: str, hub: str) -> str:
    """The site's hub inside its claim: a relative hub under the mount; else refused."""
    path = hub[len("file://"):] if hub.startswith("file://") else hub
    mount = fed.site_mount_path
    if not path.startswith("/"):
        return str(PurePosixPath(mount) / path)
    if path == mount or path.startswith(mount + "/"):
        return path
    raise KubernetesConfigError(
        f"federated.sites[{name}].hub is {hub!r}, outside the site's claim mounted at {mount} "
        f"(ARF_K8S_SITE_MOUNT): on Kubernetes a site sees its own claim only; give the hub as "
        f"a path relative to the claim (e.g. sites/{name}/datahub) or under {mount}/")


def _on_site_claim(spec: StepSpec, run_root: PurePosixPath) -> StepSpec:
    """`site_spec`'s `<run>/sites/<S>` folder moved to `<site mount>/<dag>/<run>`: the claim
    is the site's own, so the site needs no subfolder (and the paths stay keyed by run)."""
    local, root = str(spec.workspace), str(run_root)
    env = {k: root + v[len(local):] if v == local or v.startswith(local + "/") else v
           for k, v in spec.env.items()}
    env["ARF_DAG_RUN_DIR"] = root  # the run's folder on the site's own claim
    return dataclasses.replace(spec, env=env, workspace=Path(root),
                               result_path=Path(env["ARF_RESULT_PATH"]))


def _run_root(fed: FederationSettings, spec: StepSpec) -> PurePosixPath:
    return PurePosixPath(fed.site_mount_path) / spec.workspace.parent.name / spec.workspace.name


def render_site_prepare(spec: StepSpec, loaded: Any, site: str, identity: RunIdentity,
                        settings: KubernetesSettings, arf_settings: ArfSettings,
                        fed: FederationSettings | None = None,
                        result_path: str | None = None) -> dict[str, Any]:
    """The prepare Pod of site `site`; `spec` is the run's prepare step, built with
    `arf_settings` (the pods' view: `render.pod_arf_settings`). `result_path`: where the step
    writes its result JSON instead of the site's claim (the task's xcom volume)."""
    fed = fed or FederationSettings.from_env()
    entry = next((s for s in loaded.template.federated.sites if s.name == site), None)
    if entry is None:
        raise KubernetesConfigError(
            f"template {loaded.name!r} has no federated site {site!r}; sites: "
            f"{[s.name for s in loaded.template.federated.sites]}")
    hub = _site_hub(fed, site, entry.hub)
    narrowed = _on_site_claim(site_spec(spec, loaded.template, site, arf_settings),
                              _run_root(fed, spec))
    if result_path is not None:
        narrowed = dataclasses.replace(narrowed, env={**narrowed.env,
                                                      "ARF_RESULT_PATH": result_path},
                                       result_path=Path(result_path))
    # The site's claim is the pod's workspace volume; no platform data hub is mounted. No
    # Secret either: prepare reads the hub on the claim and never talks to MLflow, and the
    # platform's tracking or object-store keys would give a site's data a way out.
    site_settings = dataclasses.replace(
        settings, workspace_pvc=fed.claim(site), workspace_mount_path=fed.site_mount_path,
        datahub_pvc=None, datahub_uri=hub, mlflow_secret=None, datahub_secret=None,
        secret_env=())
    pod = render_pod(narrowed, part_identity(identity, site), site_settings)
    pod["metadata"]["labels"].update({"arf.dev/site": site, EGRESS_LABEL: "none"})
    return pod


def render_site_prepares(spec: StepSpec, loaded: Any, identity: RunIdentity,
                         settings: KubernetesSettings, arf_settings: ArfSettings,
                         fed: FederationSettings | None = None) -> list[dict[str, Any]]:
    """One prepare Pod per site (`render_site_prepare`)."""
    fed = fed or FederationSettings.from_env()
    return [render_site_prepare(spec, loaded, site.name, identity, settings, arf_settings, fed)
            for site in loaded.template.federated.sites]


def with_site_manifests(spec: StepSpec, manifests: dict[str, dict[str, Any]]) -> StepSpec:
    """The federate `spec` whose job spec's `inputs.sites[i].manifest` is site i's metadata
    (what `arf_trainer.federated` reads instead of the site's manifest.json)."""
    inputs = dict(spec.job_spec.get("inputs") or {})
    given = {s["name"]: s for s in inputs.get("sites", [])}
    inputs["sites"] = [{**given.get(name, {}), "name": name, "manifest": metadata}
                       for name, metadata in manifests.items()]
    return dataclasses.replace(spec, job_spec={**spec.job_spec, "inputs": inputs})


def _labels(pod: dict[str, Any], federation: str, role: str) -> dict[str, Any]:
    labels = pod["metadata"]["labels"]
    labels.update({"arf.dev/federation": federation, "arf.dev/federation-role": role})
    return labels


def _service_host(federation: str, settings: KubernetesSettings) -> str:
    """The SuperLink Service's DNS name: SuperNodes dial it, its certificate must name it."""
    return f"{federation}.{settings.namespace}.svc"


def _secret_volume(name: str, secret: str, keys: list[str]) -> dict[str, Any]:
    return {"name": name, "secret": {"secretName": secret, "defaultMode": 0o440,
                                     "items": [{"key": k, "path": k} for k in keys]}}


def _superlink(spec: StepSpec, loaded: Any, identity: RunIdentity,
               settings: KubernetesSettings, fed: FederationSettings, federation: str
               ) -> dict[str, Any]:
    # The federate step reads no hub and no site claim: only the shared run workspace.
    spec = dataclasses.replace(spec, image=fed.image, env={
        **spec.env, "ARF_FEDERATION_SUPERNODES": "external",
        "ARF_FEDERATION_LISTEN": f"0.0.0.0:{FLEET_PORT}", "ARF_FEDERATION_TLS_DIR": TLS_DIR,
        "ARF_FEDERATION_ADVERTISE": _service_host(federation, settings),
        "ARF_FEDERATION_NODE_KEYS_DIR": NODE_KEYS_DIR})
    # Tracking credentials only: without a hub it needs no object-store keys.
    settings = dataclasses.replace(settings, datahub_pvc=None, datahub_secret=None,
                                   datahub_uri=str(spec.workspace / "federate" / "no-hub"))
    pod = render_pod(spec, part_identity(identity, "superlink"), settings)
    pod["spec"]["containers"][0]["ports"] = [
        {"name": "fleet", "containerPort": FLEET_PORT, "protocol": "TCP"}]
    pod["spec"]["volumes"].append(_secret_volume("federation-tls", fed.tls_secret,
                                                 ["ca.crt", "tls.crt", "tls.key"]))
    sites = [s.name for s in loaded.template.federated.sites]
    pod["spec"]["volumes"].append({"name": "federation-nodes", "configMap": {
        "name": fed.node_keys_configmap, "defaultMode": 0o440,
        "items": [{"key": f"{s}.pub", "path": f"{s}.pub"} for s in sites]}})
    pod["spec"]["containers"][0]["volumeMounts"] += [
        {"name": "federation-tls", "mountPath": TLS_DIR, "readOnly": True},
        {"name": "federation-nodes", "mountPath": NODE_KEYS_DIR, "readOnly": True}]
    _labels(pod, federation, "superlink")
    return pod


def _service(pod: dict[str, Any], federation: str) -> dict[str, Any]:
    meta = pod["metadata"]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": federation, "namespace": meta["namespace"],
                         "labels": dict(meta["labels"]), "annotations": dict(meta["annotations"])},
            "spec": {"type": "ClusterIP",
                     "selector": {"arf.dev/federation": federation,
                                  "arf.dev/federation-role": "superlink"},
                     "ports": [{"name": "fleet", "port": FLEET_PORT, "targetPort": "fleet",
                                "protocol": "TCP"}]}}


def _supernode(spec: StepSpec, identity: RunIdentity, settings: KubernetesSettings,
               fed: FederationSettings, federation: str, index: int, name: str
               ) -> dict[str, Any]:
    data_dir = str(_run_root(fed, spec) / "prepare")
    config = f"data-dir={json.dumps(data_dir)} site={json.dumps(name)} site-index={index}"
    command = ["flower-supernode", "--superlink",
               f"{_service_host(federation, settings)}:{FLEET_PORT}",
               "--root-certificates", f"{CA_DIR}/ca.crt",
               "--auth-supernode-private-key", f"{NODE_KEY_DIR}/node.key",
               "--node-config", config]
    # No job spec, no tracking or hub settings: the node gets its work in Flower messages.
    node = dataclasses.replace(spec, image=fed.image, command=command, setup_command=(), env={
        "FLWR_HOME": "/tmp/flwr", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0"}, job_spec={"step": "federate", "site": name})
    site_settings = dataclasses.replace(
        settings, workspace_pvc=fed.claim(name), workspace_mount_path=fed.site_mount_path,
        datahub_pvc=None, mlflow_secret=None, datahub_secret=None, secret_env=())
    template = pod_template(node, part_identity(identity, name), site_settings,
                            name=resource_name(part_identity(identity, name)))
    box = template["spec"]["containers"][0]
    box["env"] = [e for e in box["env"] if e["name"] not in
                  ("ARF_JOB_SPEC_JSON", "ARF_TRACKING_URI", "ARF_ARTIFACT_ROOT",
                   "ARF_DATAHUB_URI")]
    for mount in box["volumeMounts"]:
        if mount["name"] == "workspace":  # the site's claim: read, never written, by the node
            mount["readOnly"] = True
    for volume in template["spec"]["volumes"]:
        if volume["name"] == "workspace":
            volume["persistentVolumeClaim"]["readOnly"] = True
    template["spec"]["volumes"].append(_secret_volume("federation-ca", fed.tls_secret,
                                                      ["ca.crt"]))
    template["spec"]["volumes"].append(_secret_volume("node-key", fed.node_key_secret(name),
                                                      ["node.key"]))
    box["volumeMounts"] += [{"name": "federation-ca", "mountPath": CA_DIR, "readOnly": True},
                            {"name": "node-key", "mountPath": NODE_KEY_DIR, "readOnly": True}]
    box["securityContext"] = restricted_container_security_context()
    pod_name = resource_name(part_identity(identity, name))
    metadata = {"name": pod_name, "namespace": settings.namespace, **template["metadata"]}
    # Holds the site's data: it reaches the SuperLink in this namespace, nothing outside.
    metadata["labels"].update({"arf.dev/site": name, EGRESS_LABEL: "none"})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
    # A SuperNode that crashes is restarted in place and rejoins the federation. Under the same
    # key (its Secret) it is the same node to the SuperLink, so the round it died in waits for
    # the round timeout (not Flower's ~60 s offline reply) before going on without it, if
    # min_sites allows; the local step restarts under a new key instead (launch.revive). One
    # that keeps crashing is deleted by the federate task (kubernetes_federated_pods), so that
    # the SuperLink marks it offline and goes on without its site, as min_sites allows.
    pod["spec"]["restartPolicy"] = "OnFailure"
    pod["spec"]["activeDeadlineSeconds"] = max(1, int(spec.timeout_s))
    _labels(pod, federation, "supernode")
    return pod


def render_federation(spec: StepSpec, loaded: Any, identity: RunIdentity,
                      settings: KubernetesSettings, fed: FederationSettings | None = None
                      ) -> list[dict[str, Any]]:
    """[Service, SuperLink Pod, one SuperNode Pod per site] of the `federate` step `spec`."""
    fed = fed or FederationSettings.from_env()
    federation = resource_name(identity)
    link = _superlink(spec, loaded, identity, settings, fed, federation)
    nodes = [_supernode(spec, identity, settings, fed, federation, i, site.name)
             for i, site in enumerate(loaded.template.federated.sites)]
    return [_service(link, federation), link, *nodes]
