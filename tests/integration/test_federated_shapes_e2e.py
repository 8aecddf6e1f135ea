"""Array columns and camera frames through a real Flower federation (`arf-trainer federate` in
the federation venv: a SuperLink and two SuperNodes on loopback), on the two sites that
tests/unit/test_federated_shapes.py seeds and prepares: the global model has the described
shape and the pooled normalization, a re-run gives the same weights bit for bit, and a
bc_pixels model registers. Slow: ~40 s a federation.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from test_federated_shapes import (HP, KINDS, _recipe, _sites_data, _template,  # noqa: F401
                                   sites)
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, step_environ

from arf_trainer.federated.site import pooled_stats, statistics
from arf_trainer.trainer.recipes import ModelInfo, get_recipe

REPO = Path(__file__).resolve().parents[2]
FED_VENV = Path(os.environ.get("ARF_FEDERATION_VENV") or REPO / ".federation-venv")

needs_flower = pytest.mark.skipif(not (FED_VENV / "bin" / "flwr").exists(),
                                  reason=f"no federation venv at {FED_VENV}: run "
                                         "`make federation-venv`")


def _federate(sites: dict[str, Any], tmp_path: Path, run_id: str, tracking: str) -> Path:
    workspace = tmp_path / run_id
    shutil.copytree(sites["workspace"] / "sites", workspace / "sites")
    spec = make_spec(KINDS[sites["kind"]]["template"], "federate", run_id=run_id,
                     hyperparameters={k: v for k, v in HP.items() if k != "epochs"})
    spec["template"]["federated"] = _template(sites["kind"])["federated"]
    spec["template"]["dataset"].update(copy.deepcopy(KINDS[sites["kind"]]["dataset"]))
    spec_path = workspace / "federate.json"
    spec_path.write_text(json.dumps(spec))
    env = step_environ(spec_path, workspace, tracking, tmp_path / "artifacts", run_id,
                       step="federate")
    proc = subprocess.run([str(FED_VENV / "bin" / "arf-trainer"), "federate"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workspace


@pytest.mark.integration
@pytest.mark.slow
@needs_flower
def test_flower_federation_reruns_bitwise(sites, tmp_path):
    """Through a real SuperLink and two SuperNodes: the global model has the described shape
    and the pooled normalization, a re-run gives the same weights bit for bit, and a bc_pixels
    model registers (its export traces zeros of its shape: no site's rows are here)."""
    tracking = fresh_tracking_uri(tmp_path / "mlflow")
    first = _federate(sites, tmp_path, "run1", tracking)
    result = json.loads((first / "train" / "result.json").read_text())
    assert result["recipe"] == _recipe(sites) and result["federated"]["rounds"] == 2
    info = ModelInfo.from_json(json.loads((first / "train" / "model_info.json").read_text()))
    recipe = get_recipe(info.recipe)
    model = recipe.build_model(info)
    model.load_state_dict(torch.load(first / "train" / "model.pt", weights_only=True))
    _, _, data = _sites_data(sites)
    expected = recipe.build_model(info)
    recipe.set_inputs_normalization(expected,
                                    *pooled_stats([statistics(d, recipe) for d in data]))
    for name, value in expected.named_buffers():  # FedAvg's float32 mean may round them
        torch.testing.assert_close(dict(model.named_buffers())[name], value, rtol=1e-5,
                                   atol=1e-6)

    again = _federate(sites, tmp_path, "run2", tracking)
    assert json.loads((again / "train" / "result.json").read_text())["weights_sha256"] == \
        result["weights_sha256"]

    if sites["kind"] == "pixels":
        from arf_trainer.publisher import run_register

        spec = make_spec("reach_pixels_bc", "register", run_id="run1")
        registered = run_register(make_env(spec, first, tracking, tmp_path / "artifacts"))
        image = registered["manifest"]["input"]["tensors"][0]
        # Served at the sites' camera size (16x16), which the model halves itself.
        assert (image["shape"], image["downscale"]) == ([-1, 16, 16, 3], 2)
