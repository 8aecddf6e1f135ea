"""Bad inputs found by a review of the container side of training: each is refused with a
message naming it and the fix, exit code 2 (a retry would meet it again), never a traceback
and never a silent wrong result."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_digits

from arf_trainer.errors import SpecError, TrainerError
from arf_trainer.spec import JobSpec, StepEnv
from arf_trainer.trainer.run import run_train

HP = {"epochs": 2, "hidden_size": 16}  # 400 rows: 320 train / 64 = 5 steps an epoch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ARF_STREAM_WINDOW_ROWS"):
        monkeypatch.delenv(name, raising=False)


def train(tmp: Path, uri: str, hp: dict[str, Any] | None = None, **training: Any) -> dict:
    ws = tmp / "ws"
    if not (ws / "prepare").exists():
        prepare_digits(ws, rows=400)
    spec = make_spec("digits_smoke", hyperparameters=hp or HP,
                     training={"checkpoint_every_steps": 5, **training})
    result = run_train(make_env(spec, ws, uri, tmp / "art"))
    assert result is not None
    return result


def forget_result(tmp: Path) -> Path:
    """As if the run died after its last checkpoint: only checkpoints/ remain."""
    train_dir = tmp / "ws" / "train"
    for name in ("result.json", "model.pt", "model_info.json"):
        (train_dir / name).unlink()
    return train_dir / "checkpoints" / "step-10"


def flip_tensor_byte(path: Path) -> None:
    """Flip one bit inside the first tensor's bytes (torch.load does not notice)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:
                                                    record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + 1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda step: flip_tensor_byte(step / "shared.pt"), id="flipped-weight-bit"),
    pytest.param(lambda step: (step / "rank-00000.pt").write_bytes(b""), id="empty-rank-file"),
    pytest.param(lambda step: (step / "shared.pt").write_bytes(b"x" * 5000), id="garbage"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path,
                                                          damage: Callable[[Path], None]) -> None:
    uri = fresh_tracking_uri(tmp_path)
    train(tmp_path, uri)
    step = forget_result(tmp_path)
    damage(step)
    with pytest.raises(TrainerError, match=r"checkpoint file .*step-10/(shared|rank-00000)\.pt "
                       r"does not match the sha256 .*delete that folder") as caught:
        train(tmp_path, uri)
    assert caught.value.exit_code == 2


def test_an_undamaged_checkpoint_still_resumes_bitwise(tmp_path: Path) -> None:
    uri = fresh_tracking_uri(tmp_path)
    full = train(tmp_path, uri)
    step = forget_result(tmp_path)
    marker = json.loads((step / ".complete").read_text())
    assert set(marker["sha256"]) == {"shared.pt", "rank-00000.pt"}
    shutil.rmtree(step)  # resume from step-5, written with its digests too
    assert train(tmp_path, uri)["weights_sha256"] == full["weights_sha256"]


def test_a_checkpoint_of_an_earlier_format_is_checked_for_its_contents(tmp_path: Path) -> None:
    import torch

    uri = fresh_tracking_uri(tmp_path)
    train(tmp_path, uri)
    step = forget_result(tmp_path)
    (step / ".complete").write_text("10\n")  # the marker before digests were recorded
    state = torch.load(step / "rank-00000.pt", weights_only=True)
    del state["loss_sum"]
    torch.save(state, step / "rank-00000.pt")
    with pytest.raises(TrainerError, match=r"lacks rank-00000.pt:loss_sum") as caught:
        train(tmp_path, uri)
    assert caught.value.exit_code == 2


def test_a_checkpoint_of_another_configuration_names_the_difference(tmp_path: Path) -> None:
    uri = fresh_tracking_uri(tmp_path)
    train(tmp_path, uri)
    forget_result(tmp_path)
    with pytest.raises(TrainerError, match=r"differs in: hyperparameters.lr\)") as caught:
        train(tmp_path, uri, hp={**HP, "lr": 0.002})
    assert caught.value.exit_code == 2


