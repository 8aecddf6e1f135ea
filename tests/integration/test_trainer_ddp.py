"""`torchrun --nproc_per_node=2 arf-trainer train`: real DDP over gloo, real MLflow (sqlite)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from trainer_testkit import (
    VENV_BIN,
    fresh_tracking_uri,
    make_spec,
    prepare_digits,
    step_environ,
)

pytestmark = pytest.mark.integration


def torchrun_train(tmp: Path, name: str, tracking_uri: str, loading: str = "auto",
                   **training: object) -> dict:
    workspace = tmp / name
    prepare_digits(workspace)
    spec = make_spec("digits_smoke", run_id=f"manual__{name}", hyperparameters={"epochs": 2},
                     training={"data_loading": loading, **training})
    spec_path = tmp / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = step_environ(spec_path, workspace, tracking_uri, tmp / "artifacts", f"manual__{name}")
    env["ARF_STREAM_WINDOW_ROWS"] = "256"  # streaming: 1437 rows in six windows
    proc = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python",
         str(VENV_BIN / "arf-trainer"), "train"],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Rank 0 alone reports progress.
    assert proc.stdout.count("epoch 2/2 | step 46/46") == 1, proc.stdout
    return json.loads((workspace / "train" / "result.json").read_text())


@pytest.mark.parametrize("loading", [
    pytest.param("auto", id="memory"),
    pytest.param("stream", id="stream", marks=pytest.mark.slow),  # two more torchrun runs
])
def test_two_process_training_is_reproducible_and_tracked(tmp_path: Path, loading: str) -> None:
    import mlflow

    uri = fresh_tracking_uri(tmp_path)
    first = torchrun_train(tmp_path, "a", uri, loading)
    second = torchrun_train(tmp_path, "b", uri, loading)

    assert first["world_size"] == 2 and first["steps"] == 2 * 23  # 1437 rows / (32 x 2)
    assert first["data_loading"] == ("memory" if loading == "auto" else "stream")
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["mlflow_run_id"] != second["mlflow_run_id"]
    assert first["metrics"] == second["metrics"]
    assert first["metrics"]["val_accuracy"] > 0.8

    client = mlflow.MlflowClient(uri)
    run = client.get_run(first["mlflow_run_id"])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["arf.world_size"] == "2" and tags["arf.template"] == "digits_smoke"
    assert tags["arf.dag_run"] == "arf_digits_smoke/manual__a"
    assert tags["arf.weights_sha256"] == first["weights_sha256"]
    assert tags["arf.config_hash"] == first["config_hash"]
    for key in ("arf.template_sha256", "arf.dag_id", "arf.dag_run_id", "arf.code_version",
                "arf.torch_version", "arf.data_fingerprint", "arf.data_tables"):
        assert tags[key], key
    assert run.data.params["world_size"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [23, 46]
    if loading == "auto":
        # Checkpoints written by a writer thread on each rank (its barriers on a gloo group of
        # their own, beside the training's all-reduces): the same weights, complete folders.
        third = torchrun_train(tmp_path, "c", uri, loading, async_checkpoint=True,
                               checkpoint_every_steps=10)
        assert third["weights_sha256"] == first["weights_sha256"]
        folders = sorted((tmp_path / "c" / "train" / "checkpoints").iterdir())
        assert [f.name for f in folders] == ["step-40", "step-46"]
        assert all(sorted(x.name for x in f.iterdir()) == [
            ".complete", "rank-00000.pt", "rank-00001.pt", "shared.pt"] for f in folders)
    assert run.inputs.dataset_inputs[0].dataset.name == "digits_smoke-train"
