"""Kubernetes renderers: every shipped template and step renders manifests the API server accepts.

Pods (and each PyTorchJob replica's pod template) are validated with `kubernetes-validate` in
strict mode for the oldest and newest Kubernetes we support; PyTorchJobs against the vendored
Kubeflow CRD schema (tests/schemas). No cluster needed: the renderers are pure functions.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from arf_training.kubernetes import (
    KubernetesConfigError,
    KubernetesSettings,
    PyTorchJobRenderer,
    render_pod,
    render_step_manifests,
    resource_name,
)
from arf_training.kubernetes.jobs import JOB_NAME_MAX
from arf_training.kubernetes.render import placeholder_identity, steps_of
from arf_training.settings import ArfSettings
from arf_training.stepspec import RunIdentity, build_step_spec
from arf_training.templates import Distributed, LoadedTemplate, load_template, template_files

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "schemas"
K8S_VERSIONS = ("1.30", "1.33")
DNS1123_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# Federated templates do not run on Kubernetes yet (the factory reports them; test_federated_dag).
SHIPPED = [t for t in map(load_template, template_files(REPO / "config_templates"))
           if t.template.federated is None]
CASES = [pytest.param(t, step, id=f"{t.name}-{step}") for t in SHIPPED for step in steps_of(t)]
# A pod cannot reach the embedded PostgreSQL: a deployment names its Optuna database (the
# password comes from a Secret, e.g. ARF_K8S_SECRET_ENV's PGPASSWORD, never from the URL).
OPTUNA_STORAGE = "postgresql+psycopg://optuna@postgres.arf.svc/optuna"


@pytest.fixture(autouse=True)
def _optuna_storage(monkeypatch):
    monkeypatch.setenv("ARF_OPTUNA_STORAGE", OPTUNA_STORAGE)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as `kubectl apply --validate=strict` does
    (the API server would otherwise prune a misspelled field silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / "kubeflow.org_pytorchjobs.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is checked by the API server itself, not by the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def _settings(**overrides: Any) -> KubernetesSettings:
    return dataclasses.replace(KubernetesSettings.from_env({}), **overrides)


def _reach(**training: Any) -> LoadedTemplate:
    """reach_bc with some `training` fields replaced (e.g. more nodes, GPUs, spot)."""
    loaded = next(t for t in SHIPPED if t.name == "reach_bc")
    tr = loaded.template.training
    if "resources" in training:
        training["resources"] = tr.resources.model_copy(update=training["resources"])
    template = loaded.template.model_copy(update={"training": tr.model_copy(update=training)})
    return dataclasses.replace(loaded, template=template)


def _render(loaded: LoadedTemplate, step: str, settings: KubernetesSettings | None = None
            ) -> dict[str, Any]:
    (manifest,) = render_step_manifests(loaded, step, settings or _settings(),
                                        placeholder_identity(loaded.name, step))
    return manifest


def _pods_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod (specs) a manifest creates: itself, or each replica template as a Pod."""
    if manifest["kind"] == "Pod":
        return [manifest]
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{manifest['metadata']['name']}-{rtype.lower()}-0",
                          **replica["template"]["metadata"]},
             "spec": {**replica["template"]["spec"], "restartPolicy": "Never"}}
            for rtype, replica in manifest["spec"]["pytorchReplicaSpecs"].items()]


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    (box,) = pod["spec"]["containers"]
    return box


def _env(box: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in box["env"] if "value" in e}


# --- every shipped template, every step ------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("loaded, step", CASES)
def test_shipped_steps_are_valid_kubernetes(loaded, step, version, pytorchjob_schema):
    manifest = _render(loaded, step)
    if manifest["kind"] == "PyTorchJob":
        jsonschema.validate(manifest, pytorchjob_schema)
    for pod in _pods_of(manifest):
        assert kubernetes_validate.validate(pod, version, strict=True) == version


@pytest.mark.parametrize("loaded, step", CASES)
def test_train_is_a_pytorchjob_exactly_when_world_size_is_above_one(loaded, step):
    manifest = _render(loaded, step)
    multi = step == "train" and loaded.template.training.distributed.world_size > 1
    assert manifest["kind"] == ("PyTorchJob" if multi else "Pod")
    assert manifest["metadata"]["namespace"] == "arf-training"


