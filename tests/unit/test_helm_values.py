"""helm_values/: chart values validate against the charts' schemas, RBAC strict-validates, and
the settings the Kubernetes path depends on are what it expects. No cluster, no helm binary.

Schemas are vendored under tests/schemas/ (sources in its README.md).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "helm_values"
SCHEMAS = REPO / "tests" / "schemas"
TRAINING_NS = "arf-training"
AIRFLOW_NS = "airflow"


def _load(name: str) -> Any:
    return yaml.safe_load((VALUES / name).read_text())


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def _pin(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package.lower()}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _env(values: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in values.get("env", [])}


# --- schema validation ----------------------------------------------------------------------

def _schema_defaults(schema: dict) -> Any:
    """A stand-in for the chart's values.yaml: every required key, filled from schema defaults.

    Helm validates the chart defaults merged with the user's file, and the MLflow schema marks
    nearly every key required, so a partial values file must be merged onto defaults first.
    """
    kind = schema.get("type")
    if kind == "object" or ("properties" in schema and kind is None):
        props = schema.get("properties", {})
        return {k: _schema_defaults(props[k]) for k in schema.get("required") or [] if k in props}
    if "default" in schema:
        return copy.deepcopy(schema["default"])
    return [] if kind == "array" else None


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


def _is_ours(values: Any, path: list) -> bool:
    """Whether `path` lies inside what our values file sets (not the synthesized defaults)."""
    node = values
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


def _schema_errors(values: dict, schema: dict, *, merge_defaults: bool) -> list[str]:
    doc = _merge(_schema_defaults(schema), values) if merge_defaults else values
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = []
    for e in validator.iter_errors(doc):
        # The schema's own defaults are an approximation of the chart's values.yaml (a few do
        # not even match their declared type): only errors inside what we set are ours.
        if not merge_defaults or _is_ours(values, list(e.absolute_path)):
            errors.append(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}")
    return errors


def test_airflow_values_match_the_chart_schema():
    values, schema = _load("airflow.yaml"), _schema("airflow-chart-1.21-values.schema.json")
    assert _schema_errors(values, schema, merge_defaults=False) == []
    # The chart schema does not forbid unknown top-level keys: a typo there would pass silently.
    unknown = set(values) - set(schema["properties"])
    assert not unknown, f"not chart values (typo?): {sorted(unknown)}"


def test_mlflow_values_match_the_chart_schema():
    values, schema = _load("mlflow.yaml"), _schema("mlflow-chart-values.schema.json")
    assert _schema_errors(values, schema, merge_defaults=True) == []


def test_schema_check_is_not_vacuous():
    airflow = _schema("airflow-chart-1.21-values.schema.json")
    mlflow = _schema("mlflow-chart-values.schema.json")
    assert _schema_errors({"triggerer": {"enabledd": True}}, airflow, merge_defaults=False)
    assert _schema_errors({"executor": "NotAnExecutorName"}, airflow, merge_defaults=False)
    assert _schema_errors({"backendStore": {"postgres": {"port": "5432"}}}, mlflow,
                          merge_defaults=True)
    assert _schema_errors({"artifactRoot": {"s3": {"bukket": "x"}}}, mlflow, merge_defaults=True)


# --- no literal secrets ---------------------------------------------------------------------

SECRETISH = re.compile(r"(?i)(pass(word)?|secret|token|fernet|access_?key|api_?key|private_?key"
                       r"|ssh_?key|credentials?)$|secret_?key|password")
# Keys whose value NAMES a Secret (or a key inside one) rather than holding secret material.
REFERENCE = re.compile(r"(SecretName|SecretNamesForEnvFrom|credentialsSecret|sshKeySecret"
                       r"|existing\w*Secret|(password|username|token)Key|keyOf\w+)$")


def _literal_secrets(node: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(node, dict):
        if set(node) >= {"name", "value"} and isinstance(node.get("name"), str):
            # ARF_K8S_*_SECRET variables hold the *name* of a Secret object, not a secret.
            names_a_secret = (node["name"].startswith("ARF_K8S_")
                              and node["name"].endswith("_SECRET")
                              and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?",
                                               str(node["value"])))
            if (SECRETISH.search(node["name"]) and node["value"] not in ("", None)
                    and not names_a_secret):
                found.append(f"{path}[{node['name']}]")
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if (isinstance(value, (str, int, float)) and not isinstance(value, bool)
                    and str(value) != "" and SECRETISH.search(str(key))
                    and not REFERENCE.search(str(key))):
                found.append(sub)
            found += _literal_secrets(value, sub)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _literal_secrets(item, f"{path}[{i}]")
    elif isinstance(node, str) and ("\n" in node or node.lstrip().startswith("- ")):
        try:  # templated env/envFrom blocks the Airflow chart takes as strings
            parsed = yaml.safe_load(node)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, (dict, list)):
            found += _literal_secrets(parsed, path)
    return found


@pytest.mark.parametrize("name", ["airflow.yaml", "mlflow.yaml"])
def test_no_literal_secrets(name):
    assert _literal_secrets(_load(name)) == []


def test_literal_secret_detector_catches_the_usual_shapes():
    bad = {"flaskServerSecretKey": "s3cr3t", "data": {"metadataConnection": {"pass": "pw"}},
           "env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "pw"}],
           "extraEnvVars": {"AWS_SECRET_ACCESS_KEY": "abc"},
           "extraEnv": "- name: GIT_TOKEN\n  value: ghp_x\n"}
    assert len(_literal_secrets(bad)) == 5
    fine = {"jwtSecretName": "airflow-jwt", "credentialsSecret": "git", "existingSecret":
            {"name": "s3", "keyOfSecretAccessKey": "AWS_SECRET_ACCESS_KEY", "passwordKey": "pw"},
            "flaskServerSecretKey": "", "extraSecretNamesForEnvFrom": ["x"]}
    assert _literal_secrets(fine) == []


# --- Airflow values: what the Kubernetes path depends on -------------------------------------

def test_airflow_key_settings():
    v = _load("airflow.yaml")
    assert v["executor"] == "KubernetesExecutor"
    assert v["triggerer"]["enabled"] is True
    assert v["dagProcessor"]["enabled"] is True
    airflow = _pin("apache-airflow")
    assert v["airflowVersion"] == v["defaultAirflowTag"] == airflow
    assert v["images"]["airflow"]["tag"].startswith(f"{airflow}-python3.11")
    # External PostgreSQL from an existing Secret; keys from existing Secrets.
    assert v["postgresql"]["enabled"] is False and v["data"]["metadataSecretName"]
    for key in ("apiSecretKeySecretName", "jwtSecretName", "fernetKeySecretName"):
        assert v[key], key
    assert v["createUserJob"]["defaultUser"]["enabled"] is False  # its default is admin/admin
    assert "secretRef" in v["extraEnvFrom"]


def test_airflow_finds_dags_plugins_and_templates_in_the_git_sync_clone():
    v = _load("airflow.yaml")
    git = v["dags"]["gitSync"]
    assert git["enabled"] is True and git["branch"] == "main" and git["subPath"] == "dags"
    clone = f"{v['dags']['mountPath']}/repo"
    env = _env(v)
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == f"{clone}/plugins"
    assert env["ARF_TEMPLATES_DIR"] == f"{clone}/config_templates"
    assert env["ARF_BACKEND"] == "kubernetes"
    # The names must be the ones the Airflow side reads.
    settings = (REPO / "plugins" / "arf_training" / "settings.py").read_text()
    for name in ("ARF_TEMPLATES_DIR", "ARF_BACKEND", "ARF_TRACKING_URI", "ARF_DATAHUB_URI",
                 "ARF_ARTIFACT_ROOT", "ARF_WORKSPACE_ROOT"):
        assert name in env and f'"{name}"' in settings, name
    for folder in ("dags", "plugins", "config_templates"):
        assert (REPO / folder).is_dir(), folder


def test_tracking_uri_points_at_the_mlflow_release():
    env, mlflow = _env(_load("airflow.yaml")), _load("mlflow.yaml")
    assert env["ARF_TRACKING_URI"] == (
        f"http://mlflow.mlflow.svc.cluster.local:{mlflow['service']['port']}")
    assert env["ARF_ARTIFACT_ROOT"].startswith("mlflow-artifacts:")
    assert mlflow["artifactRoot"]["proxiedArtifactStorage"] is True


# --- MLflow values --------------------------------------------------------------------------

def test_mlflow_key_settings():
    v = _load("mlflow.yaml")
    pg = v["backendStore"]["postgres"]
    assert pg["enabled"] is True and not pg["user"] and not pg["password"]
    assert v["backendStore"]["existingDatabaseSecret"]["name"]
    s3 = v["artifactRoot"]["s3"]
    assert s3["enabled"] is True and s3["existingSecret"]["name"]
    assert not s3["awsAccessKeyId"] and not s3["awsSecretAccessKey"]
    assert v["auth"]["existingAdminSecret"]["name"] and not v["auth"]["adminPassword"]
    assert v["image"]["tag"] == _pin("mlflow")  # server matches the client in the image
    assert v["securityContext"]["readOnlyRootFilesystem"] is True


# --- RBAC -----------------------------------------------------------------------------------

def _rbac() -> list[dict]:
    return [d for d in yaml.safe_load_all((VALUES / "rbac.yaml").read_text()) if d]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_rbac_manifests_strict_validate(version):
    for doc in _rbac():
        kubernetes_validate.validate(doc, version, strict=True)


def test_rbac_is_namespaced_and_narrow():
    docs = _rbac()
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy"}, kinds
    ns = next(d for d in docs if d["kind"] == "Namespace")
    assert ns["metadata"]["name"] == TRAINING_NS
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["namespace"] == TRAINING_NS
    assert sa["automountServiceAccountToken"] is False

    granted: dict[tuple[str, str], set[str]] = {}
    for role in (d for d in docs if d["kind"] == "Role"):
        assert role["metadata"]["namespace"] == TRAINING_NS
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not {"secrets", "roles", "rolebindings"} & set(rule["resources"])
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    granted.setdefault((group, res), set()).update(rule["verbs"])
    crud = {"create", "get", "list", "watch", "delete"}
    # No list/watch: the operator and its trigger read one job by name (test_k8s_security_review).
    assert granted[("kubeflow.org", "pytorchjobs")] == {"create", "get", "delete"}
    # Least privilege: nothing creates a TrainJob (no Trainer v2 renderer), so no right to one.
    assert ("trainer.kubeflow.org", "trainjobs") not in granted
    assert crud <= granted[("", "pods")]
    assert "get" in granted[("", "pods/log")]
    # The step pods' result comes back through KubernetesPodOperator's xcom sidecar (an exec);
    # only the launcher role (the Airflow worker) has it, never the read-only watcher.
    assert {"create", "get"} <= granted[("", "pods/exec")]
    watcher = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] != "arf-step-launcher")
    assert not any("pods/exec" in rule["resources"] for rule in watcher["rules"])


def test_rbac_binds_the_service_accounts_airflow_yaml_names():
    values = _load("airflow.yaml")
    worker = values["workers"]["kubernetes"]["serviceAccount"]["name"]
    triggerer = values["triggerer"]["serviceAccount"]["name"]
    docs = _rbac()
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    bound: dict[str, str] = {}
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["metadata"]["namespace"] == TRAINING_NS
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == AIRFLOW_NS
            bound[subject["name"]] = binding["roleRef"]["name"]
    assert set(bound) == {worker, triggerer}
    # The triggerer waits, and deletes only what a user kills while it is deferred (the
    # triggers' on_kill run there): the job and the pod, nothing else, never create.
    for rule in roles[bound[triggerer]]["rules"]:
        reads = {"get", "list", "watch"}
        if rule["resources"] == ["pytorchjobs"]:
            assert set(rule["verbs"]) == {"get", "delete"}, rule
        elif rule["resources"] == ["pods"]:
            assert set(rule["verbs"]) == reads | {"delete"}, rule
        else:
            assert set(rule["verbs"]) <= reads, rule
