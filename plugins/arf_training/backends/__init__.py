"""Backends turn a template step into an Airflow task that runs the step's StepSpec."""

from __future__ import annotations

from arf_training.backends.base import Backend


def get_backend(name: str) -> Backend:
    """The backend named by ARF_BACKEND; unknown names fail with the accepted ones."""
    if name == "local":
        from arf_training.backends.local import LocalBackend

        return LocalBackend()
    from arf_training.errors import ArfError

    raise ArfError(f"ARF_BACKEND={name!r} is not a backend; use 'local' (the embedded default)")


__all__ = ["Backend", "get_backend"]
