"""`torchrun --nproc_per_node=2 arf-trainer train` with the vision recipe bc_pixels: DDP over
gloo on uint8 frames, bit-identical across runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_recipe_vision import HP, episodes, prepare_pixels  # noqa: F401 (fixture)
from trainer_testkit import VENV_BIN, fresh_tracking_uri, make_spec, step_environ

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two torchrun jobs


def torchrun_train(tmp: Path, name: str, uri: str, episodes: dict) -> dict:
    workspace = tmp / name
    prepare_pixels(workspace, episodes)
    spec = make_spec("reach_pixels_bc", run_id=f"manual__{name}", hyperparameters=HP)
    spec_path = tmp / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = step_environ(spec_path, workspace, uri, tmp / "artifacts", f"manual__{name}")
    proc = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python",
         str(VENV_BIN / "arf-trainer"), "train"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((workspace / "train" / "result.json").read_text())


def test_two_process_bc_pixels_is_reproducible(tmp_path: Path, episodes: dict) -> None:
    uri = fresh_tracking_uri(tmp_path)
    first = torchrun_train(tmp_path, "a", uri, episodes)
    second = torchrun_train(tmp_path, "b", uri, episodes)
    assert first["world_size"] == 2 and first["recipe"] == "bc_pixels"
    assert first["steps"] == 2 * 4  # 100 rows: 50 a rank, batches of 16 a rank
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["metrics"] == second["metrics"]
