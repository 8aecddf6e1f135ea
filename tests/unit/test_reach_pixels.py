"""The reaching task seen by a camera: frames, the pixel rollout, the `reach_pixels` table."""

from __future__ import annotations

import gc
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from arf_trainer.errors import DataHubError
from arf_trainer.sim import reach, reach_pixels

EVAL_SEEDS = range(100_000, 100_010)


def target_from_frame(frame: np.ndarray) -> np.ndarray:
    """The target's (x, y) in metres from a frame alone: the centroid of its red pixels."""
    f = frame.astype(np.int16)
    weight = np.clip(f[..., 0] - np.maximum(f[..., 1], f[..., 2]) - 45, 0, None).astype(float)
    size, half = frame.shape[0], reach_pixels.VIEW_HALF_WIDTH
    centres = (np.arange(size) + 0.5) / size * 2 * half - half
    return np.array([(weight.sum(0) * centres).sum(), -(weight.sum(1) * centres).sum()]) \
        / weight.sum()


def pixel_expert(frame: np.ndarray, state: np.ndarray) -> np.ndarray:
    """The scripted expert given only what a pixel policy gets: the frame and joint state."""
    obs = np.zeros(reach.OBS_DIM)
    obs[[0, 1, 2, 3, 6, 7]] = state
    obs[4:6] = target_from_frame(frame)
    return reach.expert_action(obs)


@pytest.fixture(scope="module")
def renderer():
    r = reach_pixels.FrameRenderer(32)
    yield r
    r.close()


def test_frames_show_the_target_where_it_is(renderer) -> None:
    env = reach.make_env()
    try:
        for seed in EVAL_SEEDS:
            obs, _ = env.reset(seed=seed)
            frame = renderer.render(reach_pixels.qpos_of(obs))
            assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
            # One 32-pixel frame locates the target to ~1 cm (a pixel is 1.5 cm).
            assert np.linalg.norm(target_from_frame(frame) - obs[4:6]) < 0.012
            np.testing.assert_array_equal(frame, renderer.render(reach_pixels.qpos_of(obs)))
    finally:
        env.close()


def test_a_renderer_keeps_working_when_another_is_freed() -> None:
    """MuJoCo frees a render context on whatever GL context is current: freeing one renderer
    under another's context deleted the other's framebuffer (every later frame was stale)."""
    first, second = reach_pixels.FrameRenderer(16), reach_pixels.FrameRenderer(16)
    a, b = np.array([0.0, 0.0, 0.1, 0.1]), np.array([1.0, 0.5, -0.15, 0.05])
    frame_b = second.render(b)
    second.render(a)
    del first
    gc.collect()
    np.testing.assert_array_equal(second.render(b), frame_b)
    assert not np.array_equal(second.render(a), frame_b)
    second.close()


def test_pixel_rollout_is_the_reach_episode_with_frames(renderer) -> None:
    seen = reach_pixels.rollout(lambda _frame, obs: reach.expert_action(obs), 7, renderer)
    plain = reach.rollout(reach.expert_policy, 7)
    np.testing.assert_array_equal(seen.rollout.observations, plain.observations)
    np.testing.assert_array_equal(seen.rollout.actions, plain.actions)
    assert seen.frames.shape == (reach.EPISODE_STEPS, 32, 32, 3)
    state = reach_pixels.state_of(seen.rollout.observations)
    assert state.shape == (reach.EPISODE_STEPS, reach_pixels.STATE_DIM)
    # The state holds no target: the same arm pose with another target gives the same state.
    moved = seen.rollout.observations[0].copy()
    moved[4:6] += 0.05
    np.testing.assert_array_equal(reach_pixels.state_of(moved), state[0])


def test_a_policy_that_sees_only_frames_and_state_reaches_the_target(renderer) -> None:
    """The frames carry the target precisely enough: the expert, fed the target found in the
    frame instead of the true one, still reaches it (the state expert: 98 %)."""
    env = reach.make_env()
    try:
        done = [reach.rollout(reach_pixels.seen_by(pixel_expert, renderer), s, env=env)
                for s in EVAL_SEEDS]
    finally:
        env.close()
    assert sum(r.success for r in done) >= 8


