"""LeRobot cameras kept as videos (`arf datahub ingest ... --frames video`, `video_store`) and
decoded by prepare (`dataset.decode` format video, `decode_video`): the same pixels as the PNG
frames, each MP4 stored once by content, kept by vacuum and overwrite, and a missing or changed
video named with the row that needs it."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lerobot_dataset import SIDE, TOP, WRIST, WRIST_SHAPE, write_v21, write_v30
from test_prepare import _manifest, step_env

from arf_trainer.cli import main as trainer_main
from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.tables import list_tables, open_table
from arf_trainer.datahub.video_store import FRAME_REF, VIDEOS
from arf_trainer.errors import DataHubError, SpecError

LENGTHS = [5, 7, 6, 4]


@pytest.fixture(autouse=True)
def _quiet_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVT_LOG", "1")  # SVT-AV1 prints its configuration per file otherwise


def _ingest(hub: Path, name: str, dataset: Path, *options: str) -> int:
    return trainer_main(["datahub", "ingest", "--hub", str(hub), *options, name, str(dataset)])


def _dataset(table: str, fmt: str) -> dict:
    return {
        "query": f'SELECT episode_index, frame_index, "{TOP}", "{WRIST}", "observation.state", '
                 f"action FROM {table}",
        "decode": {TOP: {"format": fmt, "shape": [SIDE, SIDE, 3]},
                   WRIST: {"format": fmt, "shape": [*WRIST_SHAPE, 3]}},
        "features": [TOP, "observation.state", WRIST], "targets": ["action"],
        "order_by": ["episode_index", "frame_index"], "split_by": "episode_index",
        "validation_split": 0.5,
    }


def _frames(workspace: Path) -> dict[str, np.ndarray]:
    manifest = _manifest(workspace)
    out: dict[str, list] = {TOP: [], WRIST: []}
    for split in ("train", "val"):
        for shard in manifest["shards"][split]:
            table = pq.read_table(workspace / "prepare" / shard["path"])
            for camera in out:
                out[camera].extend(table[camera].to_pylist())
    return {camera: np.asarray(frames, dtype=np.uint8) for camera, frames in out.items()}


@pytest.mark.parametrize(("write", "files"), [(write_v21, 8), (write_v30, 4)],
                         ids=["v2.1", "v3.0"])
def test_video_frames_prepare_to_the_pixels_of_png_frames(tmp_path: Path, write, files: int,
                                                          capsys) -> None:
    hub = tmp_path / "hub"
    dataset = write(tmp_path / "so100", LENGTHS, wrist=True)
    assert _ingest(hub, "so100_png", dataset) == 0
    assert _ingest(hub, "so100", dataset, "--frames", "video") == 0
    table = open_table(hub, "so100").dataset.to_table()
    assert table.schema.field(TOP).type == FRAME_REF == table.schema.field(WRIST).type
    # Each MP4 once (v2.1: an episode's per camera; v3.0: two episodes a file), unchanged.
    stored = sorted((hub / "so100" / VIDEOS).iterdir())
    assert len(stored) == files
    originals = {p.read_bytes() for p in (dataset / "videos").rglob("*.mp4")}
    assert {p.read_bytes() for p in stored} == originals
    assert {p.stat().st_mode & 0o777 for p in stored} == {0o644}  # as the hub's other files
    assert trainer_main(["datahub", "describe", "--hub", str(hub), "so100"]) == 0
    size = sum(p.stat().st_size for p in stored)
    assert f"stored videos {files}  size {size / 1024:.1f} KB" in capsys.readouterr().out

    run_prepare(step_env(tmp_path / "png", hub, "reach_pixels_bc",
                         dataset=_dataset("so100_png", "png")))
    run_prepare(step_env(tmp_path / "video", hub, "reach_pixels_bc",
                         dataset=_dataset("so100", "video")))
    from_png, from_video = _frames(tmp_path / "png"), _frames(tmp_path / "video")
    for camera in (TOP, WRIST):
        assert from_video[camera].shape == from_png[camera].shape
        assert from_video[camera].shape[0] == sum(LENGTHS)
        np.testing.assert_array_equal(from_video[camera], from_png[camera])
    png, video = _manifest(tmp_path / "png"), _manifest(tmp_path / "video")
    # The same rows and pixels: the same shards, whichever way the frames were stored.
    assert video["fingerprint"] == png["fingerprint"]
    assert "av" in video["created_with"] and "libavcodec" in video["created_with"]
    assert "av" not in png["created_with"]
    assert video["decode"][WRIST] == {"format": "video", "shape": [*WRIST_SHAPE, 3]}


def test_rows_that_jump_between_episodes_of_one_video_get_their_own_frames(
        tmp_path: Path) -> None:
    """Ordered by frame, then episode: the rows alternate between the two episodes of each
    v3.0 video file, so the decoder seeks back and forth in it (and keeps both files open)."""
    hub = tmp_path / "hub"
    dataset = write_v30(tmp_path / "so100", LENGTHS, wrist=True)
    assert _ingest(hub, "so100_png", dataset) == 0
    assert _ingest(hub, "so100", dataset, "--frames", "video") == 0
    frames = {}
    for table, fmt in (("so100_png", "png"), ("so100", "video")):
        jumping = {**_dataset(table, fmt), "order_by": ["frame_index", "episode_index"]}
        run_prepare(step_env(tmp_path / fmt, hub, "reach_pixels_bc", dataset=jumping))
        frames[fmt] = _frames(tmp_path / fmt)
    for camera in (TOP, WRIST):
        np.testing.assert_array_equal(frames["video"][camera], frames["png"][camera])


def test_video_frames_downscale_as_png_frames_do(tmp_path: Path) -> None:
    from arf_trainer.downscale import block_mean

    hub = tmp_path / "hub"
    dataset = write_v30(tmp_path / "so100", LENGTHS, wrist=True)
    assert _ingest(hub, "so100", dataset, "--frames", "video") == 0
    run_prepare(step_env(tmp_path / "full", hub, "reach_pixels_bc",
                         dataset=_dataset("so100", "video")))
    smaller = _dataset("so100", "video")
    smaller["decode"][TOP]["downscale"] = 4
    smaller["decode"][WRIST]["downscale"] = 2
    run_prepare(step_env(tmp_path / "small", hub, "reach_pixels_bc", dataset=smaller))
    full, small = _frames(tmp_path / "full"), _frames(tmp_path / "small")
    np.testing.assert_array_equal(small[TOP], block_mean(full[TOP], 4))
    np.testing.assert_array_equal(small[WRIST], block_mean(full[WRIST], 2))
    assert small[WRIST].shape[1:] == (WRIST_SHAPE[0] // 2, WRIST_SHAPE[1] // 2, 3)


def _stored(hub: Path) -> list[Path]:
    return sorted((hub / "so100" / VIDEOS).iterdir())


def _first_video(hub: Path) -> Path:
    """The stored video of the first row's scene camera (episode 0, frame 0)."""
    sha = open_table(hub, "so100").dataset.head(1)[TOP][0].as_py()["video"]
    return hub / "so100" / VIDEOS / f"{sha}.mp4"


