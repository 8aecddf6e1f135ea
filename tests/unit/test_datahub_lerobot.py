"""LeRobot datasets through `arf-trainer datahub ingest` (arf_trainer.datahub.lerobot): v2.1
and v3.0 layouts written as lerobot writes them, AV1 videos encoded by SVT-AV1 (lerobot's
default) and decoded by PyAV, each row given its own frame; then prepare and bc_pixels on
the table; and each bad dataset refused by name with nothing written."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lerobot_dataset import (FPS, SIDE, STATE, TASKS, WRIST, WRIST_SHAPE, level, write_v21,
                             write_v30)
from PIL import Image
from test_prepare import _manifest, step_env

from arf_trainer.cli import main as trainer_main
from arf_trainer.datahub.tables import list_tables, open_table

LENGTHS = [5, 7, 6, 4]
CAMERA = "observation.images.top"


@pytest.fixture(autouse=True)
def _quiet_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVT_LOG", "1")  # SVT-AV1 prints its configuration per file otherwise


def _ingest(hub: Path, name: str, dataset: Path) -> int:
    return trainer_main(["datahub", "ingest", "--hub", str(hub), name, str(dataset)])


@pytest.mark.parametrize("write", [write_v21, write_v30], ids=["v2.1", "v3.0"])
def test_every_row_gets_its_own_frame_and_typed_columns(tmp_path: Path, write) -> None:
    dataset = write(tmp_path / "so100", LENGTHS)
    assert _ingest(tmp_path / "hub", "so100", dataset) == 0
    table = open_table(tmp_path / "hub", "so100").dataset.to_table()
    assert table.num_rows == sum(LENGTHS)
    schema = table.schema
    assert schema.field("observation.state").type == pa.list_(pa.float32(), STATE)
    assert schema.field("action").type == pa.list_(pa.float32(), 2)
    assert schema.field(CAMERA).type == pa.binary() and schema.field("task").type == pa.string()
    errors = []
    for episode, frame, png, task in zip(*(table[c].to_pylist() for c in (
            "episode_index", "frame_index", CAMERA, "task")), strict=True):
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.size == (SIDE, SIDE) and image.mode == "RGB"
            errors.append(abs(np.asarray(image).astype(float).mean() - level(episode, frame)))
        assert task == TASKS[episode % 2]
    # Each frame's own grey level (AV1 is lossy: within 3); its neighbours are 5 or 12 away.
    assert max(errors) <= 3, max(errors)
    rows = {(e, f) for e, f in zip(table["episode_index"].to_pylist(),
                                   table["frame_index"].to_pylist(), strict=True)}
    assert rows == {(e, f) for e, n in enumerate(LENGTHS) for f in range(n)}


def test_rows_out_of_time_order_seek_back_for_their_frames(tmp_path: Path) -> None:
    """All episodes in one video file, the data rows in reverse: every row seeks back."""
    dataset = write_v30(tmp_path / "so100", LENGTHS, episodes_per_video=len(LENGTHS))
    path = dataset / "data" / "chunk-000" / "file-000.parquet"
    rows = pq.read_table(path)
    pq.write_table(rows.take(pa.array(range(rows.num_rows - 1, -1, -1))), path)
    assert _ingest(tmp_path / "hub", "so100", dataset) == 0
    table = open_table(tmp_path / "hub", "so100").dataset.to_table()
    for episode, frame, png in zip(*(table[c].to_pylist() for c in (
            "episode_index", "frame_index", CAMERA)), strict=True):
        with Image.open(io.BytesIO(png)) as image:
            assert abs(np.asarray(image).astype(float).mean() - level(episode, frame)) <= 3


def _prepare_two_cameras(tmp_path: Path, write) -> tuple[Path, dict]:
    """A two-camera dataset (top 64x64, wrist 48x64) ingested and prepared; (workspace,
    manifest)."""
    from arf_trainer.datahub.prepare import run_prepare

    hub, workspace = tmp_path / "hub", tmp_path / "ws"
    assert _ingest(hub, "so100", write(tmp_path / "so100", LENGTHS, wrist=True)) == 0
    dataset = {
        "query": f'SELECT episode_index, frame_index, "{CAMERA}", "{WRIST}", '
                 '"observation.state", action FROM so100',
        "decode": {CAMERA: {"format": "png", "shape": [SIDE, SIDE, 3]},
                   WRIST: {"format": "png", "shape": [*WRIST_SHAPE, 3]}},
        "features": [CAMERA, "observation.state", WRIST], "targets": ["action"],
        "order_by": ["episode_index", "frame_index"], "split_by": "episode_index",
        "validation_split": 0.5,
    }
    run_prepare(step_env(workspace, hub, "reach_pixels_bc", dataset=dataset))
    return workspace, _manifest(workspace)


@pytest.mark.parametrize("write", [write_v21, write_v30], ids=["v2.1", "v3.0"])
def test_each_camera_of_a_lerobot_table_prepares_with_its_own_frames(tmp_path: Path,
                                                                     write) -> None:
    workspace, manifest = _prepare_two_cameras(tmp_path, write)
    assert manifest["rows"] == sum(LENGTHS)
    assert manifest["features"] == [CAMERA, "observation.state", WRIST]
    columns = {c["name"]: c for c in manifest["columns"]}
    assert columns[CAMERA]["shape"] == [SIDE, SIDE, 3] and columns[CAMERA]["dtype"] == "uint8"
    assert columns[WRIST]["shape"] == [*WRIST_SHAPE, 3] and columns[WRIST]["dtype"] == "uint8"
    assert columns["action"]["shape"] == [2]
    assert 0 < manifest["val_rows"] < manifest["rows"]  # whole episodes on each side
    seen = 0
    for split in ("train", "val"):
        for shard in manifest["shards"][split]:
            table = pq.read_table(workspace / "prepare" / shard["path"])
            top = np.asarray(table[CAMERA].to_pylist(), dtype=np.int16)
            wrist = np.asarray(table[WRIST].to_pylist(), dtype=np.int16)
            for row, (episode, frame) in enumerate(zip(table["episode_index"].to_pylist(),
                                                       table["frame_index"].to_pylist())):
                assert np.abs(top[row] - level(episode, frame)).max() <= 2
                assert np.abs(wrist[row] - (255 - level(episode, frame))).max() <= 2
                seen += 1
    assert seen == sum(LENGTHS)


def test_a_two_camera_policy_trains_registers_and_serves_each_camera_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bc_pixels with one encoder per camera, from a LeRobot table to a registered model that
    `mlflow.pyfunc` serves from {image, state, image_1}; the plugin manifest names each input's
    column, and the one-camera reach_pixels evaluation refuses it by name."""
    import mlflow
    import torch
    from trainer_testkit import fresh_tracking_uri, make_env, make_spec

    from arf_trainer.errors import EvaluationError
    from arf_trainer.evaluator_pixels import frame_input
    from arf_trainer.publisher import load_trained_model, run_register
    from arf_trainer.trainer.run import run_train

    workspace, _ = _prepare_two_cameras(tmp_path, write_v30)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    uri = fresh_tracking_uri(tmp_path / "mlflow")
    hp = {"epochs": 1, "batch_size": 8, "hidden_size": 32}
    spec = make_spec("reach_pixels_bc", hyperparameters=hp)
    result = run_train(make_env(spec, workspace, uri, tmp_path / "artifacts"))
    assert result["recipe"] == "bc_pixels" and np.isfinite(result["metrics"]["val_loss"])
    model, info, _ = load_trained_model(workspace)
    assert len(model.net.extra_encoders) == 1
    assert info.arrays[WRIST] == [*WRIST_SHAPE, 3]

    registered = run_register(make_env(make_spec("reach_pixels_bc", "register",
                                                 hyperparameters=hp),
                                       workspace, uri, tmp_path / "artifacts"))
    tensors = registered["manifest"]["input"]["tensors"]
    assert [(t["name"], t.get("column", t.get("columns")), t["shape"]) for t in tensors] == [
        ("image", CAMERA, [-1, SIDE, SIDE, 3]), ("state", ["observation.state"], [-1, STATE]),
        ("image_1", WRIST, [-1, *WRIST_SHAPE, 3])]

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model_uri = f"models:/{registered['model_name']}/{registered['model_version']}"
    rng = np.random.default_rng(0)
    top = rng.integers(0, 256, (3, SIDE, SIDE, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (3, *WRIST_SHAPE, 3), dtype=np.uint8)
    state = rng.normal(size=(3, STATE)).astype(np.float32)
    served = mlflow.pyfunc.load_model(model_uri).predict(
        {"image": top, "state": state, "image_1": wrist})
    with torch.no_grad():
        expected = model(torch.from_numpy(top), torch.from_numpy(state),
                         torch.from_numpy(wrist)).numpy()
        other_wrist = model(torch.from_numpy(top), torch.from_numpy(state),
                            torch.from_numpy(255 - wrist)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(other_wrist, expected)  # the wrist camera reaches the action
    with pytest.raises(EvaluationError, match=r"takes 2 camera inputs .*'image', 'state', "
                                              r"'image_1'.*renders one view"):
        frame_input(model_uri)


def _info(dataset: Path) -> dict:
    return json.loads((dataset / "meta" / "info.json").read_text())


def _set_info(dataset: Path, **changes) -> None:
    info = _info(dataset)
    info.update(changes)
    (dataset / "meta" / "info.json").write_text(json.dumps(info))


def _old_version(dataset: Path) -> str:
    _set_info(dataset, codebase_version="v1.6")
    return "codebase_version 'v1.6' is not one this ingest reads (v2.0, v2.1, v3.0)"


def _missing_video(dataset: Path) -> str:
    video = dataset / "videos" / "chunk-000" / CAMERA / "episode_000002.mp4"
    video.unlink()
    return f"{video}: the video of camera '{CAMERA}', episode 2, is missing"


def _misaligned(dataset: Path) -> str:
    path = dataset / "data" / "chunk-000" / "episode_000001.parquet"
    rows = pq.read_table(path)
    times = rows["timestamp"].to_numpy().copy()
    times[3] += 0.4 / FPS  # 40 ms late: between two frames
    pq.write_table(rows.set_column(rows.schema.get_field_index("timestamp"), "timestamp",
                                   pa.array(times)), path)
    return ("episode 1, frame_index 3, timestamp 0.340000 s, camera 'observation.images.top': "
            f"{path.parents[2]}/videos/chunk-000/{CAMERA}/episode_000001.mp4: no frame within "
            "0.0001 s of 0.340000 s (the nearest is at 0.300000 s)")


def _wrong_shape(dataset: Path) -> str:
    info = _info(dataset)
    info["features"]["observation.state"]["shape"] = [STATE + 1]
    (dataset / "meta" / "info.json").write_text(json.dumps(info))
    return "column 'observation.state' does not fit meta/info.json's shape [7]"


def _damaged_video(dataset: Path) -> str:
    video = dataset / "videos" / "chunk-000" / CAMERA / "episode_000000.mp4"
    video.write_bytes(b"\x00" * 64)
    return f"{video}: not a readable video"


def _partly_downloaded(dataset: Path) -> str:
    (dataset / "data" / "chunk-000" / "episode_000003.parquet").unlink()
    return (f"{dataset}: data/ holds {sum(LENGTHS[:3])} frames in 3 files, but meta/info.json's "
            f"total_frames is {sum(LENGTHS)}: the dataset is incomplete")


@pytest.mark.parametrize("damage", [_old_version, _missing_video, _misaligned, _wrong_shape,
                                    _damaged_video, _partly_downloaded])
def test_a_bad_dataset_is_named_and_nothing_is_written(tmp_path: Path, damage, capsys) -> None:
    dataset = write_v21(tmp_path / "so100", LENGTHS)
    expected = damage(dataset)
    assert _ingest(tmp_path / "hub", "so100", dataset) == 2
    assert expected in capsys.readouterr().err
    assert "so100" not in list_tables(tmp_path / "hub")


def test_image_features_keep_their_encoded_bytes(tmp_path: Path) -> None:
    """dtype image: lerobot embeds each frame's PNG in the Parquet as {bytes, path}."""
    dataset = write_v21(tmp_path / "so100", [3])
    path = dataset / "data" / "chunk-000" / "episode_000000.parquet"
    pngs = []
    for value in (40, 80, 120):
        buffer = io.BytesIO()
        Image.fromarray(np.full((SIDE, SIDE, 3), value, dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    images = pa.array([{"bytes": b, "path": f"frame_{i}.png"} for i, b in enumerate(pngs)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pq.read_table(path).append_column("observation.images.wrist", images), path)
    info = _info(dataset)
    info["features"]["observation.images.wrist"] = {"dtype": "image",
                                                    "shape": [SIDE, SIDE, 3]}
    (dataset / "meta" / "info.json").write_text(json.dumps(info))
    assert _ingest(tmp_path / "hub", "so100", dataset) == 0
    table = open_table(tmp_path / "hub", "so100").dataset.to_table()
    assert table.schema.field("observation.images.wrist").type == pa.binary()
    assert sorted(table["observation.images.wrist"].to_pylist()) == sorted(pngs)


def test_the_readme_template_over_a_lerobot_table_lints(tmp_path: Path, capsys) -> None:
    """The README's so100_pick_bc template, checked against a hub that has the table."""
    import textwrap

    from arf_training.cli import main as arf_main

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("  ```yaml\n  # config_templates/so100_pick_bc.yaml")
    block = readme[start:readme.index("  ```\n", start + 10)].split("\n", 1)[1]
    template = tmp_path / "templates" / "so100_pick_bc.yaml"
    template.parent.mkdir()
    template.write_text(textwrap.dedent(block))
    hub = tmp_path / "hub"
    dataset = write_v30(tmp_path / "so100", [3], wrist=True)
    assert trainer_main(["datahub", "ingest", "--hub", str(hub), "--frames", "video",
                         "so100_pick", str(dataset)]) == 0
    assert arf_main(["templates", "lint", "--hub", str(hub), str(template)]) == 0
    assert "1 valid, 0 invalid" in capsys.readouterr().out
    # The lint does check the table name: the same template over another name fails.
    template.write_text(textwrap.dedent(block).replace("FROM so100_pick", "FROM so100_place"))
    assert arf_main(["templates", "lint", "--hub", str(hub), str(template)]) != 0


def test_a_one_channel_camera_is_stored_as_grey_png(tmp_path: Path) -> None:
    """A depth or mono camera: info.json shape [H, W, 1]; the frames decode to grey."""
    dataset = write_v21(tmp_path / "so100", [4, 3])
    info = _info(dataset)
    info["features"][CAMERA]["shape"] = [SIDE, SIDE, 1]
    (dataset / "meta" / "info.json").write_text(json.dumps(info))
    assert _ingest(tmp_path / "hub", "so100", dataset) == 0
    table = open_table(tmp_path / "hub", "so100").dataset.to_table()
    for episode, frame, png in zip(*(table[c].to_pylist() for c in (
            "episode_index", "frame_index", CAMERA)), strict=True):
        with Image.open(io.BytesIO(png)) as image:
            assert image.mode == "L" and image.size == (SIDE, SIDE)
            assert abs(np.asarray(image).astype(float).mean() - level(episode, frame)) <= 3
