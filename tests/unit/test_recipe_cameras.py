"""bc_pixels of several cameras (a LeRobot robot's top and wrist views): one encoder per camera,
inputs (image, state, image_1, ...), and a one-camera model unchanged by it. The model alone;
the whole path (ingest, prepare, train, register, serve) is in test_datahub_lerobot.py and the
bitwise re-run and resume in test_recipe_vision.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from arf_trainer.errors import TrainingError
from arf_trainer.trainer.recipes import Hyperparameters, get_recipe

RECIPE = get_recipe("bc_pixels")
HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01, hidden_size=16, num_layers=2)
TARGETS = {"act_0": [], "act_1": []}


def describe(cameras: dict[str, list[int]], state: tuple[str, ...] = ("s0", "s1")) -> Any:
    features = [*list(cameras)[:1], *state, *list(cameras)[1:]]
    return RECIPE.describe_shapes(features, list(TARGETS), HP,
                                  {**cameras, **{n: [] for n in state}, **TARGETS})


def test_a_one_camera_model_keeps_its_parameters() -> None:
    """Checkpoints and registered champions of one-camera models load (fine-tunes start from
    them), and a one-camera run draws the same initial weights as before several cameras: the
    first encoder is drawn first, so a two-camera model's first encoder has them too."""
    one = describe({"image": [16, 16, 3]})
    torch.manual_seed(0)
    model = RECIPE.build_model(one)
    convolutions = [f"net.encoder.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    head = [f"net.head.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert list(model.state_dict()) == ["state_mean", "state_std", "output_mean",
                                        "output_std", *convolutions, *head]
    torch.manual_seed(0)
    two = RECIPE.build_model(describe({"image": [16, 16, 3], "wrist": [8, 12, 3]}))
    assert [n for n in two.state_dict() if "extra_encoders" in n] == [
        f"net.extra_encoders.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    for name in convolutions:
        assert torch.equal(two.state_dict()[name], model.state_dict()[name])


def test_each_camera_trains_its_own_encoder() -> None:
    info = describe({"top": [16, 16, 3], "wrist": [8, 12, 3]})
    assert info.input_width == 2 and RECIPE.cameras(info).columns == ["top", "wrist"]
    assert RECIPE.state_positions(info) == [16 * 16 * 3, 16 * 16 * 3 + 1]
    model = RECIPE.build_model(info)
    generator = torch.Generator().manual_seed(0)
    top = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=generator)
    wrist = torch.randint(0, 256, (4, 8, 12, 3), dtype=torch.uint8, generator=generator)
    state = torch.randn(4, 2, generator=generator)
    model(top, state, wrist).square().sum().backward()
    for encoder in (model.net.encoder, model.net.extra_encoders[0]):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    with torch.no_grad():  # the batch dict of the training loop's validation: the same model
        batch = {"image": top, "image_1": wrist, "state": state}
        assert torch.equal(model(batch), model(top, state, wrist))
    with pytest.raises(TypeError, match=r"takes image, state, image_1: 2 camera frame "
                                        r"batch\(es\) and the state; got 1 frame batch"):
        model(top, state)


def test_camera_columns_the_model_cannot_take_are_named() -> None:
    with pytest.raises(TrainingError, match=r"takes up to 4 cameras .* 5 frame columns "
                                            r"\['c0', 'c1', 'c2', 'c3', 'c4'\]"):
        describe({f"c{i}": [8, 8, 3] for i in range(5)})
    # A grey camera beside an RGB one: named, not flattened into the state vector.
    with pytest.raises(TrainingError, match=r"column 'depth' holds \[16, 16, 1\] per row "
                                            r"\(1 channels\).*dataset.decode.depth with shape "
                                            r"\[16, 16, 3\]"):
        describe({"image": [16, 16, 3], "depth": [16, 16, 1]})
    with pytest.raises(TrainingError, match=r"column 'wrist' holds 4x4 frames"):
        describe({"image": [16, 16, 3], "wrist": [4, 4, 3]})
