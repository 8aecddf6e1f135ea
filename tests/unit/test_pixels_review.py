"""bc_pixels and the reach_pixels evaluation at their edges: frames too small for the encoder,
frames of another channel count or dtype, and state columns the camera gives in another order
or not at all. Real trainer, torch.export, MLflow (sqlite) and MuJoCo renderer; 16x16 frames."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_recipe_vision import episodes  # noqa: F401 - a fixture: three 16x16 expert episodes
from trainer_testkit import fresh_tracking_uri, make_env, make_spec

from arf_trainer.datahub.seed_pixels import image_column
from arf_trainer.errors import EvaluationError, TrainingError
from arf_trainer.sim import reach, reach_pixels
from arf_trainer.trainer.recipes import Hyperparameters, get_recipe
from arf_trainer.trainer.run import run_train

STATE = list(reach_pixels.STATE_COLUMNS)
HP = {"epochs": 1, "batch_size": 32, "hidden_size": 32}
RECIPE = get_recipe("bc_pixels")
SHAPES = {n: [] for n in [*STATE, "act_0", "act_1"]}


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def describe(image: list[int]) -> Any:
    return RECIPE.describe_shapes(["image", *STATE], ["act_0", "act_1"],
                                  Hyperparameters(epochs=1, batch_size=8, lr=0.01),
                                  {"image": image, **SHAPES})


def prepare(workspace: Path, data: dict[str, np.ndarray], features: list[str]) -> None:
    """The shards and manifest prepare writes for `data` (episode 2 is the validation split)."""
    prepare_dir = workspace / "prepare"
    columns = {"image": image_column(data["image"]),
               **{n: pa.array(data["state"][:, j]) for j, n in enumerate(STATE)},
               "act_0": pa.array(data["act"][:, 0]), "act_1": pa.array(data["act"][:, 1])}
    table = pa.table(columns)
    shards: dict[str, list[dict[str, Any]]] = {}
    for split, rows in {"train": data["episode"] != 2, "val": data["episode"] == 2}.items():
        (prepare_dir / split).mkdir(parents=True, exist_ok=True)
        rel = f"{split}/shard-00000.parquet"
        pq.write_table(table.filter(pa.array(rows)), prepare_dir / rel)
        shards[split] = [{"path": rel, "rows": int(rows.sum()),
                          "sha256": hashlib.sha256((prepare_dir / rel).read_bytes()).hexdigest()}]
    described = [{"name": "image", "type": str(table.schema.field("image").type),
                  "dtype": "uint8", "shape": list(data["image"].shape[1:])}]
    described += [{"name": n, "type": "float", "dtype": "float32", "shape": []}
                  for n in [*STATE, "act_0", "act_1"]]
    manifest = {"query": "SELECT * FROM reach_pixels", "rows": len(data["act"]),
                "columns": described, "features": features, "targets": ["act_0", "act_1"],
                "tables": {"reach_pixels": {"version": 0}}, "fingerprint": "f" * 64,
                "shards": shards, "validation_split": 0.1, "seed": 0}
    (prepare_dir / "manifest.json").write_text(json.dumps(manifest))


def spec(step: str, workspace: str, features: list[str]) -> dict[str, Any]:
    made = make_spec("reach_pixels_bc", step, run_id=f"manual__{workspace}", hyperparameters=HP)
    made["template"]["dataset"]["features"] = features
    return made


@pytest.mark.parametrize("image", [pytest.param([1, 1, 3], id="1x1"),
                                   pytest.param([4, 4, 3], id="4x4"),
                                   pytest.param([2, 64, 3], id="2x64")])
def test_frames_too_small_for_the_encoder_are_refused(image: list[int]) -> None:
    # The encoder's last map would have one position along a side: every frame would give
    # the same keypoint coordinate there (the policy blind along it).
    with pytest.raises(TrainingError, match=rf"column 'image' holds {image[0]}x{image[1]} "
                                            r"frames.*at least 5 pixels a side"):
        describe(image)


def test_smallest_frames_keep_the_frame_visible() -> None:
    info = describe([5, 5, 3])
    model = RECIPE.build_model(info)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 5, 5, 3), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        keypoints = model.net.encoder(frames.permute(0, 3, 1, 2).float() / 255 - 0.5)
    assert not torch.equal(keypoints[0], keypoints[1])
    assert describe([8, 8, 3]).arrays["image"] == [8, 8, 3]


def test_a_run_on_frames_too_small_stops_before_tracking(tmp_path: Path,
                                                         episodes: dict) -> None:
    import mlflow

    tiny = {**episodes, "image": np.ascontiguousarray(episodes["image"][:, ::4, ::4])}
    prepare(tmp_path / "ws", tiny, ["image", *STATE])
    uri = fresh_tracking_uri(tmp_path)
    with pytest.raises(TrainingError, match="column 'image' holds 4x4 frames"):
        run_train(make_env(spec("train", "ws", ["image", *STATE]), tmp_path / "ws", uri,
                           tmp_path / "artifacts"))
    mlflow.set_tracking_uri(uri)
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert not (tmp_path / "ws" / "train" / "checkpoints").exists()


@pytest.mark.parametrize("channels", [pytest.param(1, id="grayscale"),
                                      pytest.param(4, id="rgba")])
def test_a_frame_column_of_another_channel_count_is_named(channels: int) -> None:
    with pytest.raises(TrainingError) as caught:
        describe([16, 16, channels])
    message = str(caught.value)
    assert f"column 'image' holds [16, 16, {channels}] per row ({channels} channels)" in message
    assert "dataset.decode.image with shape [16, 16, 3]" in message
    assert "list one image column" not in message


@pytest.mark.parametrize("scale", [pytest.param(1 / 255, id="float-0-1"),
                                   pytest.param(1.0, id="float-0-255")])
def test_float_frames_are_refused_not_scaled_twice(scale: float) -> None:
    model = RECIPE.build_model(describe([8, 8, 3]))
    frames = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    state = torch.zeros(2, len(STATE))
    with torch.no_grad():
        assert model(frames, state).shape == (2, 2)
        with pytest.raises(TypeError, match=r"uint8 \[B, H, W, 3\].*got torch.float32"):
            model(frames.float() * scale, state)


def train_and_register(tmp: Path, data: dict, features: list[str]) -> tuple[Any, dict, str]:
    """(the trained eager model, the register step's result, the tracking URI)."""
    from arf_trainer.publisher import load_trained_model, run_register

    uri = fresh_tracking_uri(tmp)
    prepare(tmp / "ws", data, features)
    artifacts = tmp / "artifacts"
    run_train(make_env(spec("train", "ws", features), tmp / "ws", uri, artifacts))
    registered = run_register(make_env(spec("register", "ws", features), tmp / "ws", uri,
                                       artifacts))
    model, _, _ = load_trained_model(tmp / "ws")
    return model, registered, uri


@pytest.mark.parametrize("state", [
    pytest.param(["qdot_0", "qdot_1", "cos_q0", "cos_q1", "sin_q0", "sin_q1"], id="reordered"),
    pytest.param(["cos_q0", "sin_q0"], id="some"),
    pytest.param([], id="frame-only")])
def test_evaluation_feeds_the_state_columns_the_model_was_trained_on(
        tmp_path: Path, episodes: dict, state: list[str]) -> None:
    import mlflow

    from arf_trainer.evaluator import load_policy

    model, registered, uri = train_and_register(tmp_path, episodes, ["image", *state])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    policy = load_policy(registered["model_name"], registered["model_version"])
    env = reach.make_env()
    obs, _ = env.reset(seed=5)
    env.close()
    frame = policy.renderer.render(reach_pixels.qpos_of(obs))
    joint = reach_pixels.state_of(obs)
    seen = joint[[list(reach_pixels.STATE_COLUMNS).index(n) for n in state]]
    with torch.no_grad():
        expected = model(torch.from_numpy(frame[None]), torch.from_numpy(seen[None]))[0]
    np.testing.assert_allclose(policy(obs), expected.numpy(), rtol=1e-5, atol=1e-6)


class AnyFrame(torch.nn.Module):
    def forward(self, image: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return image.float().mean(dim=(1, 2))[:, :2] + state[:, :2]


@pytest.mark.parametrize("image,state,fragment", [
    # Registered without arf's record of its state columns: fed the contract's 6 values by
    # position, so a model taking 4 is refused at load, before any episode or MLflow run.
    pytest.param((-1, 16, 16, 3), (-1, 4), r"takes a state of 4 values.*not recorded.*cos_q0",
                 id="state-width"),
    # Frame inputs the camera cannot fill were "no frames: use environment reach" or
    # "-1x-1 frames: train on square frames".
    pytest.param((-1, 16, 16, 4), (-1, 6), r"takes frames of shape \[-1, 16, 16, 4\].*"
                 r"image \[-1, H, W, 3\]", id="rgba"),
    pytest.param((-1, -1, -1, 3), (-1, 6), r"takes frames of shape \[-1, -1, -1, 3\].*"
                 r"-1 is any size", id="any-size")])
def test_a_signature_the_camera_cannot_feed_is_refused_when_loaded(
        tmp_path: Path, image: tuple, state: tuple, fragment: str) -> None:
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from arf_trainer.evaluator import load_policy

    uri = fresh_tracking_uri(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    example = (np.zeros((2, 16, 16, image[-1]), np.uint8), np.zeros((2, state[-1]), np.float32))
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), image, "image"),
                                              TensorSpec(np.dtype(np.float32), state, "state")]))
    experiment = mlflow.create_experiment("custom", artifact_location=str(tmp_path / "a"))
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(AnyFrame(), name="m", registered_model_name="custom",
                                 serialization_format="pt2", input_example=example,
                                 signature=signature, pip_requirements=["torch"])
    with pytest.raises(EvaluationError, match=rf"models:/custom/1 {fragment}"):
        load_policy("custom", "1")
