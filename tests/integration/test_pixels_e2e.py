"""reach_pixels_bc end to end through real Airflow (`airflow dags test`) with small settings:
a few rendered demonstrations at 16x16, two epochs of the vision recipe, registration (pt2
export of a two-input model), then (slow) arf_evaluate rendering the same camera and
`arf training reproduce` -> match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_runs import latest_run, task_states
from arf_training.settings import ArfSettings
from arf_training.stepspec import workspace_for

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
DAG = "reach_pixels_bc"
FRAME = 16
CONF = {"epochs": 2, "batch_size": 32, "hidden_size": 64}


def dags_test(env: dict[str, str], dag_id: str, conf: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=900)


def small_frame_templates(root: Path) -> Path:
    """The shipped templates, reach_pixels_bc decoding 16x16 PNG frames instead of 64x64."""
    for path in (REPO / "config_templates").glob("*.yaml"):
        text = path.read_text()
        if path.name == f"{DAG}.yaml":
            shipped = "shape: [64, 64, 3]"
            assert text.count(shipped) == 1, f"{path}: expected one {shipped!r}"
            text = text.replace(shipped, f"shape: [{FRAME}, {FRAME}, 3]")
        (root / path.name).write_text(text)
    return root


@pytest.fixture(scope="module")
def pixel_run(embedded: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One reach_pixels_bc DAG run on 4 rendered episodes of 16x16 frames."""
    templates = small_frame_templates(tmp_path_factory.mktemp("templates"))
    embedded = {**embedded, "ARF_TEMPLATES_DIR": str(templates)}
    seed = subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub",
                           embedded["ARF_DATAHUB_URI"], "--episodes", "4", "--pixels",
                           "--frame-size", str(FRAME)],
                          env=embedded, capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stdout[-3000:] + seed.stderr[-3000:]
    proc = dags_test(embedded, DAG, CONF)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run(DAG)
    ws = workspace_for(ArfSettings.from_env(), DAG, run.run_id)
    return {"run": run, "workspace": ws, "env": embedded,
            "train": json.loads((ws / "train" / "result.json").read_text()),
            "register": json.loads((ws / "register" / "result.json").read_text())}


def test_reach_pixels_bc_runs_through_airflow(pixel_run: dict[str, Any]) -> None:
    run, ws = pixel_run["run"], pixel_run["workspace"]
    assert str(run.state) == "success"
    assert task_states(DAG, run.run_id) == {
        "prepare_data": "success", "train": "success", "register_model": "success"}
    # Prepare decoded the PNG frames into a uint8 array column; the recipe trained on them.
    manifest = json.loads((ws / "prepare" / "manifest.json").read_text())
    image = next(c for c in manifest["columns"] if c["name"] == "image")
    assert image["dtype"] == "uint8" and image["shape"] == [FRAME, FRAME, 3]
    assert manifest["decode"] == {"image": {"format": "png", "shape": [FRAME, FRAME, 3]}}
    train = pixel_run["train"]
    assert train["recipe"] == "bc_pixels" and train["steps"] > 0
    # Registered as a two-input model whose signature carries the frame size.
    plugin = pixel_run["register"]["manifest"]
    assert plugin["input"]["tensors"][0] == {"name": "image", "column": "image",
                                             "dtype": "uint8", "shape": [-1, FRAME, FRAME, 3]}
    import mlflow

    from arf_trainer.evaluator_pixels import frame_input

    mlflow.set_registry_uri(pixel_run["env"]["ARF_TRACKING_URI"])
    mlflow.set_tracking_uri(pixel_run["env"]["ARF_TRACKING_URI"])
    assert frame_input(pixel_run["register"]["model_uri"]) == (FRAME, FRAME, 3)


@pytest.mark.slow
def test_reach_pixels_bc_is_evaluated_and_reproduces(pixel_run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    env, register = pixel_run["env"], pixel_run["register"]
    payload = {"model_name": register["model_name"], "model_version": register["model_version"]}
    proc = dags_test(env, "arf_evaluate", payload)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    client = MlflowClient(tracking_uri=env["ARF_TRACKING_URI"],
                          registry_uri=env["ARF_TRACKING_URI"])
    version = client.get_model_version(register["model_name"], register["model_version"])
    assert version.tags["arf.eval.episodes"] == "50"
    assert 0.0 <= float(version.tags["arf.eval.success_rate"]) <= 1.0
    low, high = (float(x) for x in version.tags["arf.eval.success_rate_ci95"].split(","))
    # Wilson's bound at 0 successes comes out as ~7e-18, not 0, in floating point.
    assert low - 1e-9 <= float(version.tags["arf.eval.success_rate"]) <= high + 1e-9
    eval_run = client.get_run(version.tags["arf.eval.run_id"])
    assert eval_run.data.tags["arf.environment"] == "reach_pixels"

    # The lineage the training recorded re-runs it bit for bit.
    proc = subprocess.run([str(BIN / "arf"), "training", "reproduce", version.run_id],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "result: match" in proc.stdout, proc.stdout[-2000:]