def test_invalid_manifests_are_caught_by_the_validators(pytorchjob_schema):
    """The validation above has teeth: a misspelled field fails strict mode."""
    pod = _render(SHIPPED[0], "prepare")
    _container(pod)["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.33", strict=True)
    job = _render(_reach(), "train")
    job["spec"]["runPolicy"]["cleanupPolicy"] = "All"
    with pytest.raises(jsonschema.ValidationError, match="cleanupPolicy"):
        jsonschema.validate(job, pytorchjob_schema)
    job = _render(_reach(), "train")
    job["spec"]["nprocPerNode"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, pytorchjob_schema)


# --- names and labels ------------------------------------------------------------------------


def test_names_are_deterministic_dns1123_and_unique_per_try():
    ident = RunIdentity("reach_bc", "manual__2026-11-26T10:48:06+00:00", "train", 1)
    assert resource_name(ident) == resource_name(dataclasses.replace(ident))
    others = {resource_name(dataclasses.replace(ident, try_number=2)),
              resource_name(dataclasses.replace(ident, run_id="scheduled__x")),
              resource_name(dataclasses.replace(ident, task_id="prepare_data"))}
    assert resource_name(ident) not in others and len(others) == 3
    long = RunIdentity("d" * 63, "r" * 250, "group_" + "t" * 200, 7)
    for ident_ in (ident, long, RunIdentity("9lives", "r", "_x_", 1)):
        for limit in (63, JOB_NAME_MAX):
            name = resource_name(ident_, limit)
            assert DNS1123_LABEL.match(name), name
            assert len(name) <= limit
    assert resource_name(long) != resource_name(dataclasses.replace(long, try_number=8))


def test_labels_carry_the_identity_and_are_valid():
    ident = RunIdentity("reach_bc", "manual__2026-11-26T10:48:06+00:00", "train", 3)
    loaded = next(t for t in SHIPPED if t.name == "digits_sklearn")
    spec = build_step_spec(loaded, "prepare", ident, {}, ArfSettings.from_env())
    pod = render_pod(spec, ident, _settings())
    labels = pod["metadata"]["labels"]
    assert labels["arf.dev/dag-id"] == "reach_bc"
    assert labels["arf.dev/task-id"] == "train"
    assert labels["arf.dev/try-number"] == "3"
    assert ":" not in labels["arf.dev/run-id"] and len(labels["arf.dev/run-id"]) <= 63
    assert pod["metadata"]["annotations"]["arf.dev/run-id"] == ident.run_id
    assert labels["app.kubernetes.io/instance"] == pod["metadata"]["name"]
    kubernetes_validate.validate(pod, "1.33", strict=True)


# --- pod contents ----------------------------------------------------------------------------


