"""A `federated:` template on Kubernetes: site prepare pods, a SuperLink pod + Service, and one
SuperNode pod per site that mounts only its own site's claim (arf_training.kubernetes.federation).

Validated like every other pod: `kubernetes-validate` strict for the oldest and newest Kubernetes
we support, checkov through tests/k8s_scan/run_scanners.py (batch-pod skips apply to rendered/).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from arf_training.kubernetes import KubernetesConfigError, KubernetesSettings
from arf_training.kubernetes.federation import FederationSettings
from arf_training.kubernetes.render import placeholder_identity, render_step_manifests, steps_of
from arf_training.templates import load_template

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "config_templates" / "reach_bc_federated.yaml")
SITES = [s.name for s in TEMPLATE.template.federated.sites]
K8S_VERSIONS = ("1.30", "1.33")
TOOLS = REPO / ".tools-venv" / "bin"


def _settings(**overrides: Any) -> KubernetesSettings:
    return dataclasses.replace(KubernetesSettings.from_env({}), **overrides)


def _render(step: str, loaded=TEMPLATE, settings: KubernetesSettings | None = None
            ) -> list[dict[str, Any]]:
    return render_step_manifests(loaded, step, settings or _settings(),
                                 placeholder_identity(loaded.name, step))


def _by_role(manifests: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == "Pod"
            and m["metadata"]["labels"].get("arf.dev/federation-role") == role]


def _claims(pod: dict[str, Any]) -> dict[str, bool]:
    """claimName -> readOnly, of every PersistentVolumeClaim the pod mounts."""
    return {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"].get("readOnly",
                                                                                   False)
            for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}


def _env(pod: dict[str, Any]) -> dict[str, str]:
    (box,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value") for e in box["env"]}


def test_federated_steps_and_the_federation_objects():
    assert steps_of(TEMPLATE) == ["prepare", "federate", "register", "evaluate"]
    manifests = _render("federate")
    assert [m["kind"] for m in manifests] == ["Service"] + ["Pod"] * (1 + len(SITES))
    (link,) = _by_role(manifests, "superlink")
    nodes = _by_role(manifests, "supernode")
    assert [n["metadata"]["labels"]["arf.dev/site"] for n in nodes] == SITES
    service = manifests[0]
    # The Service selects the SuperLink only, and the SuperNodes dial that Service over TLS.
    assert all(link["metadata"]["labels"][k] == v
               for k, v in service["spec"]["selector"].items())
    assert all(any(n["metadata"]["labels"].get(k) != v
                   for k, v in service["spec"]["selector"].items()) for n in nodes)
    host = f"{service['metadata']['name']}.arf-training.svc:9092"
    for node in nodes:
        command = node["spec"]["containers"][0]["command"]
        assert command[:3] == ["flower-supernode", "--superlink", host]
        assert "--insecure" not in command
        assert command[command.index("--root-certificates") + 1].endswith("/ca.crt")
    assert _env(link)["ARF_FEDERATION_SUPERNODES"] == "external"
    assert link["spec"]["containers"][0]["command"] == ["arf-trainer", "federate"]


def test_each_supernode_mounts_only_its_own_sites_claim_read_only():
    manifests = _render("federate", settings=_settings(workspace_pvc="arf-workspace",
                                                       datahub_pvc="arf-datahub"))
    for index, node in enumerate(_by_role(manifests, "supernode")):
        site = SITES[index]
        assert _claims(node) == {f"arf-site-{site}": True}
        (box,) = node["spec"]["containers"]
        assert all(m.get("readOnly") for m in box["volumeMounts"] if m["name"] != "tmp")
        command = " ".join(box["command"])
        assert f'site="{site}" site-index={index}' in command
        assert 'data-dir="/site/reach_bc_federated/manual__placeholder/prepare"' in command
        # No job spec, tracking or hub settings reach a SuperNode: its work comes in messages.
        assert not {"ARF_JOB_SPEC_JSON", "ARF_TRACKING_URI", "ARF_DATAHUB_URI"} & set(_env(node))
        # Secrets: the federation's CA certificate only (not its key), and its own node key.
        assert {v["secret"]["secretName"]: [i["key"] for i in v["secret"]["items"]]
                for v in node["spec"]["volumes"] if "secret" in v} == \
            {"arf-federation-tls": ["ca.crt"], f"arf-site-{site}-node-key": ["node.key"]}
        assert box["command"][box["command"].index("--auth-supernode-private-key") + 1] == \
            "/etc/arf/federation-node-key/node.key"
    (link,) = _by_role(manifests, "superlink")
    assert _claims(link) == {"arf-workspace": False}  # no site claim, no data hub
    tls = [v for v in link["spec"]["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in tls] == ["arf-federation-tls"]
    # Node authentication: the SuperLink registers exactly the sites' public keys.
    (keys,) = [v["configMap"] for v in link["spec"]["volumes"] if "configMap" in v]
    assert [i["key"] for i in keys["items"]] == [f"{s}.pub" for s in SITES]
    assert _env(link)["ARF_FEDERATION_NODE_KEYS_DIR"] == "/etc/arf/federation-nodes"


def test_site_prepare_pods_see_only_their_own_claim_hub_and_site():
    pods = _render("prepare", settings=_settings(datahub_pvc="arf-datahub"))
    assert [p["metadata"]["labels"]["arf.dev/site"] for p in pods] == SITES
    assert len({p["metadata"]["name"] for p in pods}) == len(SITES)
    for pod, site in zip(pods, SITES):
        assert _claims(pod) == {f"arf-site-{site}": False}
        env = _env(pod)
        assert env["ARF_DATAHUB_URI"] == f"/site/sites/{site}/datahub"
        assert env["ARF_WORKSPACE"] == "/site/reach_bc_federated/manual__placeholder"
        assert env["ARF_DATA_DIR"].startswith(env["ARF_WORKSPACE"] + "/")
        assert env["ARF_DAG_RUN_DIR"] == env["ARF_WORKSPACE"]  # claimed on the site's volume
        job = json.loads(env["ARF_JOB_SPEC_JSON"])
        assert [s["name"] for s in job["template"]["federated"]["sites"]] == [site]
        others = [s for s in SITES if s != site]
        assert not any(f"/{o}/" in v or v.endswith(f"/{o}") for o in others
                       for v in env.values() if v and v.startswith("/"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_federated_pods_are_strictly_valid_and_hardened(version):
    manifests = _render("prepare") + _render("federate")
    for manifest in manifests:
        assert kubernetes_validate.validate(manifest, version, strict=True) == version
    for pod in (m for m in manifests if m["kind"] == "Pod"):
        spec, (box,) = pod["spec"], pod["spec"]["containers"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["activeDeadlineSeconds"] == TEMPLATE.template.training.timeout_minutes * 60
        sc = box["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
        assert box["resources"]["requests"]["cpu"] and box["resources"]["limits"]["memory"]


def test_a_hub_outside_the_sites_claim_is_refused():
    sites = [s.model_copy(update={"hub": "/data/shared"}) if s.name == "south" else s
             for s in TEMPLATE.template.federated.sites]
    federated = TEMPLATE.template.federated.model_copy(update={"sites": sites})
    loaded = dataclasses.replace(TEMPLATE, template=TEMPLATE.template.model_copy(
        update={"federated": federated}))
    with pytest.raises(KubernetesConfigError, match=r"federated.sites\[south\].hub.*/data/shared"):
        _render("prepare", loaded)


def test_federation_settings_from_env():
    fed = FederationSettings.from_env({"ARF_K8S_SITE_PVC_PREFIX": "fleet-",
                                       "ARF_K8S_SITE_MOUNT": "/data/",
                                       "ARF_K8S_FEDERATION_TLS_SECRET": "fl-tls"})
    assert (fed.claim("north"), fed.site_mount_path, fed.tls_secret) == \
        ("fleet-north", "/data", "fl-tls")
    with pytest.raises(KubernetesConfigError, match="ARF_K8S_SITE_MOUNT"):
        FederationSettings.from_env({"ARF_K8S_SITE_MOUNT": "site"})
    with pytest.raises(KubernetesConfigError, match="ARF_K8S_SITE_PVC_PREFIX"):
        FederationSettings.from_env({"ARF_K8S_SITE_PVC_PREFIX": "Bad_"}).claim("north")


@pytest.mark.skipif(not (TOOLS / "checkov").exists() or not (TOOLS / "hadolint").exists(),
                    reason="checkov/hadolint not installed in .tools-venv: run `make tools`")
@pytest.mark.timeout(300)
def test_federated_manifests_pass_checkov(tmp_path):
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    docs = _render("prepare") + _render("federate")
    (rendered / "reach_bc_federated.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "k8s_scan" / "run_scanners.py"),
                           str(rendered / "reach_bc_federated.yaml")], capture_output=True,
                          text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scanned = {line.split("Pod.arf-training.")[1].split(":")[0] for line in
               proc.stdout.splitlines() if "Pod.arf-training." in line}
    assert scanned == {d["metadata"]["name"] for d in docs if d["kind"] == "Pod"}


def test_superlink_with_external_supernodes_needs_its_mounted_tls_and_a_listen_address(
        tmp_path, monkeypatch):
    """The pod side of the SuperLink (arf_trainer.federated.launch): a missing TLS Secret mount
    or a bad ARF_FEDERATION_LISTEN fails with the variable and the fix, before Flower starts."""
    from arf_trainer.errors import TrainingError
    from arf_trainer.federated import launch

    monkeypatch.setenv("ARF_FEDERATION_TLS_DIR", str(tmp_path))
    with pytest.raises(TrainingError, match="ca.crt.*mount the federation's TLS Secret"):
        launch._certificates(tmp_path / "work", external=True)
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (tmp_path / name).write_text("pem")
    assert launch._certificates(tmp_path / "work", external=True)["key"] == tmp_path / "tls.key"
    monkeypatch.setenv("ARF_FEDERATION_LISTEN", "0.0.0.0:9092")
    monkeypatch.setenv("ARF_FEDERATION_ADVERTISE", "fed.arf-training.svc")
    assert launch._listen_address(True) == ("0.0.0.0", 9092, "fed.arf-training.svc")
    monkeypatch.setenv("ARF_FEDERATION_LISTEN", "9092")
    with pytest.raises(TrainingError, match="ARF_FEDERATION_LISTEN='9092'"):
        launch._listen_address(True)
    assert launch._listen_address(False)[0] == "127.0.0.1"


def test_cli_render_prints_every_federation_manifest_as_its_own_document():
    arf = Path(sys.executable).parent / "arf"
    out = subprocess.run([str(arf), "templates", "render", TEMPLATE.name], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    pods = len(SITES) + 1 + len(SITES)  # site prepares, SuperLink, SuperNodes
    assert sorted(d["kind"] for d in docs) == ["Pod"] * (pods + 2) + ["Service"]
    assert len({d["metadata"]["name"] for d in docs}) == len(docs)
    one = subprocess.run([str(arf), "templates", "render", TEMPLATE.name, "--step", "federate"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert [d["kind"] for d in yaml.safe_load_all(one.stdout) if d] == \
        ["Service"] + ["Pod"] * (len(SITES) + 1)


def test_superlink_with_external_supernodes_needs_every_sites_public_key(tmp_path, monkeypatch):
    from arf_trainer.errors import TrainingError
    from arf_trainer.federated import launch

    sites = [{"name": "north"}, {"name": "south"}]
    monkeypatch.setenv("ARF_FEDERATION_NODE_KEYS_DIR", str(tmp_path))
    (tmp_path / "north.pub").write_text("ecdsa-sha2-nistp384 AAAA")
    with pytest.raises(TrainingError, match=r"south.pub.*ARF_FEDERATION_NODE_KEYS_DIR"):
        launch._node_keys(tmp_path / "work", sites, external=True)
    (tmp_path / "south.pub").write_text("ecdsa-sha2-nistp384 AAAA")
    assert launch._node_keys(tmp_path / "work", sites, external=True)["south"] == \
        {"pub": tmp_path / "south.pub"}
    local = launch._node_keys(tmp_path / "work", sites, external=False)
    assert local["north"]["pub"].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert local["north"]["key"].stat().st_mode & 0o077 == 0
