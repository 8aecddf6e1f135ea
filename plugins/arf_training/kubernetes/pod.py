"""One step as a v1 Pod, and the pod template every Kubernetes workload of ARF shares.

`render_pod` is for the single-process steps (prepare, register, evaluate, and train when its
world size is 1). `pod_template` is the part the distributed renderers reuse (PyTorchJob replicas
get the same container, volumes, security context and scheduling, with the container named as
their operator requires).

What a step's pod looks like, and why:

* **Command and environment** are the StepSpec's (`arf-trainer <step>` or the template's own
  command) with exactly `spec.env`, remapped to the pod's workspace mount (see
  `arf_training.kubernetes.config`), plus the plumbing the local backend adds too
  (`PYTHONUNBUFFERED`, `OMP_NUM_THREADS`, ...). The job spec travels inline as
  `ARF_JOB_SPEC_JSON`, which `arf_trainer.spec.StepEnv` accepts: no ConfigMap to create, own
  and garbage-collect per try.
* **Credentials** come only from Secrets (`envFrom` / `secretKeyRef`); no value is ever inlined.
* **Restricted security** (Pod Security Standard "restricted"): non-root uid 10001, no privilege
  escalation, all capabilities dropped, RuntimeDefault seccomp, read-only root filesystem with
  writable emptyDirs for /tmp (and /dev/shm for multi-process training) and the workspace volume.
* **No API token** unless a service account is configured: training talks to no Kubernetes API.
* **Preemption**: `terminationGracePeriodSeconds` = the template's preemption grace + a margin,
  so that the SIGTERM checkpoint completes before the kubelet's SIGKILL. Note that a cloud's spot
  reclaim notice (about 30 s on GKE/Azure, 2 min on AWS) caps what any grace period can buy.
* **Names** are deterministic per (dag_id, run_id, task_id, try_number): a retried or re-submitted
  task finds its own pod instead of starting a duplicate (`arf_training.kubernetes.ownership`:
  names, labels and annotations).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from arf_training.kubernetes.config import KubernetesConfigError, KubernetesSettings
from arf_training.kubernetes.ownership import annotations_for, labels_for, resource_name
from arf_training.stepspec import DEFAULT_IMAGE, RunIdentity, StepSpec

RUN_AS_UID = 10001


def restricted_container_security_context() -> dict[str, Any]:
    """A container securityContext the "restricted" Pod Security Standard admits, with a
    read-only root filesystem (a fresh dict: callers may extend it)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_UID,
        "runAsGroup": RUN_AS_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# Beyond Kubernetes' own limits: a Pod spec lives in etcd (about 1.5 MiB per object).
MAX_JOB_SPEC_BYTES = 512 * 1024
CONTAINER_NAME = "step"
HUB_WRITERS = frozenset({"evaluate"})  # steps that write data hub tables
# Steps that never talk to MLflow (prepare reads the hub and writes shards): no tracking Secret.
UNTRACKED_STEPS = frozenset({"prepare"})
TMP_DIR = "/tmp"
_SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY", re.I)