def test_restricted_security_context_and_no_token():
    pod = _render(SHIPPED[0], "prepare")
    spec, box = pod["spec"], _container(pod)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = box["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
    assert mounts["/tmp"] == "tmp" and mounts["/workspace"] == "workspace"
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec
    assert spec["restartPolicy"] == "Never"
    with_sa = _render(SHIPPED[0], "prepare", _settings(service_account="arf-trainer"))["spec"]
    assert with_sa["serviceAccountName"] == "arf-trainer"
    assert with_sa["automountServiceAccountToken"] is True


def test_command_env_and_job_spec_follow_the_step_contract():
    """The pod's env is what arf-trainer reads: StepEnv parses it (job spec inline)."""
    from arf_trainer.spec import StepEnv

    loaded = next(t for t in SHIPPED if t.name == "reach_bc")
    pod = _render(loaded, "register")
    box = _container(pod)
    assert box["command"] == ["arf-trainer", "register"]
    env = _env(box)
    step_env = StepEnv.from_environ(env)
    assert step_env.spec.step == "register"
    assert step_env.spec.run.dag_id == "reach_bc"
    assert str(step_env.workspace) == "/workspace/reach_bc/manual__placeholder"
    assert env["ARF_RESULT_PATH"].startswith("/workspace/reach_bc/manual__placeholder/")
    assert env["ARF_TRACKING_URI"] == "http://mlflow:5000"
    assert pod["spec"]["activeDeadlineSeconds"] == loaded.template.training.timeout_minutes * 60


def test_local_workspace_paths_are_remapped_to_the_mount(tmp_path, monkeypatch):
    """A StepSpec built on the Airflow worker (local root) gets pod paths, consistently."""
    monkeypatch.setenv("ARF_WORKSPACE_ROOT", str(tmp_path / "ws"))
    ident = RunIdentity("reach_bc", "manual__1", "train", 1)
    loaded = next(t for t in SHIPPED if t.name == "digits_sklearn")
    spec = build_step_spec(loaded, "train", ident, {}, ArfSettings.from_env())
    assert str(spec.workspace).startswith(str(tmp_path))
    env = _env(_container(render_pod(spec, ident, _settings(workspace_mount_path="/data"))))
    assert env["ARF_WORKSPACE"] == "/data/reach_bc/manual__1"
    for key in ("ARF_RESULT_PATH", "ARF_CHECKPOINT_DIR", "ARF_DATA_DIR", "ARF_OUTPUT_DIR"):
        assert env[key].startswith("/data/reach_bc/manual__1/"), (key, env[key])
    assert not any(str(tmp_path) in v for v in env.values())


def test_image_override_applies_to_built_in_recipes_only():
    settings = _settings(image="registry.example/arf-trainer@sha256:" + "a" * 64)
    recipe = _container(_render(next(t for t in SHIPPED if t.name == "reach_bc"), "prepare",
                                settings))
    assert recipe["image"] == settings.image
    # The single-process example (digits_lightning's 2 processes render a PyTorchJob).
    custom_template = next(t for t in SHIPPED if t.name == "digits_sklearn")
    assert custom_template.template.training.command is not None
    custom = _container(_render(custom_template, "train", settings))
    assert custom["image"] == custom_template.template.training.command.image
    # The user's command, started by the launch wrapper (arf_training.custom_launch)...
    own = custom_template.template.training.command.command
    assert custom["command"][:2] == ["/bin/sh", "-c"] and custom["command"][-len(own):] == own
    # ...after `arf-trainer custom-setup` in the (overridden) default image, on the same volume.
    (setup,) = _render(custom_template, "train", settings)["spec"]["initContainers"]
    assert setup["image"] == settings.image
    assert setup["command"] == ["arf-trainer", "custom-setup"]
    assert setup["volumeMounts"] == custom["volumeMounts"]
    setup_env = {e["name"]: e.get("value") for e in setup["env"]}
    assert setup_env["ARF_CUSTOM_ENV"] == _env(custom)["ARF_CUSTOM_ENV"]
    assert setup_env["ARF_CUSTOM_ENV"].startswith("/workspace/")


def test_gpu_resources_and_toleration():
    manifest = _render(_reach(resources={"gpu": 2, "cpu": "8", "memory": "32Gi"}), "train")
    (pod,) = _pods_of(manifest)
    res = _container(pod)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2" == res["requests"]["nvidia.com/gpu"]
    assert res["requests"]["cpu"] == "8" and res["limits"]["memory"] == "32Gi"
    assert "cpu" not in res["limits"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod["spec"]["tolerations"]
    cpu_only = _container(_render(SHIPPED[0], "prepare"))["resources"]
    assert "nvidia.com/gpu" not in {**cpu_only["limits"], **cpu_only["requests"]}


@pytest.mark.parametrize("mode, key", [
    pytest.param("preferred", "preferredDuringSchedulingIgnoredDuringExecution", id="preferred"),
    pytest.param("required", "requiredDuringSchedulingIgnoredDuringExecution", id="required"),
])
def test_spot_adds_toleration_affinity_and_grace(mode, key):
    settings = _settings(spot_affinity=mode, spot_toleration_key="cloud.google.com/gke-spot",
                         spot_node_label=("cloud.google.com/gke-spot", "true"))
    loaded = _reach(resources={"spot": True}, preemption_grace_seconds=120)
    for step in ("prepare", "train"):
        for pod in _pods_of(_render(loaded, step, settings)):
            spec = pod["spec"]
            assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                    "effect": "NoSchedule"} in spec["tolerations"]
            assert key in spec["affinity"]["nodeAffinity"]
            assert "cloud.google.com/gke-spot" in json.dumps(spec["affinity"])
            assert spec["terminationGracePeriodSeconds"] == 120 + settings.termination_margin_s
            kubernetes_validate.validate(pod, "1.33", strict=True)
    plain = _render(_reach(), "prepare", settings)["spec"]
    assert "affinity" not in plain and "tolerations" not in plain


def test_scheduling_settings():
    settings = _settings(node_selector={"pool": "training"}, priority_class="training-low",
                         tolerations=({"key": "dedicated", "operator": "Exists"},),
                         kueue_queue="team-a")
    pod = _render(SHIPPED[0], "prepare", settings)
    assert pod["spec"]["nodeSelector"] == {"pool": "training"}
    assert pod["spec"]["priorityClassName"] == "training-low"
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert {"key": "dedicated", "operator": "Exists"} in pod["spec"]["tolerations"]
    job = _render(_reach(), "train", settings)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    volcano = _render(_reach(distributed=Distributed(nodes=3, procs_per_node=2)), "train",
                      _settings(volcano_queue="gpu", priority_class="high"))
    assert volcano["spec"]["runPolicy"]["schedulingPolicy"] == {
        "queue": "gpu", "minAvailable": 3, "priorityClass": "high"}


# --- secrets ---------------------------------------------------------------------------------


def test_credentials_come_from_secrets_only():
    settings = _settings(mlflow_secret="mlflow-credentials", datahub_secret="datahub-credentials",
                         secret_env=(("AWS_SECRET_ACCESS_KEY", "arf-s3", "secret-key"),))
    for loaded, step in [(c.values[0], c.values[1]) for c in CASES]:
        for pod in _pods_of(_render(loaded, step, settings)):
            box = _container(pod)
            # prepare never talks to MLflow (test_k8s_security_review): no tracking Secret.
            tracking = [] if step == "prepare" else [{"secretRef": {"name": "mlflow-credentials"}}]
            assert box["envFrom"] == [*tracking, {"secretRef": {"name": "datahub-credentials"}}]
            refs = [e for e in box["env"] if "valueFrom" in e]
            assert refs == [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {
                "secretKeyRef": {"name": "arf-s3", "key": "secret-key"}}}]
            for item in box["env"]:
                if "value" in item:
                    assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", item["name"]), item
                    assert not re.search(r"://[^/@\s]+:[^/@\s]+@", item["value"]), item["name"]


