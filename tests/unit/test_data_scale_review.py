"""Users' data at any size, driven for real (DuckDB prepare, Parquet shards, both loaders):
bad values named where they are, and the loaders' memory bounded for wide (frame) rows."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.split import GroupSplit
from arf_trainer.datahub.tables import write_table
from arf_trainer.errors import TrainingError
from arf_trainer.trainer.data import (
    DataValueError,
    Manifest,
    feature_matrix,
    load_manifest,
)
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.loaders import MemorySource, open_source
from arf_trainer.trainer.recipes import Hyperparameters, get_recipe
from arf_trainer.trainer.stream import StreamSource
from test_prepare import step_env

ONE = DistEnv(rank=0, local_rank=0, world_size=1, enabled=False)
EPISODES, STEPS = 12, 20


def _episode(val: bool) -> int:
    """An episode that split_by: episode (validation_split 0.5, seed 0) sends to that side."""
    keys = pa.record_batch({"episode": np.arange(EPISODES)})
    return int(np.flatnonzero(GroupSplit("episode", 0.5, 0).mask(keys) == val)[0])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real prepare over a hub table with one bad value per column, at known keys."""
    root = tmp_path_factory.mktemp("bad-values")
    n = EPISODES * STEPS
    episode, step = np.repeat(np.arange(EPISODES), STEPS), np.tile(np.arange(STEPS), EPISODES)
    at = (episode == _episode(val=False)) & (step == 7)
    clean = np.linspace(-1.0, 1.0, n)
    arrays = np.stack([clean, -clean, 2 * clean], 1).astype(np.float32)
    arrays[np.flatnonzero(at)[0], 1] = np.nan
    val = _episode(val=True)
    write_table(root / "hub", "t", pa.table({
        "episode": episode, "step": step.astype(np.int32), "x": clean, "y": clean,
        "x_nan": np.where(at, np.nan, clean), "y_inf": np.where(at, -np.inf, clean),
        "x_null": pa.array([None if a else float(c) for a, c in zip(at, clean)], pa.float64()),
        "joints": pa.FixedSizeListArray.from_arrays(pa.array(arrays.reshape(-1)), 3),
        "x_val_nan": np.where((episode == val) & (step == 2), np.nan, clean)}))
    run_prepare(step_env(root / "ws", root / "hub", dataset={
        "query": "SELECT * FROM t", "features": ["x"], "targets": ["y"],
        "split_by": "episode", "order_by": ["episode", "step"], "validation_split": 0.5}))
    return root / "ws" / "prepare"


def _manifest(prepared: Path, features: list[str], targets: list[str]) -> Manifest:
    manifest = load_manifest(prepared)
    manifest.raw.update(features=features, targets=targets)
    return manifest


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("features,targets,column,value", [
    pytest.param(["x_nan"], ["y"], "x_nan", "nan", id="nan-feature"),
    pytest.param(["x"], ["y_inf"], "y_inf", "-inf", id="inf-target"),
    pytest.param(["x", "joints"], ["y"], "joints", "nan", id="nan-array-element"),
    pytest.param(["x_null"], ["y"], "x_null", "null", id="null-feature"),
])
def test_a_bad_value_is_refused_naming_column_shard_row_and_key(
        prepared: Path, mode: str, features: list[str], targets: list[str], column: str,
        value: str) -> None:
    # Before: NaN/inf trained to exit 0 with train_loss nan and NaN weights; a null was
    # refused with a count only ("1 null value(s) in the train split").
    manifest = _manifest(prepared, features, targets)
    with pytest.raises(DataValueError, match=rf"column '{column}' .*{value}.* row \d+ of shard "
                                             r".*train/shard-00000\.parquet \(episode="
                                             rf"{_episode(val=False)}, step=7\)") as caught:
        open_source(mode, manifest, get_recipe("bc"), ONE)
    assert caught.value.exit_code == 2  # bad input: a retry reads the same rows


def test_the_stream_checks_the_validation_split_before_training(prepared: Path) -> None:
    # The streaming loader read validation rows only after an epoch of training.
    manifest = _manifest(prepared, ["x_val_nan"], ["y"])
    key = rf"\(episode={_episode(val=True)}, step=2\)"
    with pytest.raises(DataValueError, match=r"'x_val_nan' holds nan in the val split.*val/"
                                             rf"shard-00000\.parquet {key}"):
        StreamSource.scan(manifest, get_recipe("bc"))


