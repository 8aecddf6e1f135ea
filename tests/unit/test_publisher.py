"""`arf-trainer register` for real: train digits, register to MLflow (sqlite), load it back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_testkit import (fresh_tracking_uri, make_env, make_spec, prepare_digits,
                             prepare_reach)

from arf_trainer.errors import RegistryError
from arf_trainer.publisher import input_example, load_trained_model, run_register
from arf_trainer.trainer.run import run_train

HP = {"epochs": 1, "hidden_size": 32}
LINEAGE = ("arf.template", "arf.template_sha256", "arf.dag_id", "arf.dag_run_id",
           "arf.training_run_id", "arf.data_fingerprint", "arf.data_tables", "arf.config_hash",
           "arf.code_version", "arf.weights_sha256")


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_register_is_idempotent_and_loadable(tmp_path: Path) -> None:
    import mlflow

    ws, uri = tmp_path / "ws", fresh_tracking_uri(tmp_path)
    manifest = prepare_digits(ws)
    trained = run_train(make_env(make_spec("digits_smoke", hyperparameters=HP), ws, uri,
                                 tmp_path / "artifacts"))
    assert trained is not None
    env = make_env(make_spec("digits_smoke", "register", hyperparameters=HP), ws, uri,
                   tmp_path / "artifacts")

    first = run_register(env)
    second = run_register(env)  # an Airflow retry
    assert first == second
    assert first["model_name"] == "digits_classifier" and first["model_version"] == "1"
    assert first["model_uri"] == "models:/digits_classifier/1"
    assert first["training_run_id"] == trained["mlflow_run_id"]
    assert first["weights_sha256"] == trained["weights_sha256"]

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'digits_classifier'")
    assert [str(v.version) for v in versions] == ["1"]
    tags = versions[0].tags
    assert set(LINEAGE) <= set(tags)
    assert tags["arf.training_run_id"] == trained["mlflow_run_id"]
    assert tags["arf.weights_sha256"] == trained["weights_sha256"]
    assert tags["arf.data_fingerprint"] == manifest["fingerprint"]
    assert json.loads(tags["arf.data_tables"]) == {"test": 3}
    assert tags["arf.config_hash"] == trained["config_hash"]
    # One logged model in the run, not one per attempt.
    logged = client.search_logged_models(
        experiment_ids=[trained["experiment_id"]],
        filter_string=f"source_run_id = '{trained['mlflow_run_id']}'")
    assert len(logged) == 1
    assert logged[0].artifact_location.startswith(str(tmp_path / "artifacts" / "digits_smoke"))

    plugin = first["manifest"]
    assert plugin["id"] == "digits_classifier" and plugin["version"] == "1"
    assert plugin["weights_sha256"] == trained["weights_sha256"]
    assert plugin["input"] == {"features": manifest["features"], "dtype": "float32",
                               "shape": [-1, 64]}
    assert plugin["output"]["classes"] == list(range(10))
    assert plugin["lineage"] == {key: tags[key] for key in LINEAGE}
    artifact = mlflow.artifacts.download_artifacts(
        run_id=trained["mlflow_run_id"], artifact_path="arf_plugin.json",
        dst_path=str(tmp_path / "download"), tracking_uri=uri)
    assert json.loads(Path(artifact).read_text()) == plugin

    # The registered model reproduces the trained module, for any batch size.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    served = mlflow.pytorch.load_model("models:/digits_classifier/1")
    module, info, _ = load_trained_model(ws)
    x = torch.from_numpy(np.concatenate([input_example(ws, info)] * 5))[:37]
    with torch.no_grad():
        torch.testing.assert_close(served(x), module(x), rtol=0, atol=1e-6)
        # And through pyfunc (mlflow models serve / predict): the same logits.
        logits = mlflow.pyfunc.load_model("models:/digits_classifier/1").predict(x.numpy())
        np.testing.assert_allclose(logits, module(x).numpy(), rtol=0, atol=1e-6)


def test_an_array_feature_column_registers_flattened(tmp_path: Path) -> None:
    """One FLOAT[10] observation column: the model's input is its 10 values, and so is the
    export's input example (it stacked one object per column and failed to register)."""
    import mlflow

    ws, uri = tmp_path / "ws", fresh_tracking_uri(tmp_path)
    prepare_reach(ws, rows=200, arrays=True)
    hp = {"epochs": 1, "hidden_size": 16, "num_layers": 1}
    trained = run_train(make_env(make_spec("reach_bc", hyperparameters=hp), ws, uri,
                                 tmp_path / "artifacts"))
    assert trained is not None
    registered = run_register(make_env(make_spec("reach_bc", "register", hyperparameters=hp),
                                       ws, uri, tmp_path / "artifacts"))
    assert registered["manifest"]["input"] == {"features": ["obs"], "dtype": "float32",
                                               "shape": [-1, 10]}
    module, info, _ = load_trained_model(ws)
    example = input_example(ws, info)
    assert example.shape == (8, 10) and example.dtype == np.float32
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    served = mlflow.pytorch.load_model(registered["model_uri"])
    x = torch.from_numpy(example)
    with torch.no_grad():
        torch.testing.assert_close(served(x), module(x), rtol=0, atol=1e-6)


def test_register_without_training_says_so(tmp_path: Path) -> None:
    env = make_env(make_spec("digits_smoke", "register"), tmp_path / "ws",
                   fresh_tracking_uri(tmp_path), tmp_path)
    with pytest.raises(RegistryError, match=r"result.json does not exist; the train step must"):
        run_register(env)