def test_the_optuna_storage_url_can_come_from_a_secret_and_then_never_stands_in_clear(
        monkeypatch):
    """Its URL carries the database password: with ARF_K8S_SECRET_ENV naming it, the trial pods
    get a secretKeyRef only, whether or not the Airflow side also has the URL in its env."""
    [hpo] = [t for t in SHIPPED if t.template.hpo is not None][:1]
    settings = _settings(secret_env=(("ARF_OPTUNA_STORAGE", "arf-optuna", "url"),))
    secret_url = "postgresql+psycopg://optuna:hunter2@postgres.arf.svc/optuna"
    for value in (None, secret_url):
        if value is None:
            monkeypatch.delenv("ARF_OPTUNA_STORAGE", raising=False)
        else:
            monkeypatch.setenv("ARF_OPTUNA_STORAGE", value)
        for pod in _pods_of(_render(hpo, "train", settings)):
            env = _container(pod)["env"]
            storage = [e for e in env if e["name"] == "ARF_OPTUNA_STORAGE"]
            assert storage == [{"name": "ARF_OPTUNA_STORAGE", "valueFrom": {
                "secretKeyRef": {"name": "arf-optuna", "key": "url"}}}]
            assert "hunter2" not in json.dumps(pod)
    monkeypatch.delenv("ARF_OPTUNA_STORAGE")
    with pytest.raises(KubernetesConfigError, match="ARF_K8S_SECRET_ENV.*ARF_OPTUNA_STORAGE"):
        _render(hpo, "train", _settings())


def test_literal_secrets_are_refused():
    ident = RunIdentity("reach_bc", "manual__1", "prepare_data", 1)
    spec = build_step_spec(SHIPPED[0], "prepare", ident, {}, ArfSettings.from_env())
    leaky = dataclasses.replace(spec, env={**spec.env, "MLFLOW_TRACKING_PASSWORD": "hunter2"})
    with pytest.raises(KubernetesConfigError, match="MLFLOW_TRACKING_PASSWORD.*Secret"):
        render_pod(leaky, ident, _settings())
    with pytest.raises(KubernetesConfigError, match="ARF_TRACKING_URI.*password"):
        render_pod(spec, ident, _settings(tracking_uri="https://u:hunter2@mlflow.example"))
    with pytest.raises(KubernetesConfigError, match="ARF_K8S_TRACKING_URI"):
        KubernetesSettings.from_env({"ARF_K8S_TRACKING_URI": "https://u:hunter2@mlflow.example"})


# --- PyTorchJob ------------------------------------------------------------------------------


