"""The built-in trainer, one process, for real: torch, Parquet shards, MLflow on sqlite."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from trainer_testkit import (
    fresh_tracking_uri,
    make_env,
    make_spec,
    prepare_digits,
    prepare_reach,
)

from arf_trainer.errors import TrainingError
from arf_trainer.publisher import load_trained_model
from arf_trainer.spec import read_json
from arf_trainer.trainer.checkpoint import load_weights, state_dict_sha256
from arf_trainer.trainer.run import ShardedBatchSampler, run_train

# Small enough to run in about a second: 1437 train rows / 64 = 23 steps per epoch.
DIGITS_HP = {"epochs": 3, "hidden_size": 32}
# The two loading paths: auto (these data are small: in memory) and forced streaming, with a
# shuffle window of 256 rows so that the 1437 rows span six windows (stream.py).
LOADING = [pytest.param("auto", id="memory"), pytest.param("stream", id="stream")]


def use_loading(monkeypatch: pytest.MonkeyPatch, loading: str) -> dict[str, str]:
    if loading == "stream":
        monkeypatch.setenv("ARF_STREAM_WINDOW_ROWS", "256")
    return {"data_loading": loading}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bit-identical weights need the same thread count in every compared run.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def train_digits(tmp: Path, workspace: str, run_id: str, tracking_uri: str,
                 **training: Any) -> dict[str, Any]:
    ws = tmp / workspace
    if not (ws / "prepare").exists():
        prepare_digits(ws)
    spec = make_spec("digits_smoke", run_id=run_id, hyperparameters=DIGITS_HP, training=training)
    result = run_train(make_env(spec, ws, tracking_uri, tmp / "artifacts"))
    assert result is not None
    return result


@pytest.mark.parametrize("loading", LOADING)
def test_weights_identical_across_fresh_workspaces(tmp_path: Path, loading: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = fresh_tracking_uri(tmp_path)
    training = use_loading(monkeypatch, loading)
    first = train_digits(tmp_path, "ws1", "manual__a", uri, **training)
    second = train_digits(tmp_path, "ws2", "manual__b", uri, **training)

    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["mlflow_run_id"] != second["mlflow_run_id"]
    assert first["steps"] == 3 * 23 and first["world_size"] == 1
    assert first["metrics"]["val_accuracy"] > 0.8
    ws = tmp_path / "ws1"
    assert read_json(ws / "train" / "result.json") == first
    assert state_dict_sha256(load_weights(ws / "train" / "model.pt")) == first["weights_sha256"]
    info = read_json(ws / "train" / "model_info.json")
    assert info["recipe"] == "classifier" and info["classes"] == list(range(10))
    assert info["features"][:2] == ["pixel_0", "pixel_1"] and info["n_features"] == 64
    # keep_checkpoints=2 in the template: only the two newest steps survive, all complete.
    steps = sorted((ws / "train" / "checkpoints").iterdir())
    assert [p.name for p in steps] == ["step-50", "step-69"]
    assert all((p / ".complete").is_file() for p in steps)

    run = mlflow.MlflowClient(uri).get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "arf_digits_smoke/manual__a"
    assert run.data.tags["arf.weights_sha256"] == first["weights_sha256"]
    assert run.data.tags["arf.dag_run"] == "arf_digits_smoke/manual__a"
    assert run.data.params["batch_size"] == "64" and run.data.params["recipe"] == "classifier"
    # The loading path is chosen automatically (or forced) and recorded.
    mode = "memory" if loading == "auto" else "stream"
    assert first["data_loading"] == mode and run.data.params["data_loading"] == mode
    assert run.data.tags["arf.data_loading"].startswith(
        f"{mode} (auto: " if loading == "auto" else "stream (training.data_loading: stream)")
    assert {"train_loss", "val_loss", "val_accuracy", "samples_per_s"} <= set(run.data.metrics)
    experiment = mlflow.MlflowClient(uri).get_experiment(first["experiment_id"])
    assert experiment.name == "digits_smoke"
    assert experiment.artifact_location == f"{tmp_path / 'artifacts'}/digits_smoke"


@pytest.mark.parametrize("writes", ["sync", "async"])
@pytest.mark.parametrize("loading", LOADING)
@pytest.mark.parametrize("every", [
    pytest.param(10, id="mid-epoch"),       # step-60 = batch 14 of epoch 3
    pytest.param(23, id="end-of-epoch"),    # step-46 = last batch of epoch 2, before its eval
])
def test_resume_after_interruption_gives_same_weights(tmp_path: Path, every: int, loading: str,
                                                     writes: str,
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with training.async_checkpoint: the periodic checkpoint resumed from was written
    by the writer thread."""
    uri = fresh_tracking_uri(tmp_path)
    training = {**use_loading(monkeypatch, loading), "checkpoint_every_steps": every,
                "async_checkpoint": writes == "async"}
    full = train_digits(tmp_path, "ws", "manual__r", uri, **training)
    train_dir = tmp_path / "ws" / "train"

    # "Crash" after the second-newest checkpoint: the newest one, the outputs and the result
    # never got written; a torn save left a temp folder behind.
    newest = max((p for p in (train_dir / "checkpoints").iterdir()),
                 key=lambda p: int(p.name.split("-")[1]))
    assert newest.name == "step-69"
    shutil.rmtree(newest)
    for name in ("result.json", "model.pt", "model_info.json"):
        (train_dir / name).unlink()
    (train_dir / "checkpoints" / ".tmp-step-69").mkdir()
    (train_dir / "checkpoints" / ".tmp-step-69" / "shared.pt").write_bytes(b"torn")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="arf_trainer"):
        resumed = train_digits(tmp_path, "ws", "manual__r", uri, **training)
    # It really resumed (training from scratch would give the same weights too), and only
    # the remaining epoch(s) ran.
    resumed_at = {10: "step-60 (epoch 3, after batch 14)", 23: "step-46 (epoch 2, after batch 23)"}
    assert f"checkpoints/{resumed_at[every]}" in caplog.text
    assert "epoch 2/3 |" not in caplog.text if every == 10 else "epoch 2/3 |" in caplog.text
    assert "epoch 3/3 |" in caplog.text and "epoch 1/3 |" not in caplog.text
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert resumed["steps"] == full["steps"]
    assert resumed["metrics"] == pytest.approx(full["metrics"])
    # The Airflow retry continues the same MLflow run.
    assert resumed["mlflow_run_id"] == full["mlflow_run_id"]
    assert not (train_dir / "checkpoints" / ".tmp-step-69").exists()

    # A retry after success returns the recorded result without training again.
    shutil.rmtree(train_dir / "checkpoints")
    again = train_digits(tmp_path, "ws", "manual__r", uri, **training)
    assert again == resumed
    assert not (train_dir / "checkpoints").exists()