def test_frame_size_is_checked() -> None:
    with pytest.raises(ValueError, match="frame size=4 must be an integer from 8 to 256"):
        reach_pixels.FrameRenderer(4)


def test_seed_reach_pixels_table(tmp_path: Path) -> None:
    import datetime as dt

    from arf_trainer.datahub.seed import _reach_rows
    from arf_trainer.datahub.seed_pixels import seed_pixels
    from arf_trainer.datahub.tables import open_table

    hub = tmp_path / "hub"
    summary = seed_pixels(hub, episodes=2, seed=3, force=False, frame_size=16)
    assert summary["action"] == "created" and summary["rows"] == 2 * reach.EPISODE_STEPS
    table = open_table(hub, "reach_pixels").dataset.to_table()
    # Frames are PNG bytes (a BLOB column), as reach_pixels_bc's dataset.decode declares.
    assert table.schema.field("image").type == pa.binary()
    frames = np.stack([np.asarray(Image.open(io.BytesIO(png), formats=["PNG"]))
                       for png in table.column("image").to_pylist()])
    assert frames.shape == (2 * reach.EPISODE_STEPS, 16, 16, 3) and frames.dtype == np.uint8
    state = np.stack([table.column(c).to_numpy() for c in reach_pixels.STATE_COLUMNS], axis=1)
    # The same episodes as reach_demos (same seeds, noise and labels), seen by the camera.
    demos = _reach_rows(2, 3, 0, dt.datetime.now(dt.UTC))
    for column in ("episode", "step", "act_0", "act_1", "success"):
        assert table.column(column).to_pylist() == demos.column(column).to_pylist()
    obs = np.stack([demos.column(f"obs_{j}").to_numpy() for j in range(10)], axis=1)
    np.testing.assert_array_equal(state, reach_pixels.state_of(obs))
    renderer = reach_pixels.FrameRenderer(16)
    np.testing.assert_array_equal(frames[5], renderer.render(reach_pixels.qpos_of(obs[5])))
    renderer.close()

    again = seed_pixels(hub, episodes=2, seed=3, force=False, frame_size=16)
    assert again["action"] == "unchanged"
    with pytest.raises(DataHubError, match=r"holds \[16\]-pixel frames.*--frame-size 16"):
        seed_pixels(hub, episodes=1, seed=4, force=True, frame_size=24)
    with pytest.raises(DataHubError, match="--frame-size=3 must be an integer from 8"):
        seed_pixels(hub, episodes=1, seed=4, force=True, frame_size=3)
    assert open_table(hub, "reach_pixels").version == 0  # the refused writes changed nothing


def test_a_hub_seeded_with_array_frames_is_converted_to_png(tmp_path: Path) -> None:
    # Earlier versions stored frames as uint8 arrays, which reach_pixels_bc no longer reads
    # (it decodes PNG): seeding again rewrites the same frames as PNG in a new version.
    from arf_trainer.datahub.decode import ImageDecoder
    from arf_trainer.datahub.seed_pixels import image_column, seed_pixels
    from arf_trainer.datahub.tables import open_table, write_table

    hub = tmp_path / "hub"
    seed_pixels(hub, episodes=1, seed=3, force=False, frame_size=16)
    png = open_table(hub, "reach_pixels").dataset.to_table()
    frames = ImageDecoder("image", "png", (16, 16, 3)).decode(png["image"].combine_chunks(),
                                                             lambda i: f"row {i}")
    as_arrays = png.set_column(png.schema.get_field_index("image"), "image",
                               image_column(np.asarray(frames.to_pylist(), dtype=np.uint8)))
    write_table(hub, "reach_pixels", as_arrays, mode="overwrite")  # version 1: the old layout

    summary = seed_pixels(hub, episodes=1, seed=3, force=False, frame_size=16)
    assert summary["action"] == "converted" and summary["version"] == 2
    assert open_table(hub, "reach_pixels").dataset.to_table().equals(png)
    assert seed_pixels(hub, episodes=1, seed=3, force=False, frame_size=16)["action"] == \
        "unchanged"
