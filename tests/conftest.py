"""Test session setup: an isolated embedded home (Airflow DB, MLflow, data hub) per session.

The environment is set at import time, before any test imports Airflow: Airflow reads its
configuration once, when it is first imported.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="arf-test-home-"))
os.environ["ARF_HOME"] = str(_HOME)
os.environ.pop("ARF_TRACKING_URI", None)
os.environ.pop("ARF_DATAHUB_URI", None)
os.environ.pop("ARF_ARTIFACT_ROOT", None)
os.environ.pop("ARF_TEMPLATES_DIR", None)

from arf_training.embedded import environment  # noqa: E402
from arf_training.postgres import stop_started  # noqa: E402

# environment() starts the home's PostgreSQL (unless ARF_DB=sqlite); stop it, and any other
# server this session started (the Airflow stack's home), when the session's process exits.
atexit.register(stop_started)
os.environ.update(environment())


@pytest.fixture(scope="session")
def arf_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def embedded(arf_home) -> dict[str, str]:
    """The embedded default, ready to run DAGs: Airflow DB migrated, data hub seeded."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = environment()
    subprocess.run([str(bin_dir / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    seed = subprocess.run([str(bin_dir / "arf-trainer"), "datahub", "seed", "--hub",
                           env["ARF_DATAHUB_URI"], "--episodes", "80"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stdout + seed.stderr
    return env


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# What a test may not leave in the checkout: MLflow's default artifact folder for a store
# without an artifact location (a relative ./mlruns, under whatever the working directory is),
# its ./mlartifacts, and SQLite files. They were left there by tests before, unseen.
_LITTER = ("mlruns", "mlartifacts", "mlflow.db")


def _litter() -> set[str]:
    found = set()
    for name in _LITTER:
        path = REPO / name
        if path.is_dir():
            found |= {str(p.relative_to(REPO)) for p in path.rglob("*")}
        elif path.exists():
            found.add(name)
    return found


_LITTER_BEFORE = _litter()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    new = sorted(_litter() - _LITTER_BEFORE)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"tests wrote into the checkout: {', '.join(new[:5])}"
                   f"{f' and {len(new) - 5} more' if len(new) > 5 else ''} (a tracking store "
                   "without an artifact location under a tmp folder); give it one")
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