def test_one_node_job_is_a_master_running_standalone_torchrun(pytorchjob_schema):
    job = _render(_reach(distributed=Distributed(nodes=1, procs_per_node=4)), "train")
    jsonschema.validate(job, pytorchjob_schema)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master"] and replicas["Master"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "4"
    box = _container(replicas["Master"]["template"])
    assert box["name"] == "pytorch"
    # torchrun under the replica wrapper: every rank exiting 75 (preempted) restarts the pod
    assert box["command"][:2] == ["/bin/sh", "-c"]
    assert box["command"][-6:] == ["torchrun", "--nproc-per-node=4", "--standalone",
                                   "--no-python", "arf-trainer", "train"]
    assert _env(box)["ARF_PROCS_PER_POD"] == "4" and _env(box)["ARF_EXIT_DIR"].endswith("/exits")
    assert box["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    assert "elasticPolicy" not in job["spec"]
    assert len(job["metadata"]["name"]) <= JOB_NAME_MAX


def test_three_node_job_has_master_and_two_workers(pytorchjob_schema):
    job = _render(_reach(distributed=Distributed(nodes=3, procs_per_node=2)), "train",
                  _settings(backoff_limit=5, ttl_seconds_after_finished=600,
                            clean_pod_policy="All"))
    jsonschema.validate(job, pytorchjob_schema)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 2}
    assert all(r["restartPolicy"] == "ExitCode" for r in replicas.values())
    box = _container(replicas["Worker"]["template"])
    assert box["command"][-9:] == ["torchrun", "--nproc-per-node=2", "--nnodes=3",
                                   "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)",
                                   "--master-port=$(MASTER_PORT)", "--no-python", "arf-trainer",
                                   "train"]
    assert _env(box)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert job["spec"]["runPolicy"] == {
        "cleanPodPolicy": "All", "backoffLimit": 5, "ttlSecondsAfterFinished": 600,
        "activeDeadlineSeconds": 30 * 60}
    for pod in _pods_of(job):
        kubernetes_validate.validate(pod, "1.30", strict=True)


def test_elastic_policy(pytorchjob_schema):
    job = _render(_reach(distributed=Distributed(nodes=3, procs_per_node=2)), "train",
                  _settings(elastic=True, max_restarts=7))
    jsonschema.validate(job, pytorchjob_schema)
    assert job["spec"]["elasticPolicy"] == {
        "rdzvBackend": "c10d", "rdzvId": job["metadata"]["name"], "minReplicas": 3,
        "maxReplicas": 3, "maxRestarts": 7}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Worker": 3}
    command = _container(replicas["Worker"]["template"])["command"]
    assert command[command.index("torchrun"):][:3] == [
        "torchrun", "--nproc-per-node=2", "--no-python"]


def test_renderer_interface():
    renderer = PyTorchJobRenderer()
    assert (renderer.kind, renderer.api_version, renderer.plural) == (
        "PyTorchJob", "kubeflow.org/v1", "pytorchjobs")
    assert (renderer.group, renderer.version) == ("kubeflow.org", "v1")
    ident = placeholder_identity("reach_bc", "train")
    assert _render(_reach(), "train")["metadata"]["name"] == renderer.name_for(ident)


# --- settings --------------------------------------------------------------------------------


def test_settings_from_env_defaults_and_values():
    default = KubernetesSettings.from_env({})
    assert default.namespace == "arf-training" and default.service_account is None
    assert default.workspace_pvc == "arf-workspace" and default.workspace_mount_path == "/workspace"
    s = KubernetesSettings.from_env({
        "ARF_K8S_NAMESPACE": "ml", "ARF_K8S_NODE_SELECTOR": '{"pool": "gpu"}',
        "ARF_K8S_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
        "ARF_K8S_SECRET_ENV": '{"HF_TOKEN": "hf/token"}', "ARF_K8S_ELASTIC": "true",
        "ARF_K8S_SPOT_NODE_LABEL": "cloud.google.com/gke-spot=true",
        "ARF_K8S_WORKSPACE_PVC": "", "ARF_K8S_BACKOFF_LIMIT": "0"})
    assert s.namespace == "ml" and s.node_selector == {"pool": "gpu"}
    assert s.secret_env == (("HF_TOKEN", "hf", "token"),) and s.elastic is True
    assert s.spot_node_label == ("cloud.google.com/gke-spot", "true")
    assert s.workspace_pvc is None and s.backoff_limit == 0
    pod = _render(SHIPPED[0], "prepare", s)
    assert {"name": "workspace", "emptyDir": {}} in pod["spec"]["volumes"]


