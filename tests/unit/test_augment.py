"""bc_pixels' random shifts (`random_shift`): what a shifted frame holds, that the draws are a
function of their key, and how the hyperparameter is checked on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arf_trainer.errors import DataMismatchError, TrainingError
from arf_trainer.trainer.augment import random_shift, shifts
from arf_trainer.trainer.hyperparameters import MAX_RANDOM_SHIFT, Hyperparameters
from arf_trainer.trainer.recipes_vision import PixelBehaviourCloning

BASE = {"epochs": 1, "batch_size": 8, "lr": 1e-3}


def _frames(batch: int = 6, height: int = 9, width: int = 7) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8))


def test_a_shifted_frame_is_its_frame_moved_with_the_border_repeated() -> None:
    """DrQ's pad-and-crop, checked against numpy's edge padding cropped at each offset."""
    frames, shift, key = _frames(), 3, (5, 0, 17)
    moved = random_shift(frames, shift, key)
    offsets = shifts(len(frames), shift, key)
    assert moved.dtype == torch.uint8 and moved.shape == frames.shape
    assert len({(int(r), int(c)) for r, c in offsets.T}) > 1  # not one offset for all
    for i, frame in enumerate(frames.numpy()):
        padded = np.pad(frame, ((shift, shift), (shift, shift), (0, 0)), mode="edge")
        top, left = shift + offsets[0, i], shift + offsets[1, i]
        np.testing.assert_array_equal(moved[i].numpy(),
                                      padded[top:top + frame.shape[0], left:left + frame.shape[1]])


def test_the_shifts_are_a_function_of_their_key() -> None:
    frames = _frames(batch=32)
    same = random_shift(frames, 4, (1, 0, 9))
    assert torch.equal(same, random_shift(frames, 4, (1, 0, 9)))
    for other in [(1, 0, 10), (1, 1, 9), (2, 0, 9)]:  # another step, rank, seed
        assert not torch.equal(same, random_shift(frames, 4, other))
    assert torch.equal(random_shift(frames, 0, (1, 0, 9)), frames)
    assert np.abs(shifts(10_000, 4, (3,))).max() == 4


def test_the_recipe_shifts_each_camera_by_its_own_draws_and_not_the_state() -> None:
    recipe = PixelBehaviourCloning()
    hp = Hyperparameters.parse("bc_pixels", {**BASE, "random_shift": 2})
    frames, state = _frames(), torch.randn(6, 4)
    x = {"image": frames, "image_1": frames.clone(), "state": state}
    out = recipe.augment(x, hp, (0, 0, 3))
    assert out["state"] is state
    assert not torch.equal(out["image"], frames) and not torch.equal(out["image"], out["image_1"])
    off = Hyperparameters.parse("bc_pixels", BASE)
    assert recipe.augment(x, off, (0, 0, 3)) is x


@pytest.mark.parametrize("value", [-1, MAX_RANDOM_SHIFT + 1, 2.5, True, "4"])
def test_a_bad_random_shift_is_named(value: object) -> None:
    with pytest.raises(TrainingError, match=rf"random_shift={value!r} is invalid .*from 0 \(off\)"):
        Hyperparameters.parse("bc_pixels", {**BASE, "random_shift": value})


def test_random_shift_is_for_bc_pixels_only_on_both_sides() -> None:
    from arf_training.template_sections import RECIPE_HYPERPARAMETERS

    with pytest.raises(TrainingError, match="'random_shift' is for recipe bc_pixels only"):
        Hyperparameters.parse("bc", {**BASE, "random_shift": 2})
    assert "random_shift" not in Hyperparameters.accepted("classifier")
    assert "random_shift" in RECIPE_HYPERPARAMETERS["bc_pixels"]
    assert "random_shift" not in RECIPE_HYPERPARAMETERS["bc"]


def test_a_shift_of_a_whole_side_is_refused_with_the_column() -> None:
    hp = Hyperparameters.parse("bc_pixels", {**BASE, "random_shift": 8})
    shapes = {"image": [8, 16, 3], "q": [], "a": []}
    with pytest.raises(DataMismatchError, match=r"random_shift=8 .* 8x16 frames of column 'image'"):
        PixelBehaviourCloning().describe_shapes(["image", "q"], ["a"], hp, shapes)
