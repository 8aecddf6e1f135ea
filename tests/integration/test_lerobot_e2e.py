"""A LeRobot dataset to a registered model through real Airflow (`airflow dags test`): a v3.0
dataset of two cameras (AV1 video, lerobot's layout) ingested with `arf-trainer datahub
ingest --frames video` (the videos stored as they are), then the README's so100_pick_bc
template (at 64x64 and 48x64, downscale 2) run: prepare decodes both cameras' frames from the
stored videos at half their size, bc_pixels trains an encoder per camera on them and the dotted
LeRobot column names, and the model is registered taking both cameras at their full size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lerobot_dataset import SIDE, TOP, WRIST, WRIST_SHAPE, write_v30

from airflow_runs import latest_run, task_states
from arf_training.settings import ArfSettings
from arf_training.stepspec import workspace_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
DAG = "so100_pick_bc"


def _readme_template() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index(f"  ```yaml\n  # config_templates/{DAG}.yaml")
    block = readme[start:readme.index("  ```\n", start + 10)].split("\n", 1)[1]
    shipped = "{format: video, shape: [480, 640, 3], downscale: 5}"
    top, wrist = f"{TOP}: {shipped}", f"{WRIST}: {shipped}"
    assert top in block and wrist in block, f"README's {DAG} template: expected {top}, {wrist}"
    small = "{format: video, shape: [%d, %d, 3], downscale: 2}"
    return textwrap.dedent(block.replace(top, f"{TOP}: {small % (SIDE, SIDE)}")
                           .replace(wrist, f"{WRIST}: {small % WRIST_SHAPE}"))


def test_a_lerobot_dataset_trains_and_registers_through_airflow(
        embedded: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVT_LOG", "1")  # SVT-AV1 prints its configuration per file otherwise
    env = dict(embedded)
    dataset = write_v30(tmp_path / "so100", [12] * 8, episodes_per_video=3, wrist=True)
    ingest = subprocess.run([str(BIN / "arf-trainer"), "datahub", "ingest", "--hub",
                             env["ARF_DATAHUB_URI"], "--frames", "video", "so100_pick",
                             str(dataset)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / f"{DAG}.yaml").write_text(_readme_template())
    env["ARF_TEMPLATES_DIR"] = str(templates)
    conf = {"epochs": 2, "batch_size": 16}
    proc = subprocess.run([str(BIN / "airflow"), "dags", "test", DAG, "-c", json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    run = latest_run(DAG)
    assert str(run.state) == "success"
    assert task_states(DAG, run.run_id) == {
        "prepare_data": "success", "train": "success", "register_model": "success"}
    ws = workspace_for(ArfSettings.from_env(), DAG, run.run_id)
    manifest = json.loads((ws / "prepare" / "manifest.json").read_text())
    assert manifest["rows"] == 96 and manifest["tables"]["so100_pick"]["version"] == 0
    assert manifest["features"] == [TOP, "observation.state", WRIST]
    train = json.loads((ws / "train" / "result.json").read_text())
    assert train["recipe"] == "bc_pixels" and train["steps"] > 0
    plugin = json.loads((ws / "register" / "result.json").read_text())["manifest"]
    tensors = plugin["input"]["tensors"]
    assert [t["name"] for t in tensors] == ["image", "state", "image_1"]
    # Taken at the cameras' size when served; stored (and trained on) at half of it.
    assert tensors[0] == {"name": "image", "column": TOP, "dtype": "uint8",
                          "shape": [-1, SIDE, SIDE, 3], "downscale": 2}
    assert tensors[2] == {"name": "image_1", "column": WRIST, "dtype": "uint8",
                          "shape": [-1, *WRIST_SHAPE, 3], "downscale": 2}
    columns = {c["name"]: c["shape"] for c in manifest["columns"]}
    assert columns[TOP] == [SIDE // 2, SIDE // 2, 3]
    assert columns[WRIST] == [WRIST_SHAPE[0] // 2, WRIST_SHAPE[1] // 2, 3]
