"""Backends turn a template step into an Airflow task that runs the step's StepSpec."""

from __future__ import annotations

from arf_training.backends.base import Backend

# ARF_BACKEND values. Each backend module is imported only when chosen: the kubernetes one pulls
# the Kubernetes provider and clients, which the embedded default never needs.
BACKENDS = ("local", "kubernetes")


def get_backend(name: str) -> Backend:
    """The backend named by ARF_BACKEND; unknown names fail with the accepted ones."""
    if name == "local":
        from arf_training.backends.local import LocalBackend

        return LocalBackend()
    if name == "kubernetes":
        from arf_training.backends.kubernetes import KubernetesBackend

        return KubernetesBackend()
    from arf_training.errors import ArfError

    raise ArfError(f"ARF_BACKEND={name!r} is not a backend; use one of: 'local' (the embedded "
                   "default), 'kubernetes' (Pods and PyTorchJobs, configured by ARF_K8S_*)")


__all__ = ["BACKENDS", "Backend", "get_backend"]
