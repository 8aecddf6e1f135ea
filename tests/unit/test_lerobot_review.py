"""Bad LeRobot datasets and bad `datahub seed` arguments found by a QA sweep: each is refused
with a message naming the file, field and value and saying what to do, never a traceback or a
silently short table, and nothing is written (arf_trainer.datahub.lerobot, video_frames,
seed, seed_pixels)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lerobot_dataset import TOP, write_v21, write_v30

from arf_trainer.cli import main as trainer_main
from arf_trainer.datahub.tables import list_tables, open_table

LENGTHS = [5, 4]  # long enough that a v3.0 video cut at 80 % fails at its seek


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One small v2.1 and one v3.0 dataset, encoded once and copied by each test."""
    root = tmp_path_factory.mktemp("lerobot")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SVT_LOG", "1")  # SVT-AV1 prints its configuration per file otherwise
        yield {"v2.1": write_v21(root / "v21", LENGTHS), "v3.0": write_v30(root / "v30", LENGTHS)}


def _copy(originals: dict[str, Path], version: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(originals[version], tmp_path / "so100"))


def _refused(tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str],
             *options: str) -> str:
    """The ingest's error message, after checking it failed cleanly and wrote no table."""
    hub = tmp_path / "hub"
    assert trainer_main(["datahub", "ingest", *options, "--hub", str(hub), "so100",
                         str(dataset)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "so100" not in list_tables(hub)
    return err


def _edit_info(dataset: Path, edit: Callable[[dict], object]) -> Path:
    """meta/info.json changed in place by `edit` (its return value is ignored)."""
    info_path = dataset / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    edit(info)
    info_path.write_text(json.dumps(info))
    return info_path


# 1 and 3: info.json's counts and chunks_size ------------------------------------------------

@pytest.mark.parametrize(("field", "value", "expected"), [
    pytest.param("total_frames", "99", 'total_frames is "99", but it must be a whole number '
                 '>= 0; write it as a JSON number, "total_frames": 99', id="total_frames-text"),
    pytest.param("total_frames", "eleven", 'total_frames is "eleven"', id="total_frames-word"),
    pytest.param("total_frames", 5.0, "total_frames is 5.0, but it must be a whole number",
                 id="total_frames-float"),
    pytest.param("total_frames", True, "total_frames is true", id="total_frames-bool"),
    pytest.param("total_episodes", "2", 'total_episodes is "2"', id="total_episodes-text"),
    pytest.param("total_episodes", -1, "total_episodes is -1", id="total_episodes-negative"),
    pytest.param("chunks_size", "abc", 'chunks_size is "abc", but it must be a whole number '
                 '>= 1; write lerobot\'s default, "chunks_size": 1000', id="chunks_size-text"),
    pytest.param("chunks_size", [1], "chunks_size is [1]", id="chunks_size-list"),
    pytest.param("chunks_size", -1, "chunks_size is -1, but it must be a whole number >= 1",
                 id="chunks_size-negative"),
    pytest.param("chunks_size", 0, "chunks_size is 0", id="chunks_size-zero"),
])
@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_a_count_in_info_json_that_is_not_a_whole_number_is_named(
        tmp_path: Path, originals, capsys, version: str, field: str, value, expected: str) -> None:
    dataset = _copy(originals, version, tmp_path)
    info_path = _edit_info(dataset, lambda info: info.update({field: value}))
    assert f"{info_path}: {expected}" in _refused(tmp_path, dataset, capsys)


def test_a_missing_total_frames_still_ingests_unchecked(tmp_path: Path, originals) -> None:
    """The rule kept: lerobot always writes total_frames; without it there is nothing to
    check the data files against, and the ingest reads them all."""
    dataset = _copy(originals, "v3.0", tmp_path)
    _edit_info(dataset, lambda info: (info.pop("total_frames"), info.pop("chunks_size")))
    assert trainer_main(["datahub", "ingest", "--hub", str(tmp_path / "hub"), "so100",
                         str(dataset)]) == 0
    assert open_table(tmp_path / "hub", "so100").dataset.count_rows() == sum(LENGTHS)


# 4: the features message --------------------------------------------------------------------

@pytest.mark.parametrize("features", [None, "x", {}], ids=["missing", "text", "empty"])
def test_info_json_without_features_shows_what_it_found(tmp_path: Path, originals, capsys,
                                                       features) -> None:
    dataset = _copy(originals, "v3.0", tmp_path)
    info_path = _edit_info(dataset, lambda info: info.update(features=features)
                           if features is not None else info.pop("features"))
    err = _refused(tmp_path, dataset, capsys)
    assert (f"{info_path}: 'features' must map column names to {{dtype, shape}}; found "
            f"{features!r}") in err
    assert "{features!r}" not in err


# 5: a damaged video is not a missing one ----------------------------------------------------

def _video(dataset: Path, version: str) -> Path:
    return (dataset / "videos" / "chunk-000" / TOP / "episode_000000.mp4" if version == "v2.1"
            else dataset / "videos" / TOP / "chunk-000" / "file-000.mp4")


# Cut at 0 %, 30 % ...: each fails at another point (open, no stream, no codec, decode,
# seek). These tiny files cut at 90 % still decode every frame, so they ingest, rightly.
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.5, 0.7, 0.8], ids=lambda k: f"keep{k}")
@pytest.mark.parametrize("frames", ["png", "video"])
@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_a_truncated_video_is_named_as_damaged_not_misplaced(
        tmp_path: Path, originals, capsys, version: str, frames: str, keep: float) -> None:
    dataset = _copy(originals, version, tmp_path)
    video = _video(dataset, version)
    data = video.read_bytes()
    video.write_bytes(data[:int(len(data) * keep)])
    err = _refused(tmp_path, dataset, capsys, "--frames", frames)
    assert str(video) in err
    assert "damaged or truncated" in err and "download it again" in err
    assert "must be where meta/info.json's video_path puts them" not in err