@pytest.mark.parametrize("env, match", [
    pytest.param({"ARF_K8S_NAMESPACE": "Bad_NS"}, "ARF_K8S_NAMESPACE='Bad_NS'", id="namespace"),
    pytest.param({"ARF_K8S_BACKOFF_LIMIT": "three"}, "ARF_K8S_BACKOFF_LIMIT", id="int"),
    pytest.param({"ARF_K8S_TTL_SECONDS_AFTER_FINISHED": "-1"}, "below the minimum", id="neg"),
    pytest.param({"ARF_K8S_NODE_SELECTOR": "{pool: gpu"}, "ARF_K8S_NODE_SELECTOR.*JSON", id="json"),
    pytest.param({"ARF_K8S_TOLERATIONS": '[{"keys": "x"}]'}, "unknown field", id="toleration"),
    pytest.param({"ARF_K8S_SECRET_ENV": '{"X": "no-key"}'}, "secret-name/key", id="secret-env"),
    pytest.param({"ARF_K8S_CLEAN_POD_POLICY": "Some"}, "ARF_K8S_CLEAN_POD_POLICY", id="choice"),
    pytest.param({"ARF_K8S_ELASTIC": "maybe"}, "ARF_K8S_ELASTIC", id="bool"),
    pytest.param({"ARF_K8S_KUEUE_QUEUE": "a", "ARF_K8S_VOLCANO_QUEUE": "b"}, "only one",
                 id="two-queues"),
    pytest.param({"ARF_K8S_WORKSPACE_URI": "s3://bucket/ws"}, "CSI", id="object-store"),
    pytest.param({"ARF_K8S_SPOT_NODE_LABEL": "spot"}, "key=value", id="spot-label"),
])
def test_bad_settings_name_the_variable(env, match):
    with pytest.raises(KubernetesConfigError, match=match):
        KubernetesSettings.from_env(env)


def test_render_names_template_and_step_on_errors():
    smoke = next(t for t in SHIPPED if t.template.evaluation is None)
    with pytest.raises(KubernetesConfigError, match=f"{smoke.name}.*evaluation"):
        render_step_manifests(smoke, "evaluate", _settings(),
                              placeholder_identity(smoke.name, "evaluate"))
    with pytest.raises(KubernetesConfigError, match="unknown step 'deploy'"):
        render_step_manifests(smoke, "deploy", _settings(),
                              placeholder_identity(smoke.name, "train"))


# --- boundaries and CLI ----------------------------------------------------------------------


def test_renderers_import_nothing_heavy():
    code = ("import sys, arf_training.kubernetes as k; "
            "print(sorted(m for m in ('torch', 'mlflow', 'airflow', 'kubernetes', 'duckdb') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_render_prints_yaml_documents():
    arf = Path(sys.executable).parent / "arf"
    out = subprocess.run([str(arf), "templates", "render", "reach_bc", "--backend", "kubernetes"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [d["kind"] for d in docs] == ["Pod", "PyTorchJob", "Pod", "Pod"]
    assert out.stdout.startswith("---\n# Source: ")
    one = subprocess.run([str(arf), "templates", "render", "reach_bc", "--step", "prepare"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert [d["kind"] for d in yaml.safe_load_all(one.stdout) if d] == ["Pod"]
    fed = subprocess.run([str(arf), "templates", "render", "reach_bc_federated", "--step",
                          "federate"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert [d["kind"] for d in yaml.safe_load_all(fed.stdout) if d] == ["Service", "Pod"] + \
        ["Pod"] * 3  # the SuperLink, a SuperNode per site
    assert "# At run time the SuperLink's job spec also carries each site's manifest metadata" \
        in fed.stdout.splitlines()[2]
    bad = subprocess.run([str(arf), "templates", "render", "no_such_template"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "no_such_template" in bad.stderr and "reach_bc" in bad.stderr


# --- data hub volume ---------------------------------------------------------------------------


def test_only_evaluate_mounts_the_data_hub_writable():
    """Steps query the hub read-only; evaluate appends its failed episodes (`failures`)."""
    settings = _settings(datahub_pvc="arf-datahub", datahub_uri="/datahub")
    seen = {}
    for loaded, step in [(c.values[0], c.values[1]) for c in CASES]:
        for pod in _pods_of(_render(loaded, step, settings)):
            (mount,) = [m for m in _container(pod)["volumeMounts"] if m["name"] == "datahub"]
            (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "datahub"]
            assert mount["mountPath"] == "/datahub"
            assert mount["readOnly"] is volume["persistentVolumeClaim"]["readOnly"]
            seen.setdefault(step, set()).add(mount["readOnly"])
    assert seen.pop("evaluate") == {False}
    assert seen and all(flags == {True} for flags in seen.values()), seen
