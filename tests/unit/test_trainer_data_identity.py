"""A training stays bound to the prepared data it began on.

The checkpoint's config hash covers the template, hyperparameters and seed, not the rows: data
prepared again by hand in the same workspace (other table versions, another query) would have
resumed the old training or returned its finished result under the new data's lineage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_digits

from arf_trainer.datahub.shards import sha256_file
from arf_trainer.errors import TrainingError
from arf_trainer.spec import read_json
from arf_trainer.trainer.checkpoint import CheckpointError
from arf_trainer.trainer.run import run_train

HP = {"epochs": 2, "hidden_size": 16}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _train(tmp: Path, uri: str) -> dict:
    spec = make_spec("digits_smoke", run_id="manual__d", hyperparameters=HP,
                     training={"checkpoint_every_steps": 10})
    result = run_train(make_env(spec, tmp / "ws", uri, tmp / "artifacts"))
    assert result is not None
    return result


def _prepare_again_with_fewer_rows(ws: Path) -> str:
    shutil.rmtree(ws / "prepare")
    return prepare_digits(ws, rows=1200)["fingerprint"]


def test_a_resume_on_other_prepared_data_is_refused_naming_both_fingerprints(
        tmp_path: Path) -> None:
    uri = fresh_tracking_uri(tmp_path)
    ws = tmp_path / "ws"
    old = prepare_digits(ws)["fingerprint"]
    first = _train(tmp_path, uri)
    assert first["data_fingerprint"] == old
    train_dir = ws / "train"
    for name in ("result.json", "model.pt", "model_info.json"):
        (train_dir / name).unlink()  # interrupted after its checkpoints
    new = _prepare_again_with_fewer_rows(ws)
    assert new != old

    with pytest.raises(CheckpointError) as caught:
        _train(tmp_path, uri)
    message = str(caught.value)
    assert "other prepared data" in message and old[:12] in message and new[:12] in message
    assert "delete the checkpoints folder" in message
    # Nothing already done was lost: the checkpoints are still there.
    assert any((train_dir / "checkpoints").iterdir())

    shutil.rmtree(train_dir / "checkpoints")
    fresh = _train(tmp_path, uri)
    assert fresh["data_fingerprint"] == new and fresh["weights_sha256"] != first["weights_sha256"]


def test_a_finished_result_on_other_prepared_data_is_not_returned(tmp_path: Path) -> None:
    uri = fresh_tracking_uri(tmp_path)
    ws = tmp_path / "ws"
    prepare_digits(ws)
    first = _train(tmp_path, uri)
    assert _train(tmp_path, uri) == first  # the same data: the recorded result, as before
    new = _prepare_again_with_fewer_rows(ws)

    with pytest.raises(TrainingError, match="trained on other prepared data") as caught:
        _train(tmp_path, uri)
    assert new[:12] in str(caught.value)
    assert read_json(ws / "train" / "result.json") == first


def test_checkpoints_and_results_of_an_older_trainer_still_resume(tmp_path: Path) -> None:
    """Written before the fingerprint was recorded: no key, so nothing to compare."""
    uri = fresh_tracking_uri(tmp_path)
    ws = tmp_path / "ws"
    prepare_digits(ws)
    full = _train(tmp_path, uri)
    train_dir = ws / "train"
    for name in ("result.json", "model.pt", "model_info.json"):
        (train_dir / name).unlink()
    newest = max((train_dir / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(newest)
    older = max((train_dir / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    shared = torch.load(older / "shared.pt", weights_only=False)
    del shared["data_fingerprint"]
    torch.save(shared, older / "shared.pt")
    # The .complete marker records the files' sha256s: rewritten as that trainer would have.
    marker = read_json(older / ".complete")
    marker["sha256"]["shared.pt"] = sha256_file(older / "shared.pt")
    (older / ".complete").write_text(json.dumps(marker))

    resumed = _train(tmp_path, uri)
    assert resumed["weights_sha256"] == full["weights_sha256"]