def _edit_manifest(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(prepare: Path) -> None:
        manifest = json.loads((prepare / "manifest.json").read_text())
        edit(manifest)
        (prepare / "manifest.json").write_text(json.dumps(manifest))
    return apply


def _train_shard(manifest: dict) -> dict:
    return manifest["shards"]["train"][0]


@pytest.mark.parametrize("loading", ["memory", "stream"])
@pytest.mark.parametrize(("damage", "message"), [
    pytest.param(lambda p: (p / "manifest.json").write_text('{"features": ['),
                 r"manifest .* cannot be read as JSON", id="truncated-manifest"),
    pytest.param(_edit_manifest(lambda m: m.__setitem__("shards", [])),
                 r"has shards=\[\], expected an object", id="shards-not-an-object"),
    pytest.param(_edit_manifest(lambda m: _train_shard(m).__setitem__("rows", "x")),
                 r"shards.train\[0\].rows='x', expected a row count", id="rows-not-a-number"),
    pytest.param(_edit_manifest(lambda m: _train_shard(m).__setitem__("sha256", 7)),
                 r"shards.train\[0\].sha256=7, expected", id="sha256-not-a-digest"),
    pytest.param(_edit_manifest(lambda m: _train_shard(m).pop("path")),
                 r"shards.train\[0\].path=None", id="no-path"),
    pytest.param(_edit_manifest(lambda m: _train_shard(m).__setitem__("rows", 10)),
                 r"shard-00000.parquet does not match the manifest: 160 rows \(manifest: 10\)",
                 id="rows-differ-from-the-shard"),
    pytest.param(_edit_manifest(lambda m: m.__setitem__("features", ["nope"])),
                 r"no column\(s\) \['nope'\]", id="unknown-feature"),
    pytest.param(_edit_manifest(lambda m: m.__setitem__("features", "pixel_0")),
                 r"features='pixel_0', expected a non-empty list", id="features-a-string"),
])
def test_a_bad_manifest_is_refused_naming_the_field(tmp_path: Path, loading: str,
                                                    damage: Callable[[Path], None],
                                                    message: str) -> None:
    ws = tmp_path / "ws"
    prepare_digits(ws, rows=400)
    damage(ws / "prepare")
    with pytest.raises(TrainerError, match=message) as caught:
        train(tmp_path, "http://127.0.0.1:9", data_loading=loading)
    assert caught.value.exit_code == 2
    assert "rerun prepare" in str(caught.value)


def test_a_tampered_shard_is_bad_input(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    prepare_digits(ws, rows=400)
    shard = ws / "prepare" / "train" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(TrainerError, match=r"shard-00000.parquet does not match its sha256") \
            as caught:
        train(tmp_path, "http://127.0.0.1:9")
    assert caught.value.exit_code == 2


def _spec(**changes: Any) -> dict[str, Any]:
    spec = make_spec("digits_smoke")
    spec.update(changes)
    return spec


@pytest.mark.parametrize(("raw", "message"), [
    pytest.param([1, 2], r"job spec must be a JSON object, not list", id="a-list"),
    pytest.param(None, r"job spec must be a JSON object, not NoneType", id="null"),
    pytest.param(_spec(seed="abc"), r"seed='abc' must be an integer", id="seed-string"),
    pytest.param(_spec(seed=1.5), r"seed=1.5 must be an integer", id="seed-fraction"),
    pytest.param(_spec(seed=True), r"seed=True must be an integer", id="seed-bool"),
    pytest.param(_spec(run="x"), r"job spec run must be a JSON object", id="run-string"),
    pytest.param(_spec(run={"dag_id": "d", "run_id": "r", "task_id": "t", "try_number": "x"}),
                 r"run.try_number='x' must be an integer", id="try-number"),
    pytest.param(_spec(hyperparameters=[1]), r"hyperparameters must be a JSON object",
                 id="hyperparameters-list"),
    pytest.param(_spec(template=[1]), r"template must be a JSON object", id="template-list"),
    pytest.param(_spec(inputs=[1]), r"inputs must be a JSON object", id="inputs-list"),
    pytest.param(_spec(step=3), r"step must be a JSON string", id="step-number"),
])
def test_a_malformed_job_spec_is_a_spec_error(raw: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        JobSpec.from_dict(raw)


def test_a_job_spec_without_a_training_section_is_a_spec_error() -> None:
    spec = make_spec("digits_smoke")
    del spec["template"]["training"]
    with pytest.raises(SpecError, match=r"template has no 'training' section"):
        JobSpec.from_dict(spec).training  # noqa: B018


@pytest.mark.parametrize(("text", "message"), [
    pytest.param(b"\xff\xfe\x00", r"cannot read job spec .*utf-8", id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, r"is not valid JSON: maximum recursion",
                 id="nested-too-deep"),
])
def test_an_unreadable_job_spec_file_is_a_spec_error(tmp_path: Path, text: bytes,
                                                     message: str) -> None:
    (tmp_path / "spec.json").write_bytes(text)
    environ = {"ARF_JOB_SPEC": str(tmp_path / "spec.json"), "ARF_WORKSPACE": str(tmp_path),
               "ARF_TRACKING_URI": "sqlite:///x.db", "ARF_DATAHUB_URI": str(tmp_path)}
    with pytest.raises(SpecError, match=message):
        StepEnv.from_environ(environ)


@pytest.mark.parametrize(("training", "hp", "message"), [
    pytest.param({"checkpoint_every_steps": "x"}, {}, r"checkpoint_every_steps='x' must be a "
                 r"whole number", id="every-string"),
    pytest.param({"checkpoint_every_steps": 2.5}, {}, r"checkpoint_every_steps=2.5 must be a "
                 r"whole number", id="every-fraction"),
    pytest.param({"keep_checkpoints": "2"}, {}, r"keep_checkpoints='2' must be a whole number",
                 id="keep-string"),
    pytest.param({}, {"epochs": 0}, r"epochs=0 is invalid", id="epochs-0"),
])
def test_bad_training_settings_are_bad_input(tmp_path: Path, training: dict, hp: dict,
                                             message: str) -> None:
    with pytest.raises(TrainerError, match=message) as caught:
        train(tmp_path, "http://127.0.0.1:9", hp={**HP, **hp}, **training)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_stream_window_setting_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              value: str) -> None:
    monkeypatch.setenv("ARF_STREAM_WINDOW_ROWS", value)
    with pytest.raises(SpecError, match=rf"ARF_STREAM_WINDOW_ROWS='{value}' must be a whole"):
        train(tmp_path, "http://127.0.0.1:9", data_loading="stream")
