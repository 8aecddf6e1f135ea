"""`arf airflow ...` on a fresh ARF_HOME works without `arf airflow db migrate` first."""

from __future__ import annotations

import os
import shutil
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
    try:
        proc = subprocess.run([arf, "airflow", "dags", "list-import-errors"], env=env,
                              capture_output=True, text=True, timeout=600)
    finally:  # `arf airflow` leaves its detached database running, as `arf demo` does
        from arf_training.postgres import EmbeddedPostgres

        server = EmbeddedPostgres(tmp_path / "home")
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "migration required" not in proc.stdout + proc.stderr


def test_arf_up_seeds_an_empty_data_hub_and_leaves_a_seeded_one_alone(tmp_path):
    """A fresh clone's `make up`: the nightly fine-tune's first scheduled run must find its
    tables (and skip: nothing new), not fail on a missing one."""
    from arf_training.settings import ArfSettings
    from arf_training.stack import seed_empty_hub

    hub = tmp_path / "datahub"
    settings = ArfSettings(home=tmp_path, tracking_uri="sqlite:///x.db", datahub_uri=str(hub),
                           artifact_root=str(tmp_path / "art"))
    seed_empty_hub(settings)
    tables = sorted(p.name for p in hub.iterdir())
    assert {"corrections", "digits", "reach_demos"} <= set(tables), tables
    marker = hub / "digits" / "untouched"
    marker.write_text("")
    seed_empty_hub(settings)
    assert marker.exists() and sorted(p.name for p in hub.iterdir()) == tables
