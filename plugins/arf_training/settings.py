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


DATABASE_BACKENDS = ("postgres", "sqlite")
_SQLITE_FILES = {"airflow": "airflow/airflow.db", "mlflow": "mlflow.db", "optuna": "optuna.db"}


def database_backend() -> str:
    """Where the embedded default keeps Airflow, MLflow and Optuna state: "postgres" (the
    embedded server, default) or "sqlite" (only when asked for: ARF_DB=sqlite)."""
    value = os.environ.get("ARF_DB", "postgres").strip().lower() or "postgres"
    if value not in DATABASE_BACKENDS:
        from arf_training.errors import ArfError

        raise ArfError(f"ARF_DB={os.environ['ARF_DB']!r} is not a database backend; use one of "
                       f"{list(DATABASE_BACKENDS)} (or unset it for postgres)")
    return value


def database_uri(home: Path, name: str) -> str:
    """The SQLAlchemy URI of one embedded database ("airflow", "mlflow", "optuna") of `home`.

    Does not start the server (see `EmbeddedPostgres.ensure_running`); with postgres it creates
    the generated password on first use."""
    if database_backend() == "sqlite":
        return f"sqlite:///{home}/{_SQLITE_FILES[name]}"
    from arf_training.postgres import EmbeddedPostgres  # stdlib only; not needed for sqlite

    return EmbeddedPostgres(home).uri(name)


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

    def database_uri(self, name: str) -> str:
        """The embedded database `name` of this home (see `database_uri`)."""
        return database_uri(self.home, name)

    def from_secret(self, env_name: str) -> bool:
        """Whether the step's `env_name` comes from a secret the backend mounts (a pod's
        secretKeyRef), so that the plain value must not be put in the step's environment."""
        return False

    @classmethod
    def from_env(cls) -> "ArfSettings":
        home = default_home()
        return cls(
            home=home,
            tracking_uri=os.environ.get("ARF_TRACKING_URI") or database_uri(home, "mlflow"),
            datahub_uri=os.environ.get("ARF_DATAHUB_URI") or str(home / "datahub"),
            artifact_root=os.environ.get("ARF_ARTIFACT_ROOT") or str(home / "mlartifacts"),
        )
