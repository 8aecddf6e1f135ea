"""Review findings on the Kubernetes renderers: each test failed before its fix."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from arf_training.kubernetes import KubernetesSettings, render_pod
from arf_training.kubernetes.config import KubernetesConfigError
from arf_training.kubernetes.jobs import PyTorchJobRenderer
from arf_training.kubernetes.render import pod_arf_settings
from arf_training.stepspec import RunIdentity, build_step_spec
from arf_training.templates import load_template

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "config_templates" / "digits_smoke.yaml"


def kubelet_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (third_party/forked/golang/expansion): `$$` -> `$`,
    `$(NAME)` -> env[NAME] when defined, anything else as written."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2:end]
                    out.append(env[name] if name in env else value[i:end + 1])
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def _identity(step_task: str = "prepare_data") -> RunIdentity:
    return RunIdentity(dag_id="digits_smoke", run_id="manual__x", task_id=step_task,
                       try_number=1)


def _as_kubelet_runs(box: dict[str, Any], secrets: dict[str, str]) -> tuple[dict[str, str],
                                                                            list[str]]:
    """The container's environment and command after the kubelet's expansion, with the
    `envFrom` Secret's variables defined first (as the kubelet does)."""
    env = dict(secrets)
    for item in box["env"]:
        if "value" in item:
            env[item["name"]] = kubelet_expand(item["value"], env)
        else:
            env[item["name"]] = secrets.get(item["name"], "")
    return env, [kubelet_expand(c, env) for c in box["command"]]


@pytest.mark.parametrize("query", [
    pytest.param("SELECT '$(MLFLOW_TRACKING_PASSWORD)' AS leak FROM episodes", id="secret-ref"),
    pytest.param("SELECT $$dollar quoted$$ AS s FROM episodes", id="dollar-quote"),
])
def test_user_values_reach_the_step_as_written(query):
    """A trigger conf's `$(VAR)` must not pull a Secret's value into the job spec (which the
    step records in MLflow), and `$$` must stay `$$`."""
    loaded = load_template(SMOKE)
    settings = dataclasses.replace(KubernetesSettings.from_env({}), mlflow_secret="arf-mlflow")
    spec = build_step_spec(loaded, "prepare", _identity(), {"dataset_query": query},
                           pod_arf_settings(settings))
    box = render_pod(spec, _identity(), settings)["spec"]["containers"][0]
    env, _ = _as_kubelet_runs(box, {"MLFLOW_TRACKING_PASSWORD": "hunter2"})
    assert "hunter2" not in env["ARF_JOB_SPEC_JSON"]
    assert json.loads(env["ARF_JOB_SPEC_JSON"]) == spec.job_spec
    for name, value in spec.env.items():
        if name in env and not name.startswith("ARF_") or name in ("ARF_DAG_ID", "ARF_RUN_ID"):
            assert env[name] == value


def test_a_steps_command_reaches_the_step_as_written_and_torchrun_flags_expand():
    loaded = load_template(SMOKE)
    settings = KubernetesSettings.from_env({})
    identity = _identity("train")
    spec = build_step_spec(loaded, "train", identity, {}, pod_arf_settings(settings))
    command = ["sh", "-c", 'echo "$(PGPASSWORD)" $$ ${HOME}']
    spec = dataclasses.replace(spec, command=command, nodes=2, procs_per_node=1)
    secrets = {"PGPASSWORD": "hunter2", "RANK": "1", "MASTER_ADDR": "m", "MASTER_PORT": "1"}
    pod = render_pod(dataclasses.replace(spec, nodes=1), identity, settings)
    _, ran = _as_kubelet_runs(pod["spec"]["containers"][0], secrets)
    assert ran == command
    job = PyTorchJobRenderer().render(spec, identity, settings)
    box = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    _, ran = _as_kubelet_runs(box, secrets)
    assert ran[-len(command):] == command
    assert "--node-rank=1" in ran and "--master-addr=m" in ran


@pytest.mark.parametrize("env, words", [
    pytest.param({"ARF_K8S_NAMESPACE": ""}, "ARF_K8S_NAMESPACE", id="empty-namespace"),
    pytest.param({"ARF_K8S_WORKSPACE_MOUNT": "/tmp"}, "ARF_K8S_WORKSPACE_MOUNT", id="mount-tmp"),
    pytest.param({"ARF_K8S_WORKSPACE_MOUNT": "/"}, "ARF_K8S_WORKSPACE_MOUNT", id="mount-root"),
    pytest.param({"ARF_K8S_WORKSPACE_MOUNT": "/datahub/"}, "ARF_K8S_WORKSPACE_MOUNT",
                 id="mount-on-datahub"),
    pytest.param({"ARF_K8S_KUEUE_QUEUE": "q" * 64}, "ARF_K8S_KUEUE_QUEUE", id="kueue-64"),
    pytest.param({"ARF_K8S_SPOT_TOLERATION_KEY": "bad key!"}, "ARF_K8S_SPOT_TOLERATION_KEY",
                 id="spot-key"),
    pytest.param({"ARF_K8S_SPOT_TOLERATION_VALUE": "x y"}, "ARF_K8S_SPOT_TOLERATION_VALUE",
                 id="spot-value"),
    pytest.param({"ARF_K8S_SECRET_ENV": '{"ARF_JOB_SPEC_JSON": "s/k"}'}, "ARF_JOB_SPEC_JSON",
                 id="secret-env-job-spec"),
])
def test_settings_that_would_render_a_pod_the_api_server_refuses_fail_clearly(env, words):
    """Before: an empty namespace, two volumes at one mount path, a label value over 63
    characters, a bad taint or a duplicate env name rendered and failed only at the API."""
    with pytest.raises(KubernetesConfigError, match=re.escape(words)):
        KubernetesSettings.from_env(env)


def test_the_default_and_usual_settings_still_load():
    KubernetesSettings.from_env({})
    KubernetesSettings.from_env({"ARF_K8S_WORKSPACE_MOUNT": "/work", "ARF_K8S_DATAHUB_PVC": "",
                                 "ARF_K8S_DATAHUB_URI": "/work"})
