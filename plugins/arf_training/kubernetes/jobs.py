"""Distributed training steps as operator-managed custom resources.

`DistributedJobRenderer` is the adapter the Kubernetes backend talks to; `PyTorchJobRenderer`
renders the Kubeflow Training Operator v1 `PyTorchJob` (release-1.9 line). A Kubeflow Trainer v2
`TrainJob` renderer fits behind the same interface (see DESIGN.md, "Scale path").

How a PyTorchJob runs `arf-trainer train` (the equivalent of the local backend's torchrun
commands, `LocalStepRunner.commands`):

* Every replica pod runs `torchrun --nproc-per-node=P --no-python <spec.command>`: torchrun starts
  P processes per pod and sets RANK, LOCAL_RANK and WORLD_SIZE for each, which
  `arf_trainer.trainer.dist.DistEnv` requires (the operator's own RANK/WORLD_SIZE count pods,
  not processes), and it passes SIGTERM on so a preemption writes its checkpoint.
* One node: `--standalone`, as locally. Several nodes, static rendezvous: Master (1 replica) plus
  Worker (nodes - 1 replicas); the node rank and master endpoint are the operator's per-pod
  RANK, MASTER_ADDR and MASTER_PORT, referenced with Kubernetes' `$(VAR)` expansion so that no
  shell is needed (the operator adds those variables to the pod before it is created).
* Elastic (`ARF_K8S_ELASTIC=true`): Worker replicas only (the operator's default rendezvous host
  is `<job>-worker-0`), c10d rendezvous, min = max = nodes, `maxRestarts`; torchrun reads its
  rendezvous arguments from the `PET_*` variables the operator sets.

Replica `restartPolicy: ExitCode`: exit codes 1-127 are permanent (2 = bad input; a restart would
fail the same way), 128+ (SIGTERM/SIGKILL on preemption) restart the pod, up to
`runPolicy.backoffLimit`; the new pod resumes from the last complete checkpoint. torchrun runs
under `custom_launch.pod_wrap`, which turns "every rank of this pod exited 75" (torchrun itself
exits 1) into 143, so a preempted job restarts like a SIGTERMed pod; the ranks record their codes
(a template's own command through its wrapper, arf-trainer by itself).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from arf_training import custom_launch
from arf_training.kubernetes.config import KubernetesSettings
from arf_training.kubernetes.ownership import resource_name
from arf_training.kubernetes.pod import literal, pod_template
from arf_training.stepspec import RunIdentity, StepSpec

PYTORCH_PORT = 23456
# "<job>-worker-<index>" names services and pods, which must stay DNS-1035 labels (<= 63).
JOB_NAME_MAX = 63 - len("-worker-") - 5


class DistributedJobRenderer(ABC):
    """Renders a distributed training step as one custom resource of an operator.

    Contract: `render` is pure (no API calls) and returns a complete manifest with
    `apiVersion == api_version`, `kind == kind`, `metadata.name == name_for(identity)` and
    `metadata.namespace == settings.namespace`; `name_for` is deterministic per
    (dag_id, run_id, task_id, try_number), so a retry or a resubmission after an Airflow restart
    finds its own resource instead of starting a second one. `plural` is the resource's plural for
    the custom objects API (`/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>`).
    """

    kind: ClassVar[str]
    api_version: ClassVar[str]
    plural: ClassVar[str]

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.split("/")[1]

    def name_for(self, identity: RunIdentity) -> str:
        return resource_name(identity, JOB_NAME_MAX)

    @abstractmethod
    def render(self, spec: StepSpec, identity: RunIdentity,
               settings: KubernetesSettings) -> dict[str, Any]:
        """The manifest that runs `spec` with `spec.nodes` x `spec.procs_per_node` processes."""


def torchrun_command(spec: StepSpec, *, elastic: bool) -> list[str]:
    """The container command of every replica (see the module docstring)."""
    torchrun = ["torchrun", f"--nproc-per-node={spec.procs_per_node}"]
    # The step's own command is passed on as written; only the flags below use `$(VAR)`.
    step_command = [literal(c) for c in spec.command]
    if elastic:
        # PET_RDZV_ENDPOINT, PET_RDZV_BACKEND, PET_NNODES, PET_MAX_RESTARTS come from the operator.
        return [*torchrun, "--no-python", *step_command]
    if spec.nodes == 1:
        return [*torchrun, "--standalone", "--no-python", *step_command]
    return [*torchrun, f"--nnodes={spec.nodes}", "--node-rank=$(RANK)",
            "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
            "--no-python", *step_command]


class PyTorchJobRenderer(DistributedJobRenderer):
    """`kubeflow.org/v1` PyTorchJob: Master + Workers, or elastic Workers."""

    kind: ClassVar[str] = "PyTorchJob"
    api_version: ClassVar[str] = "kubeflow.org/v1"
    plural: ClassVar[str] = "pytorchjobs"
    # The operator finds the training container and its port by these names.
    container_name: ClassVar[str] = "pytorch"
    port_name: ClassVar[str] = "pytorchjob-port"

    def render(self, spec: StepSpec, identity: RunIdentity,
               settings: KubernetesSettings) -> dict[str, Any]:
        name = self.name_for(identity)
        elastic = settings.elastic
        command = torchrun_command(spec, elastic=elastic)
        if "ARF_EXIT_DIR" in spec.env:  # the ranks record their codes: exit 75 restarts the pod
            command = custom_launch.pod_wrap(command)
            spec = dataclasses.replace(spec, env={
                **spec.env, "ARF_PROCS_PER_POD": str(spec.procs_per_node)})
        template = pod_template(
            spec, identity, settings, name=name, container_name=self.container_name,
            command=command,
            ports=[{"name": self.port_name, "containerPort": PYTORCH_PORT, "protocol": "TCP"}])

        def replica(count: int) -> dict[str, Any]:
            return {"replicas": count, "restartPolicy": "ExitCode", "template": template}

        if elastic:
            replicas = {"Worker": replica(spec.nodes)}
        else:
            replicas = {"Master": replica(1)}
            if spec.nodes > 1:
                replicas["Worker"] = replica(spec.nodes - 1)
        run_policy: dict[str, Any] = {
            "cleanPodPolicy": settings.clean_pod_policy,
            "backoffLimit": settings.backoff_limit,
            "activeDeadlineSeconds": max(1, int(spec.timeout_s)),
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        }
        scheduling: dict[str, Any] = {}
        if settings.volcano_queue:
            # Gang scheduling: all nodes start together or none does (no half-started job
            # holding GPUs while it waits for its last worker).
            scheduling = {"queue": settings.volcano_queue, "minAvailable": spec.nodes}
        if settings.priority_class:
            scheduling["priorityClass"] = settings.priority_class
        if scheduling:
            run_policy["schedulingPolicy"] = scheduling
        job_spec: dict[str, Any] = {
            "nprocPerNode": str(spec.procs_per_node),  # a string in the CRD (also "auto", "gpu")
            "pytorchReplicaSpecs": replicas,
            "runPolicy": run_policy,
        }
        if elastic:
            job_spec["elasticPolicy"] = {
                "rdzvBackend": "c10d",
                "rdzvId": name,
                "minReplicas": spec.nodes,
                "maxReplicas": spec.nodes,
                "maxRestarts": settings.max_restarts,
            }
        metadata = {"name": name, "namespace": settings.namespace,
                    "labels": dict(template["metadata"]["labels"]),
                    "annotations": dict(template["metadata"]["annotations"])}
        if settings.kueue_queue:
            metadata["labels"]["kueue.x-k8s.io/queue-name"] = settings.kueue_queue
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": metadata,
                "spec": job_spec}
