"""`arf airflow ...` on a fresh ARF_HOME works without `arf airflow db migrate` first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_a_fresh_home_is_migrated_on_first_use(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ARF_", "MLFLOW"))}
    env.update({"ARF_HOME": str(tmp_path / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"})
    if os.environ.get("ARF_DB"):
        env["ARF_DB"] = os.environ["ARF_DB"]
    arf = str(Path(sys.executable).parent / "arf")
    proc = subprocess.run([arf, "airflow", "dags", "list-import-errors"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "migration required" not in proc.stdout + proc.stderr