def _missing(hub: Path) -> str:
    _first_video(hub).unlink()
    return "is not in the data hub"


def _changed(hub: Path) -> str:
    video = _first_video(hub)
    video.write_bytes(video.read_bytes()[:-100])
    return "the stored video's bytes have changed"


@pytest.mark.parametrize("damage", [_missing, _changed])
def test_a_missing_or_changed_stored_video_is_named_with_its_row(tmp_path: Path,
                                                                  damage) -> None:
    hub = tmp_path / "hub"
    assert _ingest(hub, "so100", write_v30(tmp_path / "so100", LENGTHS, wrist=True),
                   "--frames", "video") == 0
    expected = damage(hub)
    with pytest.raises(DataHubError) as caught:
        run_prepare(step_env(tmp_path / "ws", hub, "reach_pixels_bc",
                             dataset=_dataset("so100", "video")))
    message = str(caught.value)
    assert expected in message
    assert f"dataset.decode.{TOP} (format video" in message
    assert "row 0 of dataset.query's result (episode_index=0, frame_index=0)" in message
    assert not (tmp_path / "ws" / "prepare" / "manifest.json").exists()


def _age_videos(hub: Path, days: float) -> None:
    for video in _stored(hub):
        os.utime(video, (video.stat().st_mtime - days * 86400,) * 2)


def test_a_vacuum_removes_the_videos_no_row_names_and_keeps_the_rest(tmp_path: Path) -> None:
    """Delta leaves the `_videos` folder alone; after a vacuum removes the overwritten
    version's data files, the videos only those rows named go too, unless they are inside the
    retention window or another table's rows name them. The latest version's frames decode."""
    import deltalake
    from test_datahub_maintenance import _age

    from arf_trainer.datahub.maintenance import describe_vacuum, vacuum

    hub = tmp_path / "hub"
    first = write_v30(tmp_path / "a", LENGTHS, wrist=True)
    assert _ingest(hub, "so100", first, "--frames", "video") == 0
    stored = _stored(hub)
    assert _ingest(hub, "so100", first, "--frames", "video") == 0  # appended: no new video
    assert _stored(hub) == stored
    assert _ingest(hub, "so100", write_v30(tmp_path / "b", [3, 3], wrist=True), "--frames",
                   "video", "--mode", "overwrite") == 0
    assert len(_stored(hub)) == len(stored) + 2
    _age(hub / "so100", 3)
    # Stored inside the window (an ingest in flight could be about to name them): kept.
    summary = vacuum(hub, "so100", 1)
    assert summary["files_removed"] > 0 and summary["unreadable_versions"] == "0, 1"
    assert summary["videos_removed"] == [] and len(_stored(hub)) == len(stored) + 2

    second = [v for v in _stored(hub) if v not in stored]
    (hub / "so100" / VIDEOS / ".incoming-x1y2").write_bytes(b"a stopped ingest's copy")
    _age_videos(hub, 3)
    kept = stored[0]  # named by another table's rows: the decoder looks in every store
    deltalake.write_deltalake(str(hub / "copied"), pa.table({"frame": pa.array(
        [[{"video": kept.stem, "timestamp": 0.0}]], type=pa.list_(FRAME_REF))}))
    dry = vacuum(hub, "so100", 1, dry_run=True)
    assert len(_stored(hub)) == len(stored) + 3  # a dry run deletes nothing
    gone = sorted([f"{VIDEOS}/{v.name}" for v in stored[1:]] + [f"{VIDEOS}/.incoming-x1y2"])
    assert sorted(dry["videos_removed"]) == gone and dry["video_bytes_removed"] > 0
    assert f"would remove {len(gone)} stored videos" in describe_vacuum(dry)
    done = vacuum(hub, "so100", 1)
    assert sorted(done["videos_removed"]) == gone
    assert f"removed {len(gone)} stored videos" in describe_vacuum(done)
    assert _stored(hub) == sorted([kept, *second])
    run_prepare(step_env(tmp_path / "new", hub, "reach_pixels_bc",
                         dataset=_dataset("so100", "video")))
    assert _manifest(tmp_path / "new")["rows"] == 6


