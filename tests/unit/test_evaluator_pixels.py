"""The evaluate step in `reach_pixels`: a registered pixel policy against a real MLflow (sqlite)
registry, rendered MuJoCo rollouts and the data hub's failures table."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from arf_trainer.errors import EvaluationError
from arf_trainer.evaluator import run_evaluate
from arf_trainer.spec import JobSpec, StepEnv

from test_reach_pixels import pixel_expert
from trainer_testkit import fresh_tracking_uri

# Two logged models and 10 rendered episodes: the default suite's reach_pixels evaluation is
# test_recipe_vision's registered-model check and the Airflow e2e; this one is `slow`.
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MODEL = "reach_pixels_test_policy"
EPISODES = 10
FRAME = 32


class PixelExpert(nn.Module):
    """The scripted expert behind the bc_pixels contract: it finds the target in the frame."""

    def forward(self, image: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack([pixel_expert(f, s) for f, s in
                                          zip(image.numpy(), state.numpy())]))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """MODEL v1 = the pixel expert (pickle, with the frames signature), v2 = a state policy."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    root = tmp_path_factory.mktemp("mlflow")
    uri = fresh_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("training", artifact_location=str(root / "artifacts"))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, FRAME, FRAME, 3), "image"),
                       TensorSpec(np.dtype(np.float32), (-1, 6), "state")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2), "action")]))
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(PixelExpert(), name="pixel_expert", registered_model_name=MODEL,
                                 serialization_format="pickle", signature=signature,
                                 pip_requirements=["torch"])
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(nn.Linear(10, 2), name="state", registered_model_name=MODEL,
                                 serialization_format="pt2",
                                 input_example=np.zeros((2, 10), dtype=np.float32),
                                 pip_requirements=["torch"])
    return {"uri": uri, "artifacts": root / "eval-artifacts"}


def eval_env(registry: dict[str, Any], workspace: Path, version: int,
             environment: str = "reach_pixels") -> StepEnv:
    template = yaml.safe_load((REPO / "config_templates" / "reach_bc.yaml").read_text())
    template["evaluation"].pop("promotion_margin", None)
    template["evaluation"].update({"episodes": EPISODES, "environment": environment})
    spec = JobSpec.from_dict({
        "spec_version": 1, "step": "evaluate", "template": copy.deepcopy(template),
        "template_sha256": "0" * 64, "conf": {}, "hyperparameters": {}, "seed": 0,
        "run": {"dag_id": "arf_evaluate", "run_id": f"manual__{environment}_{version}",
                "task_id": "evaluate"},
        "inputs": {"model_name": MODEL, "model_version": version},
    })
    return StepEnv(workspace=workspace, result_path=workspace / "evaluate" / "result.json",
                   tracking_uri=registry["uri"], artifact_root=str(registry["artifacts"]),
                   datahub=workspace / "hub", spec=spec)


def test_pixel_policy_is_evaluated_by_rendering_what_it_was_trained_on(
        registry: dict[str, Any], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from arf_trainer.datahub.tables import list_tables, open_table

    result = run_evaluate(eval_env(registry, tmp_path, 1))
    # The same statistics and records as `reach`: rate and distance with intervals, the
    # version's tags, and the failed episodes (full states, for relabelling) in the hub.
    assert result["episodes"] == EPISODES and result["success_rate"] >= 0.8
    assert result["success_rate_ci95_low"] <= result["success_rate"]
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["arf.eval.passed"] == "true" and tags["arf.eval.episodes"] == str(EPISODES)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["arf.environment"] == "reach_pixels"
    failed = round((1 - result["success_rate"]) * EPISODES)
    assert result["failures_recorded"] == failed
    if failed:
        rows = open_table(tmp_path / "hub", "failures").dataset.count_rows()
        assert rows == failed * 50
    else:
        assert "failures" not in list_tables(tmp_path / "hub")


@pytest.mark.parametrize(("version", "environment", "message"), [
    pytest.param(1, "reach", "takes 32x32 frames but evaluation.environment is reach",
                 id="pixel-model-in-reach"),
    pytest.param(2, "reach_pixels", "is reach_pixels but models:/.*/2 takes no frames",
                 id="state-model-in-reach_pixels"),
])
def test_environment_must_match_the_model(registry: dict[str, Any], tmp_path: Path,
                                          version: int, environment: str, message: str) -> None:
    with pytest.raises(EvaluationError, match=message):
        run_evaluate(eval_env(registry, tmp_path, version, environment))
