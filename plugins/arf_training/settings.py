"""Where the embedded default keeps its state, and which backend runs the steps.

Read from the environment only (never Airflow Variables): values are needed at task run time,
and `ARF_BACKEND` at parse time, where a Variable read would hit the metadata DB on every parse.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# plugins/arf_training/settings.py -> the checkout root (holds config_templates/, dags/).
REPO_ROOT = Path(__file__).resolve().parents[2]


def venv_bin(name: str) -> str:
    """An executable of this installation: next to this interpreter (the same venv), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        from arf_training.errors import ArfError

        raise ArfError(f"cannot find {name!r} next to {sys.executable} or on PATH; install "
                       "arf-training with its extras ('pip install -e .[all]') here")
    return found


def default_home() -> Path:
    if os.environ.get("ARF_HOME"):
        return Path(os.environ["ARF_HOME"]).resolve()
    if (REPO_ROOT / "config_templates").is_dir():
        return REPO_ROOT / ".arf"
    return Path.home() / ".arf"


def templates_dir() -> Path:
    return Path(os.environ.get("ARF_TEMPLATES_DIR") or REPO_ROOT / "config_templates")


def backend_name() -> str:
    return os.environ.get("ARF_BACKEND", "local")


@dataclass(frozen=True)
class ArfSettings:
    """Runtime settings shared by every step of the embedded default."""

    home: Path
    tracking_uri: str
    datahub_uri: str
    artifact_root: str

    @property
    def workspace_root(self) -> Path:
        return Path(os.environ.get("ARF_WORKSPACE_ROOT") or self.home / "workspace")

    @classmethod
    def from_env(cls) -> "ArfSettings":
        home = default_home()
        return cls(
            home=home,
            tracking_uri=os.environ.get("ARF_TRACKING_URI") or f"sqlite:///{home}/mlflow.db",
            datahub_uri=os.environ.get("ARF_DATAHUB_URI") or str(home / "datahub"),
            artifact_root=os.environ.get("ARF_ARTIFACT_ROOT") or str(home / "mlartifacts"),
        )
