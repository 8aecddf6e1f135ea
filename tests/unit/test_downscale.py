"""Frames stored smaller by a whole factor (`dataset.decode.<c>.downscale`, arf_trainer.downscale):
the same bytes from prepare's numpy and the model's torch, in the shards, and in a registered
bc_pixels model that the reach_pixels evaluation feeds the camera's full frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_prepare import _manifest, step_env
from test_recipe_vision import HP, episodes, prepare_pixels  # noqa: F401 (a fixture)
from trainer_testkit import fresh_tracking_uri, make_env, make_spec

from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.seed_pixels import png_column
from arf_trainer.datahub.tables import write_table
from arf_trainer.downscale import block_mean, block_mean_torch
from arf_trainer.errors import SpecError
from arf_trainer.sim import reach, reach_pixels
from arf_trainer.trainer.run import run_train


@pytest.mark.parametrize("factor", [2, 3, 5])
def test_numpy_and_torch_give_each_block_its_mean_rounded_half_up(factor: int) -> None:
    rng = np.random.default_rng(factor)
    frames = rng.integers(0, 256, (4, 30, 60, 3), dtype=np.uint8)
    blocks = frames.reshape(4, 30 // factor, factor, 60 // factor, factor, 3).astype(np.float64)
    expected = np.floor(blocks.mean(axis=(2, 4)) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(block_mean(frames, factor), expected)
    np.testing.assert_array_equal(block_mean_torch(torch.from_numpy(frames), factor).numpy(),
                                  expected)
    half = np.array([[[[0], [1]], [[1], [0]]]], dtype=np.uint8)  # mean 0.5: rounds up
    assert block_mean(half, 2).item() == 1 == block_mean_torch(torch.from_numpy(half), 2).item()


def test_prepare_stores_decoded_frames_downscaled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 12, 16, 3), dtype=np.uint8)
    hub = tmp_path / "hub"
    write_table(hub, "cams", pa.table({"step": pa.array(range(6)), "act_0": pa.array([0.5] * 6),
                                       "frame": png_column(frames)}))
    dataset = {"query": "SELECT step, frame, act_0 FROM cams", "features": ["frame"],
               "targets": ["act_0"], "order_by": ["step"], "split_by": None,
               "validation_split": 0.0,
               "decode": {"frame": {"format": "png", "shape": [12, 16, 3], "downscale": 4}}}
    run_prepare(step_env(tmp_path / "ws", hub, dataset=dataset))
    manifest = _manifest(tmp_path / "ws")
    assert manifest["decode"]["frame"] == {"format": "png", "shape": [12, 16, 3],
                                           "downscale": 4}
    assert {c["name"]: c["shape"] for c in manifest["columns"]}["frame"] == [3, 4, 3]
    shard = pq.read_table(tmp_path / "ws" / "prepare" / manifest["shards"]["train"][0]["path"])
    stored = np.asarray(shard["frame"].to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(stored, block_mean(frames, 4))

    dataset["decode"]["frame"]["downscale"] = 3
    with pytest.raises(SpecError, match=r"dataset.decode.frame.downscale=3 must divide the "
                                        r"frame's height and width \(12x16\).*fit: \[2, 4\]"):
        run_prepare(step_env(tmp_path / "bad", hub, dataset=dataset))


def test_a_downscale_that_does_not_divide_the_frame_is_a_template_error() -> None:
    from arf_training.templates import TemplateError, parse_template

    text = (Path(__file__).resolve().parents[2] / "config_templates"
            / "reach_pixels_bc.yaml").read_text()
    shipped = "{format: png, shape: [64, 64, 3]}"
    assert shipped in text
    assert parse_template(text.replace(shipped, "{format: png, shape: [64, 64, 3], "
                                                "downscale: 2}"), "ok.yaml")
    with pytest.raises(TemplateError, match=r"downscale=3 must divide the frame's height and "
                                            r"width \(64x64\)"):
        parse_template(text.replace(shipped, "{format: png, shape: [64, 64, 3], downscale: 3}"),
                       "bad.yaml")
    # Stored frames too small for the encoder: found at lint time, not after prepare.
    with pytest.raises(TemplateError, match=r"shape \[64, 64, 3\] with downscale 16 stores 4x4 "
                                            r"frames; recipe bc_pixels needs at least 5"):
        parse_template(text.replace(shipped, "{format: png, shape: [64, 64, 3], downscale: 16}"),
                       "tiny.yaml")
    from arf_trainer.trainer.recipes_vision import MIN_FRAME_SIDE
    from arf_training import template_dataset

    assert template_dataset.MIN_FRAME_SIDE == MIN_FRAME_SIDE  # written on both sides


def test_a_downscaled_camera_is_served_and_evaluated_at_the_cameras_size(
        tmp_path: Path, episodes: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trained on 16x16 frames stored from the camera's 32x32 (downscale 2): registered as
    taking 32x32, and reach_pixels renders 32x32 frames that the model makes 16x16 itself;
    its action for a rendered frame is the action for that frame's block mean, bit for bit."""
    import mlflow

    from arf_trainer.evaluator import load_policy
    from arf_trainer.publisher import load_trained_model, run_register

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    workspace = tmp_path / "ws"
    prepare_pixels(workspace, episodes)  # 16x16 frames: what a downscale of 2 stores...
    manifest_path = workspace / "prepare" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())  # ...from the camera's 32x32 frames
    manifest["decode"] = {"image": {"format": "png", "shape": [32, 32, 3], "downscale": 2}}
    manifest_path.write_text(json.dumps(manifest))
    uri = fresh_tracking_uri(tmp_path)
    spec = make_spec("reach_pixels_bc", hyperparameters=HP)
    run_train(make_env(spec, workspace, uri, tmp_path / "artifacts"))
    model, info, _ = load_trained_model(workspace)
    assert info.downscale == {"image": 2} and info.arrays["image"] == [16, 16, 3]

    renderer = reach_pixels.FrameRenderer(32)
    env = reach.make_env()
    obs, _ = env.reset(seed=3)
    env.close()
    full = renderer.render(reach_pixels.qpos_of(obs))
    renderer.close()
    state = torch.from_numpy(reach_pixels.state_of(obs)[None])
    with torch.no_grad():
        served = model(torch.from_numpy(full[None]), state)
        stored = model(torch.from_numpy(block_mean(full[None], 2)), state)
        assert torch.equal(served, stored)
        with pytest.raises(TypeError, match=r"holds 24x24 frames.*takes 16x16 or the "
                                            r"camera's 32x32"):
            model(torch.zeros(1, 24, 24, 3, dtype=torch.uint8), state)
        with pytest.raises(TypeError, match="got torch.float32"):  # not averaged into uint8
            model(torch.from_numpy(full[None]).float() / 255, state)

    register = make_spec("reach_pixels_bc", "register", hyperparameters=HP)
    registered = run_register(make_env(register, workspace, uri, tmp_path / "artifacts"))
    image = registered["manifest"]["input"]["tensors"][0]
    assert image["shape"] == [-1, 32, 32, 3] and image["downscale"] == 2
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    policy = load_policy(registered["model_name"], registered["model_version"])
    assert policy.pixels == (32, 32, 3)  # the evaluation renders the camera's size
    np.testing.assert_allclose(policy(obs), stored[0].numpy(), rtol=1e-5, atol=1e-6)