def test_a_text_feature_is_named_with_its_type() -> None:
    columns = {"x": np.zeros(2), "label": np.array(["a", "b"], dtype=object)}
    with pytest.raises(TrainingError, match=r"feature column 'label' holds object values"):
        feature_matrix(columns, ["x", "label"])


def _frames(folder: Path, rows: int) -> Manifest:
    """One shard (one row group) of 32x32x3 uint8 frames with a state and a target column,
    described as prepare describes them."""
    prepare = folder / "prepare"
    (prepare / "train").mkdir(parents=True)
    pixels = (np.arange(rows * 3072) % 251).astype(np.uint8)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(pixels), 3)
    frame = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(inner, 32), 32)
    state = np.linspace(0.0, 1.0, rows, dtype=np.float32)
    pq.write_table(pa.table({"frame": frame, "q": state, "act": 2 * state}),
                   prepare / "train/shard-00000.parquet", row_group_size=rows)
    (prepare / "manifest.json").write_text(json.dumps({
        "features": ["frame", "q"], "targets": ["act"],
        "shards": {"train": [{"path": "train/shard-00000.parquet", "rows": rows}]},
        "columns": [{"name": "frame", "type": "fixed_size_list", "dtype": "uint8",
                     "shape": [32, 32, 3]},
                    {"name": "q", "type": "float", "dtype": "float32", "shape": []},
                    {"name": "act", "type": "float", "dtype": "float32", "shape": []}]}))
    return load_manifest(prepare)


def _numpy_peak(action) -> int:
    """Peak bytes NumPy allocated (tracemalloc sees NumPy's buffers) while `action` ran."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_stream_scan_reads_wide_rows_in_bounded_batches(tmp_path: Path) -> None:
    # 2,400 frames in one row group: the scan read them 4096 rows (capped by the group) at a
    # time and took float64 statistics of all 2,400 flattened frames at once (~150 MB here; with
    # 64x64x3 frames peak RSS 2.1 GB for 176 MB of them). Now ~8 MiB decoded per read.
    manifest = _frames(tmp_path, 2400)
    peak = _numpy_peak(lambda: StreamSource.scan(manifest, get_recipe("bc")))
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_in_memory_statistics_do_not_copy_every_pixel(tmp_path: Path) -> None:
    # The in-memory loader took mean/std of every flattened feature in float64, pixels
    # included (bc_pixels keeps only the state's): 12x the frames' bytes; 4.6 GB peak RSS for
    # 176 MB of 64x64x3 frames.
    manifest = _frames(tmp_path, 1200)
    recipe = get_recipe("bc_pixels")
    source = MemorySource.read(manifest)
    info = recipe.describe_data(manifest, Hyperparameters(epochs=1, batch_size=8, lr=1e-3),
                                source.labels, source.feature_width)
    model = recipe.build_model(info)
    peak = _numpy_peak(lambda: source.set_normalization(recipe, model, info))
    assert peak < source.train["frame"].nbytes, f"{peak / 2**20:.1f} MiB"
    state = np.linspace(0.0, 1.0, 1200)
    assert model.state_mean.item() == pytest.approx(state.mean(), rel=1e-6)
    assert model.state_std.item() == pytest.approx(state.std(), rel=1e-5)
    assert model.output_mean.item() == pytest.approx(2 * state.mean(), rel=1e-6)


def test_rows_the_recipe_cannot_train_on_are_bad_input_not_retried(tmp_path: Path) -> None:
    """A classifier's single label value (and the other recipe/data mismatches) exited 1, so
    Airflow retried a step that could only fail the same way."""
    import subprocess
    import sys

    from trainer_testkit import _write_prepare, make_spec, step_environ

    ws = tmp_path / "ws"
    columns = {"pixel_0": np.arange(40, dtype=np.float64), "label": np.zeros(40, dtype=np.int64)}
    _write_prepare(ws, columns, ["pixel_0"], ["label"], 0.2, shards=1, seed=0)
    spec = make_spec("digits_smoke", hyperparameters={"epochs": 1, "hidden_size": 8})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = step_environ(tmp_path / "spec.json", ws, f"sqlite:///{tmp_path}/mlflow.db",
                       tmp_path / "artifacts", "manual__1")
    out = subprocess.run([sys.executable, "-m", "arf_trainer.cli", "train"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "found 1 distinct label value(s) [0]" in out.stderr