def test_a_missing_video_keeps_its_download_advice(tmp_path: Path, originals, capsys) -> None:
    dataset = _copy(originals, "v3.0", tmp_path)
    video = _video(dataset, "v3.0")
    video.unlink()
    err = _refused(tmp_path, dataset, capsys)
    assert f"{video}: the video of camera '{TOP}', episode 0, is missing" in err
    assert "damaged" not in err


@pytest.mark.parametrize("video_path", [
    "../outside/{video_key}/episode_{episode_index:06d}.mp4",
    "videos/../../{video_key}.mp4", "/tmp/{video_key}.mp4"])
def test_a_video_path_outside_the_dataset_is_refused(tmp_path: Path, originals, capsys,
                                                     video_path: str) -> None:
    """info.json's video_path must stay inside the dataset folder: the ingest reads what it
    names, and a `../` there would read (and store) a video from anywhere."""
    dataset = _copy(originals, "v2.1", tmp_path)
    # The real videos there: without the check the first path ingests them (checked).
    shutil.copytree(_video(dataset, "v2.1").parent, tmp_path / "outside" / TOP)
    _edit_info(dataset, lambda info: info.update(video_path=video_path))
    err = _refused(tmp_path, dataset, capsys)
    assert "outside the dataset folder" in err and "fix info.json" in err


# 6: a damaged data file is named --------------------------------------------------------------

@pytest.mark.parametrize("with_total", [True, False], ids=["total_frames", "no-total_frames"])
@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_a_damaged_data_file_is_named(tmp_path: Path, originals, capsys, version: str,
                                      with_total: bool) -> None:
    dataset = _copy(originals, version, tmp_path)
    if not with_total:
        _edit_info(dataset, lambda info: info.pop("total_frames"))
    damaged = sorted((dataset / "data").rglob("*.parquet"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:-40])  # the footer cut off
    err = _refused(tmp_path, dataset, capsys)
    assert f"{damaged}: this data file of the LeRobot dataset is not readable Parquet" in err
    assert "download it again" in err


