"""`airflow dags test reach_bc_federated` (small settings): three site prepares, a real Flower
federation (SuperLink + 3 SuperNodes on loopback), register with every site's lineage.

Needs the federation venv (`make federation-venv`; ARF_FEDERATION_VENV overrides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from airflow_runs import latest_run, task_states
from arf_training.settings import ArfSettings
from arf_training.stepspec import workspace_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FED_VENV = Path(os.environ.get("ARF_FEDERATION_VENV") or REPO / ".federation-venv")
SITES = ["north", "south", "west"]

# In the default suite (`make test` creates the federation venv first).
pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not (FED_VENV / "bin" / "flwr").exists(),
    reason=f"no federation venv at {FED_VENV}: run `make federation-venv`")]


@pytest.fixture
def small_templates(tmp_path) -> Path:
    """reach_bc_federated with small settings (2 rounds x 1 local epoch, a small MLP)."""
    template = yaml.safe_load((REPO / "config_templates" / "reach_bc_federated.yaml").read_text())
    template["federated"].update(rounds=2, local_epochs=1)
    hps = template["training"]["hyperparameters"]
    hps["hidden_size"]["default"], hps["num_layers"]["default"] = 64, 2
    template.pop("evaluation")
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "reach_bc_federated.yaml").write_text(yaml.safe_dump(template, sort_keys=False))
    return folder


def test_federated_dag_runs_end_to_end(embedded, small_templates):
    from arf_trainer.datahub.seed_sites import seed_sites

    settings = ArfSettings.from_env()
    seed_sites({n: settings.home / "sites" / n / "datahub" for n in SITES}, episodes=30)
    env = {**embedded, "ARF_TEMPLATES_DIR": str(small_templates),
           "ARF_FEDERATION_VENV": str(FED_VENV)}
    proc = subprocess.run([str(BIN / "airflow"), "dags", "test", "reach_bc_federated"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = latest_run("reach_bc_federated")
    assert str(run.state) == "success"
    states = task_states("reach_bc_federated", run.run_id)
    assert set(states.values()) == {"success"}, states

    ws = workspace_for(settings, "reach_bc_federated", run.run_id)
    assert sorted(p.name for p in (ws / "sites").iterdir()) == sorted(SITES)
    assert not (ws / "prepare").exists()  # no pooled data anywhere in the run
    train = json.loads((ws / "train" / "result.json").read_text())
    register = json.loads((ws / "register" / "result.json").read_text())

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["ARF_TRACKING_URI"],
                                 registry_uri=env["ARF_TRACKING_URI"])
    version = client.get_model_version(register["model_name"], register["model_version"])
    sites = json.loads(client.get_run(train["mlflow_run_id"]).data.tags["arf.federated.sites"])
    assert sorted(sites) == sorted(SITES)
    for name in SITES:
        manifest = json.loads((ws / "sites" / name / "prepare" / "manifest.json").read_text())
        assert sites[name]["fingerprint"] == manifest["fingerprint"]
    assert json.loads(version.tags["arf.data_tables"]).keys() == set(SITES)
    assert version.tags["arf.weights_sha256"] == train["weights_sha256"]
