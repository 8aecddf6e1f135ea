"""training.async_checkpoint: periodic checkpoints written and committed by a writer thread
while the loop trains on (trainer/checkpoint.py). The same weights and checkpoint contents as
written in the loop, the final checkpoint in the loop's thread, a writer's failure reported."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_digits

from arf_trainer.errors import SpecError, TrainingError
from arf_trainer.spec import JobSpec
from arf_trainer.trainer.checkpoint import Checkpointer
from arf_trainer.trainer.config import TrainConfig
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.run import run_train
from arf_trainer.trainer.testhooks import TestHooks

ONE = DistEnv(rank=0, local_rank=0, world_size=1, enabled=False)
HP = {"epochs": 3, "hidden_size": 32}  # 23 steps an epoch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _train(tmp: Path, name: str, uri: str, **training: Any) -> dict[str, Any]:
    ws = tmp / name
    prepare_digits(ws)
    spec = make_spec("digits_smoke", run_id=f"manual__{name}", hyperparameters=HP,
                     training={"checkpoint_every_steps": 10, "keep_checkpoints": 10, **training})
    result = run_train(make_env(spec, ws, uri, tmp / "artifacts"))
    assert result is not None
    return result


def test_periodic_saves_run_in_the_writer_thread_with_the_same_contents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commits: list[str] = []
    original = TestHooks.before_checkpoint_commit

    def spy(self: TestHooks) -> None:
        commits.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(TestHooks, "before_checkpoint_commit", spy)
    uri = fresh_tracking_uri(tmp_path)
    sync = _train(tmp_path, "sync", uri)
    assert commits == ["MainThread"] * 7  # steps 10 ... 60 and the final 69
    commits.clear()
    background = _train(tmp_path, "async", uri, async_checkpoint=True)
    assert commits == [f"checkpoint-step-{s}" for s in range(10, 70, 10)] + ["MainThread"]
    assert background["weights_sha256"] == sync["weights_sha256"]
    assert background["metrics"] == sync["metrics"]
    # Every checkpoint holds the same state, bit for bit (config aside: it names the switch).
    for step in (10, 30, 60, 69):
        files = {}
        for name in ("sync", "async"):
            folder = tmp_path / name / "train" / "checkpoints" / f"step-{step}"
            shared = torch.load(folder / "shared.pt", weights_only=True)
            rank = torch.load(folder / "rank-00000.pt", weights_only=True)
            files[name] = (shared["model"], shared["optimizer"], shared["progress"],
                           rank["rng"]["torch"], rank["loss_sum"], rank["samples"])
        for a, b in zip(files["sync"], files["async"], strict=True):
            _assert_same(a, b)


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert a.device == b.device == torch.device("cpu") and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_a_failed_background_write_is_raised_by_the_next_save(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "checkpoints", ONE, keep=2, every_steps=10,
                                async_writes=True)
    checkpointer.save(10, {"model": {"w": torch.ones(2)}}, {"rng": 1}, wait=False)
    # A lambda cannot be pickled: torch.save fails in the writer thread.
    checkpointer.save(20, {"model": {"w": torch.ones(2)}, "bad": lambda: 0}, {"rng": 2},
                      wait=False)
    with pytest.raises(TrainingError, match="writing a checkpoint in the background failed"):
        checkpointer.save(30, {"model": {"w": torch.ones(2)}}, {"rng": 3}, wait=False)
    checkpointer.wait()  # the error was reported once
    assert checkpointer.complete_steps() == [10]  # step-20 never became visible
    assert not (tmp_path / "checkpoints" / "step-20").exists()


def test_the_switch_is_checked() -> None:
    def config(**training: Any) -> TrainConfig:
        return TrainConfig.from_spec(JobSpec.from_dict(make_spec("digits_smoke",
                                                                 training=training)), 1)

    assert config(async_checkpoint=True).async_checkpoint is True
    assert config().async_checkpoint is False
    with pytest.raises(SpecError, match="training.async_checkpoint='yes' must be true or false"):
        config(async_checkpoint="yes")