def test_bc_model_is_self_contained(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    manifest = prepare_reach(ws)
    spec = make_spec("reach_bc", hyperparameters={"epochs": 20, "batch_size": 64,
                                                  "hidden_size": 64, "num_layers": 2})
    result = run_train(make_env(spec, ws, fresh_tracking_uri(tmp_path), tmp_path / "art"))
    assert result is not None and result["recipe"] == "bc"
    # Standardized MSE well under 1 = far better than predicting the mean action.
    assert result["metrics"]["val_loss"] < 0.3

    model, info, _ = load_trained_model(ws)
    assert info.features == manifest["features"] and info.targets == ["act_0", "act_1"]
    import pyarrow.parquet as pq

    table = pq.read_table(ws / "prepare" / manifest["shards"]["val"][0]["path"])
    x = torch.tensor(np.stack([table[c].to_numpy() for c in info.features], 1), dtype=torch.float32)
    y = np.stack([table[c].to_numpy() for c in info.targets], 1)
    with torch.no_grad():
        pred = model(x).numpy()
    # Raw observations in, actions in the data's units out (no outside normalization).
    assert pred.shape == (len(x), 2) and pred.dtype == np.float32
    assert (np.abs(pred - y).mean(axis=0) < 0.25 * y.std(axis=0)).all()


@pytest.mark.parametrize(("hyperparameters", "training", "world_size", "message"), [
    pytest.param({"dropout": 0.1}, {}, None,
                 r"'dropout' is not accepted by the built-in recipe 'classifier'; accepted "
                 r"names: epochs, batch_size, lr, hidden_size, num_layers, weight_decay",
                 id="unknown-hyperparameter"),
    pytest.param({"batch_size": 63}, {}, "2",
                 r"batch_size=63 is the global batch and must be divisible by the world size 2"
                 r".*use 62 or 64", id="batch-not-divisible"),
    pytest.param({"lr": -1.0}, {}, None, r"lr=-1.0 is invalid .* finite number > 0",
                 id="negative-lr"),
    pytest.param({}, {"recipe": None}, None, r"no training.recipe", id="no-recipe"),
    pytest.param({}, {"recipe": "gpt"}, None, r"training.recipe='gpt' is not a built-in recipe",
                 id="unknown-recipe"),
])
def test_bad_config_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          hyperparameters: dict, training: dict,
                                          world_size: str | None, message: str) -> None:
    if world_size:
        # As under torchrun: the check must fire before any process group exists.
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", world_size)
    spec = make_spec("digits_smoke", hyperparameters=hyperparameters, training=training)
    # No prepared data and an unusable tracking URI: validation must fail first.
    env = make_env(spec, tmp_path / "ws", "sqlite:///does/not/exist.db", tmp_path)
    with pytest.raises(TrainingError, match=message):
        run_train(env)
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("n,world,batch", [(1437, 1, 64), (1437, 2, 64), (10, 3, 4), (5, 8, 2), (2, 8, 1),
                                           (256, 2, 256)])
def test_sharded_batch_sampler_equals_torchs_samplers(n: int, world: int, batch: int) -> None:
    from torch.utils.data import BatchSampler, DistributedSampler

    for rank in range(world):
        ours = ShardedBatchSampler(n, world, rank, batch, seed=7)
        theirs = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                    seed=7)
        for epoch in (0, 1, 5):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            expected = list(BatchSampler(theirs, batch, drop_last=False))
            got = [b.tolist() for b in ours]
            assert got == expected, (n, world, rank, epoch)
            assert len(ours) == len(expected)
