"""The vision recipe bc_pixels through the real trainer (one process): frames uint8 from the
shards to the model, bitwise re-runs and resumes on both loading paths, the served model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from trainer_testkit import fresh_tracking_uri, make_env, make_spec

from arf_trainer.datahub.seed_pixels import image_column
from arf_trainer.errors import TrainingError
from arf_trainer.sim import reach, reach_pixels
from arf_trainer.spec import read_json
from arf_trainer.trainer.run import run_train

FRAME = 16
HP = {"epochs": 2, "batch_size": 32, "hidden_size": 32}
STATE = list(reach_pixels.STATE_COLUMNS)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bit-identical weights need the same thread count in every compared run.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def episodes() -> dict[str, np.ndarray]:
    """Three rendered expert episodes (150 rows): frames, joint state, actions."""
    renderer = reach_pixels.FrameRenderer(FRAME)
    env = reach.make_env()
    try:
        done = [reach_pixels.rollout(lambda _f, obs: reach.expert_action(obs), seed, renderer,
                                     env=env) for seed in (11, 12, 13)]
    finally:
        env.close()
        renderer.close()
    obs = np.concatenate([d.rollout.observations for d in done])
    return {"image": np.concatenate([d.frames for d in done]),
            "state": reach_pixels.state_of(obs),
            "act": np.concatenate([d.rollout.actions for d in done]),
            "episode": np.repeat(np.arange(3), reach.EPISODE_STEPS)}


def prepare_pixels(workspace: Path, data: dict[str, np.ndarray], wrist: bool = False) -> None:
    """What prepare writes for reach_pixels_bc: shards with a uint8 [16, 16, 3] image column
    (nested fixed_size_list), the manifest with each column's dtype and per-row shape. With
    `wrist`, a second camera after the state: the frames at half the size, upside down."""
    prepare = workspace / "prepare"
    columns: dict[str, pa.Array] = {"image": image_column(data["image"])}
    columns.update({name: pa.array(data["state"][:, j]) for j, name in enumerate(STATE)})
    columns.update({f"act_{j}": pa.array(data["act"][:, j]) for j in range(2)})
    features = ["image", *STATE]
    described = [{"name": "image", "type": "image", "dtype": "uint8", "shape": [FRAME, FRAME, 3]}]
    if wrist:
        columns["wrist"] = image_column(np.ascontiguousarray(data["image"][:, ::-2, ::2]))
        features.append("wrist")
        described.append({"name": "wrist", "type": "image", "dtype": "uint8",
                          "shape": [FRAME // 2, FRAME // 2, 3]})
    table = pa.table(columns)
    splits = {"train": data["episode"] != 2, "val": data["episode"] == 2}
    shards: dict[str, list[dict[str, Any]]] = {}
    for split, rows in splits.items():
        (prepare / split).mkdir(parents=True, exist_ok=True)
        rel = f"{split}/shard-00000.parquet"
        pq.write_table(table.filter(pa.array(rows)), prepare / rel)
        shards[split] = [{"path": rel, "rows": int(rows.sum()),
                          "sha256": hashlib.sha256((prepare / rel).read_bytes()).hexdigest()}]
    for column in described:
        column["type"] = str(table.schema.field(column["name"]).type)
    described += [{"name": n, "type": "float", "dtype": "float32", "shape": []}
                  for n in STATE + ["act_0", "act_1"]]
    manifest = {"query": "SELECT * FROM reach_pixels", "rows": len(data["act"]),
                "columns": described, "features": features,
                "targets": ["act_0", "act_1"], "tables": {"reach_pixels": {"version": 0}},
                "fingerprint": "f" * 64, "shards": shards, "validation_split": 0.1, "seed": 0}
    (prepare / "manifest.json").write_text(json.dumps(manifest))


def train(tmp: Path, data: dict[str, np.ndarray], workspace: str, uri: str,
          wrist: bool = False, shift: int = 0, **training: Any) -> dict[str, Any]:
    ws = tmp / workspace
    if not (ws / "prepare").exists():
        prepare_pixels(ws, data, wrist)
    hp = {**HP, "random_shift": shift} if shift else HP
    spec = make_spec("reach_pixels_bc", run_id=f"manual__{workspace}", hyperparameters=hp,
                     training=training)
    result = run_train(make_env(spec, ws, uri, tmp / "artifacts"))
    assert result is not None
    return result


@pytest.mark.parametrize(("loading", "wrist", "shift"), [
    pytest.param("memory", False, 0, id="memory"), pytest.param("stream", False, 0, id="stream"),
    pytest.param("stream", True, 0, id="stream-two-cameras"),
    pytest.param("memory", True, 2, id="memory-two-cameras-shifted")])
def test_bc_pixels_reruns_and_resumes_bit_identically(tmp_path: Path, episodes: dict,
                                                      loading: str, wrist: bool, shift: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARF_STREAM_WINDOW_ROWS", "40")  # 100 training rows in three windows
    uri = fresh_tracking_uri(tmp_path)
    training = {"data_loading": loading, "checkpoint_every_steps": 3}
    first = train(tmp_path, episodes, "a", uri, wrist, shift, **training)
    second = train(tmp_path, episodes, "b", uri, wrist, shift, **training)
    assert first["weights_sha256"] == second["weights_sha256"]
    if shift:  # the shifts are drawn and change what is learnt
        plain = train(tmp_path, episodes, "plain", uri, wrist, **training)
        assert plain["weights_sha256"] != first["weights_sha256"]
    assert first["steps"] == 2 * 4 and first["recipe"] == "bc_pixels"  # 100 rows / 32
    assert first["data_loading"] == loading
    assert np.isfinite(first["metrics"]["val_loss"])

    # Killed after step 6 (mid-epoch 2: its newest checkpoint and outputs never written):
    # the rerun resumes there and ends with the same bits.
    train_dir = tmp_path / "a" / "train"
    shutil.rmtree(train_dir / "checkpoints" / "step-8")
    for name in ("result.json", "model.pt", "model_info.json"):
        (train_dir / name).unlink()
    resumed = train(tmp_path, episodes, "a", uri, wrist, shift, **training)
    assert resumed["weights_sha256"] == first["weights_sha256"]

    info = read_json(train_dir / "model_info.json")
    cameras = {"image": [FRAME, FRAME, 3]}
    if wrist:
        cameras["wrist"] = [FRAME // 2, FRAME // 2, 3]
    assert info["recipe"] == "bc_pixels" and info["arrays"] == cameras
    assert info["input_width"] == len(STATE)


def test_bc_pixels_model_serves_raw_frames_and_registers(tmp_path: Path, episodes: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from arf_trainer.evaluator import load_policy
    from arf_trainer.publisher import load_trained_model, run_register

    uri = fresh_tracking_uri(tmp_path)
    train(tmp_path, episodes, "ws", uri)
    model, info, _ = load_trained_model(tmp_path / "ws")
    frames = torch.from_numpy(episodes["image"][:8])
    state = torch.from_numpy(episodes["state"][:8])
    assert frames.dtype == torch.uint8  # what the shards hold is what the model takes
    with torch.no_grad():
        out = model(frames, state)
    assert out.shape == (8, 2) and out.dtype == torch.float32
    # The normalization travels with the model: state and action statistics of the training
    # split, as buffers.
    train_rows = episodes["episode"] != 2
    np.testing.assert_allclose(model.output_mean.numpy(),
                               episodes["act"][train_rows].mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.state_mean.numpy(),
                               episodes["state"][train_rows].mean(axis=0), rtol=1e-4, atol=1e-5)

    # Registered in pt2 with the two-input signature; the evaluator reads the frame size from
    # it and rolls the registered model out on rendered frames (the same actions as the module).
    spec = make_spec("reach_pixels_bc", "register", run_id="manual__ws", hyperparameters=HP)
    registered = run_register(make_env(spec, tmp_path / "ws", uri, tmp_path / "artifacts"))
    assert registered["manifest"]["input"]["tensors"][0]["shape"] == [-1, FRAME, FRAME, 3]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    policy = load_policy(registered["model_name"], registered["model_version"])
    assert policy.pixels == (FRAME, FRAME, 3)
    env = reach.make_env()
    obs, _ = env.reset(seed=3)
    env.close()
    frame = policy.renderer.render(reach_pixels.qpos_of(obs))
    with torch.no_grad():
        expected = model(torch.from_numpy(frame[None]),
                         torch.from_numpy(reach_pixels.state_of(obs)[None]))[0].numpy()
    np.testing.assert_allclose(policy(obs), expected, rtol=1e-5, atol=1e-6)


def test_bc_pixels_needs_a_frame_column(tmp_path: Path, episodes: dict) -> None:
    from arf_trainer.trainer.recipes import Hyperparameters, get_recipe

    recipe = get_recipe("bc_pixels")
    hp = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
    with pytest.raises(TrainingError, match="one or more feature columns of RGB frames"):
        recipe.describe_shapes(STATE, ["act_0"], hp, {n: [] for n in STATE})
    info = recipe.describe_shapes(["image", *STATE], ["act_0", "act_1"], hp,
                                  {"image": [FRAME, FRAME, 3], **{n: [] for n in STATE}})
    columns = {"image": episodes["image"][:4].astype(np.float32),
               **{n: episodes["state"][:4, j] for j, n in enumerate(STATE)},
               "act_0": episodes["act"][:4, 0], "act_1": episodes["act"][:4, 1]}
    with pytest.raises(TrainingError, match=r"holds float32 \[16, 16, 3\].*expects uint8"):
        recipe.columns_to_tensors(info, columns, "training")