# 7: no info.json, or one that is not an object ------------------------------------------------

@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_a_dataset_without_info_json_is_told_so(tmp_path: Path, originals, capsys,
                                                version: str) -> None:
    dataset = _copy(originals, version, tmp_path)
    (dataset / "meta" / "info.json").unlink()
    err = _refused(tmp_path, dataset, capsys)
    assert f"{dataset}: looks like a LeRobot dataset (" in err
    assert "but has no meta/info.json" in err and "download the dataset's meta folder" in err
    assert "no known format" not in err


@pytest.mark.parametrize("layout", ["meta-only", "videos-only", "data-chunks-only"])
def test_each_lerobot_mark_alone_names_the_missing_info_json(tmp_path: Path, originals,
                                                             capsys, layout: str) -> None:
    dataset = _copy(originals, "v2.1", tmp_path)
    (dataset / "meta" / "info.json").unlink()
    keep = {"meta-only": "meta", "videos-only": "videos", "data-chunks-only": "data"}[layout]
    for child in ("meta", "videos", "data"):
        if child != keep:
            shutil.rmtree(dataset / child)
    assert "but has no meta/info.json" in _refused(tmp_path, dataset, capsys)


def test_a_folder_unlike_lerobot_keeps_the_unknown_format_message(tmp_path: Path,
                                                                   capsys) -> None:
    folder = tmp_path / "so100"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "notes.txt").write_text("not a dataset")
    err = _refused(tmp_path, folder, capsys)
    assert "holds files of no known format" in err and "info.json" not in err


@pytest.mark.parametrize(("content", "kind"), [
    ("[1, 2]", "array"), ('"v3.0"', "string"), ("7", "number"), ("null", "null")])
def test_an_info_json_that_is_not_an_object_is_told_so(tmp_path: Path, originals, capsys,
                                                       content: str, kind: str) -> None:
    dataset = _copy(originals, "v3.0", tmp_path)
    info_path = dataset / "meta" / "info.json"
    info_path.write_text(content)
    err = _refused(tmp_path, dataset, capsys)
    assert f"{info_path}: holds a JSON {kind}, but info.json must be a JSON object" in err
    assert "codebase_version" not in err.split("must be a JSON object")[0]


# 2: seed checks every argument before writing -------------------------------------------------

@pytest.mark.parametrize("pixels", [True, False], ids=["pixels", "no-pixels"])
@pytest.mark.parametrize("size", ["0", "3", "-5"])
def test_seed_with_a_bad_frame_size_writes_nothing(tmp_path: Path, capsys, pixels: bool,
                                                   size: str) -> None:
    hub = tmp_path / "hub"
    argv = ["datahub", "seed", "--hub", str(hub), "--episodes", "1", "--frame-size", size]
    assert trainer_main(argv + (["--pixels"] if pixels else [])) == 2
    err = capsys.readouterr().err
    assert f"--frame-size={size} must be an integer from 8" in err and "Traceback" not in err
    assert list_tables(hub) == [] and not hub.exists()


def test_seed_force_with_another_frame_size_appends_nothing(tmp_path: Path, capsys) -> None:
    """The frame size of an existing reach_pixels is checked before reach_demos gets its
    new episodes, not after."""
    from arf_trainer.datahub.seed import seed_demo
    from arf_trainer.datahub.seed_pixels import seed_pixels
    from arf_trainer.errors import DataHubError

    hub = tmp_path / "hub"
    seed_demo(hub, episodes=1)
    seed_pixels(hub, episodes=1, seed=0, force=False, frame_size=16)
    before = {name: open_table(hub, name).version for name in list_tables(hub)}
    with pytest.raises(DataHubError, match=r"holds \[16\]-pixel frames.*--frame-size 16"):
        seed_demo(hub, episodes=1, force=True, pixels=True, frame_size=24)
    assert {name: open_table(hub, name).version for name in list_tables(hub)} == before