def quantity(value: float | int | str) -> str:
    """A Kubernetes quantity string: 1.0 -> "1", "500m" stays."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cpu_cores(value: float | int | str) -> float:
    text = str(value)
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return 1.0


def literal(value: str) -> str:
    """`value` escaped against Kubernetes' `$(VAR)` expansion of env values and commands.

    The kubelet replaces `$(NAME)` with the value of a variable defined earlier (an `envFrom`
    Secret's too) and `$$` with `$`. Values that carry user input (the job spec with the trigger
    conf's dataset query and hyperparameters, a template's command) must reach the step as
    written: otherwise `$(MLFLOW_TRACKING_PASSWORD)` in a conf would copy a Secret's value into
    the job spec, which the step records in MLflow. `$` -> `$$` is exact: the kubelet turns
    every `$$` back into `$` and expands nothing else.
    """
    return value.replace("$", "$$")


def pod_workspace(spec: StepSpec, settings: KubernetesSettings) -> PurePosixPath:
    """The run workspace inside the pod: `<mount>/<dag_id>/<run_id>` (the keying of
    `stepspec.workspace_for`, whose last two parts the spec's workspace already is)."""
    return PurePosixPath(settings.workspace_mount_path) / spec.workspace.parent.name / \
        spec.workspace.name


def _local_path(uri: str) -> str | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return parsed.path
    return uri if parsed.scheme == "" and uri.startswith("/") else None


def pod_env(spec: StepSpec, settings: KubernetesSettings) -> dict[str, str]:
    """`spec.env` as the pod sees it: workspace paths remapped, service URIs from the settings.

    Every value starting with the spec's workspace gets the pod's workspace as prefix instead,
    so ARF_WORKSPACE, ARF_RESULT_PATH, ARF_CHECKPOINT_DIR, ... stay consistent with each other
    whatever root the Airflow side used.
    """
    local, mapped = str(spec.workspace), str(pod_workspace(spec, settings))
    env: dict[str, str] = {}
    for key, value in spec.env.items():
        if value == local or value.startswith(local + "/"):
            value = mapped + value[len(local):]
        env[key] = value
    env["ARF_TRACKING_URI"] = settings.tracking_uri
    env["ARF_ARTIFACT_ROOT"] = settings.artifact_root
    env["ARF_DATAHUB_URI"] = settings.datahub_uri
    return env


def _check_no_literal_secrets(env: dict[str, str]) -> None:
    for key, value in env.items():
        if _SECRET_WORDS.search(key) and value:
            raise KubernetesConfigError(
                f"environment variable {key} of the step would carry a literal value; credentials "
                "must come from a Secret: name it in ARF_K8S_SECRET_ENV "
                f"('{{\"{key}\": \"secret-name/key\"}}') or ARF_K8S_MLFLOW_SECRET")
        if "://" in value and urlparse(value).password:
            raise KubernetesConfigError(
                f"environment variable {key} holds a URI with a password; remove it and inject "
                "the credentials from a Secret (ARF_K8S_MLFLOW_SECRET / ARF_K8S_DATAHUB_SECRET)")


def container_env(spec: StepSpec, settings: KubernetesSettings) -> list[dict[str, Any]]:
    """The container's `env`: the step's variables, the plumbing, the job spec, secret refs."""
    env = pod_env(spec, settings)
    _check_no_literal_secrets(env)
    cores = _cpu_cores(spec.resources.cpu)
    plumbing = {
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # Threads per process: the pod's cores shared by its processes (the local backend's rule).
        "OMP_NUM_THREADS": str(max(1, int(cores // spec.procs_per_node))),
        # The root filesystem is read-only: caches of pip, torch, matplotlib go to /tmp.
        "HOME": TMP_DIR,
        "XDG_CACHE_HOME": f"{TMP_DIR}/.cache",
    }
    if spec.nodes > 1:
        # Same reason as the local backend: torchrun's shared rendezvous store misroutes restarts.
        plumbing["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    job_spec = json.dumps(spec.job_spec, sort_keys=True, separators=(",", ":"))
    if len(job_spec.encode()) > MAX_JOB_SPEC_BYTES:
        raise KubernetesConfigError(
            f"the job spec of step {spec.step!r} is {len(job_spec.encode())} bytes, over the "
            f"{MAX_JOB_SPEC_BYTES} a pod spec can carry; shorten the template's dataset.query or "
            "the trigger conf")
    secret_names = {name for name, _, _ in settings.secret_env}
    # A variable given by a Secret wins over a plain one of the same name (a duplicate name
    # is refused by the API server's strict validation, and the plain one would show the value).
    items = [{"name": k, "value": literal(v)} for k, v in {**plumbing, **env}.items()
             if k not in secret_names]
    items.append({"name": "ARF_JOB_SPEC_JSON", "value": literal(job_spec)})
    items += [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
              for name, secret, key in settings.secret_env]
    return items


def _resources(spec: StepSpec) -> dict[str, Any]:
    """Requests for cpu/memory; limits for memory (and GPUs, which need request == limit).

    No CPU limit on purpose: CFS throttling stalls collective operations of every rank, while
    the request already reserves the cores for scheduling.
    """
    requests = {"cpu": quantity(spec.resources.cpu), "memory": quantity(spec.resources.memory)}
    limits = {"memory": quantity(spec.resources.memory)}
    if spec.resources.gpu > 0:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.resources.gpu)
    return {"requests": requests, "limits": limits}


def _affinity_and_tolerations(spec: StepSpec, settings: KubernetesSettings
                              ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    tolerations = [dict(t) for t in settings.tolerations]
    if spec.resources.gpu > 0:
        # GPU pools are usually tainted with the resource name (GKE, AKS, the GPU operator).
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if not getattr(spec.resources, "spot", False):
        return None, tolerations
    tolerations.append({"key": settings.spot_toleration_key, "operator": "Equal",
                        "value": settings.spot_toleration_value, "effect": "NoSchedule"})
    key, value = settings.spot_node_label
    term = {"matchExpressions": [{"key": key, "operator": "In", "values": [value]}]}
    if settings.spot_affinity == "required":
        node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution":
                         {"nodeSelectorTerms": [term]}}
    else:
        # Preferred: fall back to on-demand nodes when the spot pool is empty.
        node_affinity = {"preferredDuringSchedulingIgnoredDuringExecution":
                         [{"weight": 100, "preference": term}]}
    return {"nodeAffinity": node_affinity}, tolerations


def _volumes(spec: StepSpec, settings: KubernetesSettings
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_DIR}]
    if settings.workspace_pvc:
        volumes.append({"name": "workspace",
                        "persistentVolumeClaim": {"claimName": settings.workspace_pvc}})
    else:
        volumes.append({"name": "workspace", "emptyDir": {}})
    mounts.append({"name": "workspace", "mountPath": settings.workspace_mount_path})
    datahub = _local_path(settings.datahub_uri)
    if settings.datahub_pvc and datahub:
        # Read-only for the steps that only query the hub; evaluate appends its failed episodes
        # to the `failures` table.
        read_only = spec.step not in HUB_WRITERS
        volumes.append({"name": "datahub", "persistentVolumeClaim": {
            "claimName": settings.datahub_pvc, "readOnly": read_only}})
        mounts.append({"name": "datahub", "mountPath": datahub, "readOnly": read_only})
    if spec.world_size > 1 or spec.resources.gpu > 0:
        # DataLoader workers and NCCL exchange tensors through /dev/shm (64 MiB by default).
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def container(spec: StepSpec, settings: KubernetesSettings, *, name: str = CONTAINER_NAME,
              command: list[str] | None = None) -> dict[str, Any]:
    """The step's container; `command` replaces `spec.command` (e.g. wrapped in torchrun; the
    caller escapes the parts of it that must not be expanded, `literal`)."""
    _, mounts = _volumes(spec, settings)
    return {
        "name": name,
        # The override replaces the built-in recipes' image only: a template's own image
        # (training.command.image) is its framework and stays.
        "image": settings.image if settings.image and spec.image == DEFAULT_IMAGE else spec.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(command) if command else [literal(c) for c in spec.command],
        # No workingDir: the runtime would create a missing run workspace on the volume as root,
        # and the non-root step could not write into it; steps use absolute ARF_* paths.
        "env": container_env(spec, settings),
        "envFrom": [{"secretRef": {"name": s}} for s in (
            None if spec.step in UNTRACKED_STEPS else settings.mlflow_secret,
            settings.datahub_secret) if s],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": restricted_container_security_context(),
    }


def _init_containers(spec: StepSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """`spec.setup_command` (a template's own command: `arf-trainer custom-setup`) as an init
    container in the default image, with the step's env and volumes: it writes the MLflow run
    and base model into the workspace before the command starts (arf_training.custom_launch)."""
    if not spec.setup_command:
        return {}
    setup = dataclasses.replace(spec, image=DEFAULT_IMAGE, command=list(spec.setup_command))
    return {"initContainers": [container(setup, settings, name="arf-setup")]}


def pod_template(spec: StepSpec, identity: RunIdentity, settings: KubernetesSettings, *,
                 name: str, container_name: str = CONTAINER_NAME,
                 command: list[str] | None = None,
                 ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`{"metadata": ..., "spec": ...}` of a step's pod, without restartPolicy and deadline
    (a bare Pod and a PyTorchJob replica set those differently)."""
    volumes, _ = _volumes(spec, settings)
    affinity, tolerations = _affinity_and_tolerations(spec, settings)
    box = container(spec, settings, name=container_name, command=command)
    if ports:
        box["ports"] = ports
    pod_spec: dict[str, Any] = {
        "containers": [box],
        **_init_containers(spec, settings),
        "volumes": volumes,
        "automountServiceAccountToken": bool(settings.service_account),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": int(spec.grace_s) + settings.termination_margin_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID,
            # Without it the kubelet chowns every file of the workspace and data hub volumes
            # at each step's start (minutes on a large hub); the root's group decides instead.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if affinity:
        pod_spec["affinity"] = affinity
    if settings.priority_class:
        pod_spec["priorityClassName"] = settings.priority_class
    annotations = annotations_for(identity)
    if settings.volcano_queue:
        pod_spec["schedulerName"] = "volcano"
        annotations["scheduling.volcano.sh/queue-name"] = settings.volcano_queue
    return {"metadata": {"labels": labels_for(identity, spec, name),
                         "annotations": annotations},
            "spec": pod_spec}


def render_pod(spec: StepSpec, identity: RunIdentity, settings: KubernetesSettings
               ) -> dict[str, Any]:
    """A v1 Pod that runs `spec` once: restartPolicy Never (Airflow owns retries; exit 75 gets a
    new pod from the operator, `restarts`) and the template's timeout as activeDeadlineSeconds
    (the kubelet stops it even if Airflow is gone)."""
    name = resource_name(identity)
    template = pod_template(spec, identity, settings, name=name)
    metadata = {"name": name, "namespace": settings.namespace, **template["metadata"]}
    if settings.kueue_queue:
        metadata["labels"]["kueue.x-k8s.io/queue-name"] = settings.kueue_queue
    pod_spec = template["spec"]
    pod_spec["restartPolicy"] = "Never"
    pod_spec["activeDeadlineSeconds"] = max(1, int(spec.timeout_s))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def container_exit_code(pod: Any, container: str = CONTAINER_NAME) -> int | None:
    """The exit code of `container` in a V1Pod (current or last state), if it terminated."""
    status = getattr(pod, "status", None)
    for item in getattr(status, "container_statuses", None) or []:
        if item.name != container:
            continue
        for state in (item.state, item.last_state):
            terminated = getattr(state, "terminated", None) if state else None
            if terminated is not None and terminated.exit_code is not None:
                return int(terminated.exit_code)
    return None
