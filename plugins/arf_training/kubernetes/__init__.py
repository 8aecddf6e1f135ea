"""Pure renderers from a `StepSpec` to Kubernetes manifests (plain dicts), for the production path.

Nothing here talks to a cluster or imports Airflow: the operators of the Kubernetes backend (and
`arf templates render`) call these builders and hand the dicts to the Kubernetes provider's hooks,
the way the provider's own `build_job_request_obj` separates building from submitting.

    config.py   `KubernetesSettings.from_env()`: the `ARF_K8S_*` deployment settings
    pod.py      `render_pod`: one step as a v1 Pod (prepare, register, evaluate, 1-process train)
    ownership.py `resource_name`, labels, annotations: who an object belongs to (which DagRun)
    jobs.py     `DistributedJobRenderer` + `PyTorchJobRenderer` (kubeflow.org/v1 PyTorchJob)
    render.py   `render_step_manifests`: template + step -> the manifests the DAG would submit
"""

from arf_training.kubernetes.config import KubernetesConfigError, KubernetesSettings
from arf_training.kubernetes.ownership import resource_name
from arf_training.kubernetes.jobs import DistributedJobRenderer, PyTorchJobRenderer
from arf_training.kubernetes.pod import render_pod
from arf_training.kubernetes.render import render_step_manifests

__all__ = [
    "DistributedJobRenderer",
    "KubernetesConfigError",
    "KubernetesSettings",
    "PyTorchJobRenderer",
    "render_pod",
    "render_step_manifests",
    "resource_name",
]
