"""Review findings on the simulation side: exact interval bounds at 0 % and 100 %, and a
policy's bad actions refused by the rollout instead of silently simulated."""

from __future__ import annotations

import numpy as np
import pytest

from arf_trainer.sim import reach
from arf_trainer.stats import wilson_interval


@pytest.mark.parametrize("trials", [pytest.param(n, id=f"n{n}") for n in (3, 10, 13, 50, 999)])
def test_wilson_bounds_are_exact_at_none_and_all(trials: int) -> None:
    # Rounding left 6.9e-18 at 0/50 (recorded as such in the arf.eval.* tags) and
    # 0.9999999999999999 at 10/10: an interval that excluded its own rate of 100 %.
    assert wilson_interval(0, trials)[0] == 0.0
    assert wilson_interval(trials, trials)[1] == 1.0
    low, high = wilson_interval(trials, trials)
    assert low <= 1.0 <= high


@pytest.mark.parametrize("action, match", [
    pytest.param([np.nan, 0.0], "NaN action", id="nan"),
    pytest.param([0.0, 0.0, 0.0], "2 values", id="three-wide"),
    pytest.param([0.5], "2 values", id="one-wide"),
])
def test_rollout_refuses_bad_policy_actions(action: list[float], match: str) -> None:
    # NaN used to reach MuJoCo, which warns, resets the simulation and carries on: the episode
    # then "ended" at a distance that no policy produced.
    with pytest.raises(ValueError, match=match):
        reach.rollout(lambda obs: np.array(action), seed=0)


def test_out_of_range_actions_are_still_clipped_not_refused() -> None:
    big = reach.rollout(lambda obs: np.array([1e9, -np.inf]), seed=3)
    unit = reach.rollout(lambda obs: np.array([1.0, -1.0]), seed=3)
    assert np.array_equal(big.observations, unit.observations)
    assert big.final_distance == unit.final_distance


@pytest.mark.parametrize("size", [pytest.param(4, id="too-small"), pytest.param(300, id="too-big")])
def test_a_frame_size_the_camera_cannot_render_is_an_evaluation_error(tmp_path, monkeypatch,
                                                                      size: int) -> None:
    # It used to pass frame_input and fail later in FrameRenderer with a bare ValueError, which
    # the CLI does not map to an input error: a traceback that did not name the model.
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from torch import nn

    from arf_trainer.errors import EvaluationError
    from arf_trainer.evaluator_pixels import frame_input

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "image"),
                       TensorSpec(np.dtype(np.float32), (-1, 6), "state")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2), "action")]))
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(nn.Linear(6, 2), name="m", registered_model_name="odd_frames",
                                 serialization_format="pickle", signature=signature,
                                 pip_requirements=["torch"])
    with pytest.raises(EvaluationError, match=rf"models:/odd_frames/1.*{size}"):
        frame_input("models:/odd_frames/1")