def test_an_ingest_reusing_a_stored_video_makes_it_new_again(tmp_path: Path) -> None:
    """So that a vacuum running beside the ingest spares it, as it spares what was stored."""
    hub = tmp_path / "hub"
    dataset = write_v30(tmp_path / "a", LENGTHS, wrist=True)
    assert _ingest(hub, "so100", dataset, "--frames", "video") == 0
    _age_videos(hub, 3)
    assert _ingest(hub, "so100", dataset, "--frames", "video") == 0
    assert all(time.time() - v.stat().st_mtime < 3600 for v in _stored(hub))


def test_frames_video_needs_a_lerobot_dataset_and_a_bad_one_writes_no_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    from arf_training.cli import main as arf_main

    hub = tmp_path / "hub"
    loose = tmp_path / "rows.parquet"
    pq.write_table(open_table(_png_hub(tmp_path), "so100").dataset.to_table(), loose)
    monkeypatch.setenv("ARF_DATAHUB_URI", str(hub))  # `arf` passes --frames to its container
    assert arf_main(["datahub", "ingest", "rows", str(loose), "--frames", "video"]) != 0
    assert "--frames video stores a LeRobot dataset's camera videos" in capfd.readouterr().err
    dataset = write_v30(tmp_path / "so100", LENGTHS, wrist=True)
    (dataset / "videos" / WRIST / "chunk-000" / "file-001.mp4").unlink()
    assert _ingest(hub, "so100", dataset, "--frames", "video") != 0
    assert "is missing" in capfd.readouterr().err
    assert list_tables(hub) == []  # videos may have been stored; no table version was made
    restored = write_v30(tmp_path / "again", LENGTHS, wrist=True)
    assert _ingest(hub, "so100", restored, "--frames", "video") == 0
    assert open_table(hub, "so100").version == 0


def _png_hub(tmp_path: Path) -> Path:
    hub = tmp_path / "png_hub"
    assert _ingest(hub, "so100", write_v21(tmp_path / "small", [3])) == 0
    return hub


def test_a_decode_format_that_does_not_fit_the_column_is_named(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    dataset = write_v30(tmp_path / "so100", LENGTHS, wrist=True)
    assert _ingest(hub, "so100_png", dataset) == 0
    assert _ingest(hub, "so100", dataset, "--frames", "video") == 0
    with pytest.raises(SpecError, match=r"dataset.decode.observation.images.top: column "
                                         r"'observation.images.top' has type binary, not the "
                                         r"frame references"):
        run_prepare(step_env(tmp_path / "a", hub, "reach_pixels_bc",
                             dataset=_dataset("so100_png", "video")))
    with pytest.raises(SpecError, match=r"has type struct<video: string, timestamp: double>, "
                                         r"not binary"):
        run_prepare(step_env(tmp_path / "b", hub, "reach_pixels_bc",
                             dataset=_dataset("so100", "png")))
    rgba = _dataset("so100", "video")
    rgba["decode"][TOP]["shape"] = [SIDE, SIDE, 4]
    with pytest.raises(SpecError, match=r"C 1 or 3 \(format video\)"):
        run_prepare(step_env(tmp_path / "c", hub, "reach_pixels_bc", dataset=rgba))


def test_the_template_schema_takes_format_video_with_rgb_or_grey(tmp_path: Path) -> None:
    from arf_training.templates import TemplateError, parse_template

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("  ```yaml\n  # config_templates/so100_pick_bc.yaml")
    block = readme[start:readme.index("  ```\n", start + 10)].split("\n", 1)[1]
    text = textwrap.dedent(block)
    assert "{format: video, shape: [480, 640, 3], downscale: 5}" in text  # the README's
    assert parse_template(text, "so100.yaml")
    with pytest.raises(TemplateError, match=r"format video decodes frames to RGB"):
        parse_template(text.replace("shape: [480, 640, 3]", "shape: [480, 640, 4]", 1),
                       "rgba.yaml")
