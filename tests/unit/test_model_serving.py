"""Registered models through MLflow's python_function flavor: what `mlflow.pyfunc.load_model`,
`mlflow models serve` and `mlflow models predict` use. Each gives, for the input the plugin
manifest documents, the actions the evaluator gets from the same version through
`mlflow.pytorch.load_model`; and loading needs no arf_trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_recipe_vision import HP as PIXEL_HP
from test_recipe_vision import episodes, train  # noqa: F401 - episodes is a fixture
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_reach

from arf_trainer.publisher import input_example, load_trained_model, run_register
from arf_trainer.trainer.run import run_train

MLP_HP = {"epochs": 1, "hidden_size": 16, "num_layers": 1}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def mlp(store: Path) -> dict[str, Any]:
    """A bc (MLP) policy on the reach table's scalar columns obs_0..obs_9, registered."""
    ws, uri = store / "mlp", fresh_tracking_uri(store / "mlp-mlflow")
    prepare_reach(ws, rows=200)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        run_train(make_env(make_spec("reach_bc", hyperparameters=MLP_HP), ws, uri, store))
        registered = run_register(make_env(make_spec("reach_bc", "register",
                                                     hyperparameters=MLP_HP), ws, uri, store))
    return {**registered, "uri": uri, "workspace": ws}


@pytest.fixture(scope="module")
def pixels(store: Path, episodes: dict[str, np.ndarray]) -> dict[str, Any]:  # noqa: F811
    """A bc_pixels policy (16x16 frames + the joint state), registered."""
    uri = fresh_tracking_uri(store / "pixels-mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        train(store, episodes, "pixels", uri)
        spec = make_spec("reach_pixels_bc", "register", run_id="manual__pixels",
                         hyperparameters=PIXEL_HP)
        registered = run_register(make_env(spec, store / "pixels", uri, store))
    return {**registered, "uri": uri, "workspace": store / "pixels"}


def use(model: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tracking_uri(model["uri"])
    mlflow.set_registry_uri(model["uri"])


def flavors(model: dict[str, Any]) -> dict[str, Any]:
    import mlflow

    return mlflow.models.get_model_info(model["model_uri"]).flavors


def reach_observations(count: int) -> np.ndarray:
    from arf_trainer.sim import reach

    env = reach.make_env()
    try:
        return np.stack([env.reset(seed=seed)[0] for seed in range(count)])
    finally:
        env.close()


def test_mlp_model_predicts_through_pyfunc_as_the_evaluator_acts(mlp: dict[str, Any]) -> None:
    import mlflow

    from arf_trainer.evaluator import load_policy

    use(mlp)
    # MLflow's own pyfunc loader: the model ships no code.
    assert flavors(mlp).get("python_function", {}).get("loader_module") == "mlflow.pytorch"
    served = mlflow.pyfunc.load_model(mlp["model_uri"])
    _, info, _ = load_trained_model(mlp["workspace"])
    rows = input_example(mlp["workspace"], info)  # real rows, float32 [8, 10]
    policy = load_policy(mlp["model_name"], mlp["model_version"])
    expected = np.stack([policy(row) for row in rows])
    # The manifest's input: float32 [-1, 10] in the order of its features, which are columns.
    documented = mlp["manifest"]["input"]
    assert documented == {"features": [f"obs_{i}" for i in range(10)], "dtype": "float32",
                          "shape": [-1, 10]}
    np.testing.assert_allclose(served.predict(rows), expected, rtol=0, atol=1e-6)
    frame = pd.DataFrame(rows, columns=documented["features"])
    np.testing.assert_allclose(np.asarray(served.predict(frame)), expected, rtol=0, atol=1e-6)


def pixel_inputs(model: dict[str, Any], frames: np.ndarray, states: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """{name: array} as the plugin manifest documents the inputs (names and dtypes)."""
    values = {"image": frames, "state": states}
    return {t["name"]: np.asarray(values[t["name"]], dtype=t["dtype"])
            for t in model["manifest"]["input"]["tensors"]}


def test_pixel_model_predicts_through_pyfunc_as_the_evaluator_acts(
        pixels: dict[str, Any]) -> None:
    import mlflow

    from arf_trainer.evaluator import load_policy
    from arf_trainer.sim import reach_pixels

    use(pixels)
    model_flavors = flavors(pixels)
    assert model_flavors.get("python_function", {}).get("loader_module") == "arf_pt2_pyfunc"
    # mlflow.pytorch.load_model (the evaluator's way) adds no code of the model to sys.path.
    assert not model_flavors["pytorch"].get("code")
    served = mlflow.pyfunc.load_model(pixels["model_uri"])
    policy = load_policy(pixels["model_name"], pixels["model_version"])
    observations = reach_observations(3)
    frames = np.stack([policy.renderer.render(reach_pixels.qpos_of(obs))
                       for obs in observations])
    expected = np.stack([policy(obs) for obs in observations])
    predicted = served.predict(pixel_inputs(pixels, frames,
                                            reach_pixels.state_of(observations)))
    assert predicted.dtype == np.float32 and predicted.shape == (3, 2)
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)


def test_pyfunc_loads_on_the_cpu_the_model_was_exported_on(
        mlp: dict[str, Any], pixels: dict[str, Any], episodes: dict[str, np.ndarray],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's pyfunc loads a pytorch model on CUDA when the host has a GPU (or when this
    variable says so), and a pt2 archive exported on the CPU then refuses to load."""
    import mlflow

    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cuda")
    use(mlp)
    rows = input_example(mlp["workspace"], load_trained_model(mlp["workspace"])[1])
    assert mlflow.pyfunc.load_model(mlp["model_uri"]).predict(rows).shape == (8, 2)
    use(pixels)
    inputs = pixel_inputs(pixels, episodes["image"][:4], episodes["state"][:4])
    assert mlflow.pyfunc.load_model(pixels["model_uri"]).predict(inputs).shape == (4, 2)


def test_mlflow_models_predict_serves_the_pixel_model_without_arf_trainer(
        pixels: dict[str, Any], episodes: dict[str, np.ndarray],  # noqa: F811
        tmp_path: Path) -> None:
    """The CLI a platform runs, in a process where importing arf_trainer fails: the loader the
    model ships imports none of it, as a model server without arf-trainer installed needs."""
    import torch

    # A package of the same name ahead of the installed one on the path: any import fails.
    (tmp_path / "shadow" / "arf_trainer").mkdir(parents=True)
    (tmp_path / "shadow" / "arf_trainer" / "__init__.py").write_text(
        "raise ImportError('arf_trainer imported while serving a registered model')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow"),
           "MLFLOW_TRACKING_URI": pixels["uri"], "MLFLOW_REGISTRY_URI": pixels["uri"],
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    blocked = subprocess.run([sys.executable, "-c", "import arf_trainer"], env=env,
                             capture_output=True, text=True, check=False)
    assert "arf_trainer imported while serving" in blocked.stderr

    frames, states = episodes["image"][:3], episodes["state"][:3]
    request = {"inputs": {"image": frames.tolist(), "state": states.tolist()}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", pixels["model_uri"],
         "-i", str(tmp_path / "request.json"), "-t", "json", "-o", str(tmp_path / "out.json"),
         "--env-manager", "local"], env=env, capture_output=True, text=True, check=False,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"])
    module, _, _ = load_trained_model(pixels["workspace"])
    with torch.no_grad():
        expected = module(torch.from_numpy(frames), torch.from_numpy(states)).numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)
