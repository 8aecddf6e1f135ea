"""The streaming loader (arf_trainer.trainer.stream) on small real Parquet shards: per-rank
disjoint coverage, determinism, exact resume positions, array columns, and the loading choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arf_trainer.errors import TrainingError
from arf_trainer.trainer.data import Manifest, choose_loading, column_array, load_manifest
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.recipes import Hyperparameters, ModelInfo, Recipe, get_recipe
from arf_trainer.trainer.stream import StreamSource

HP = Hyperparameters(epochs=1, batch_size=8, lr=1e-3)


def write_shards(folder: Path, split_rows: dict[str, list[int]], frames: bool = False,
                 row_group: int = 7) -> Manifest:
    """Shards whose feature `id` is the row's global number (train ids, then val ids), with
    small row groups so that seeks cross them. `frames`: an array column `joints`
    (FLOAT[3]) and an image column `frame` (UTINYINT[4][4][3]) too."""
    prepare = folder / "prepare"
    shards: dict[str, list[dict]] = {}
    start = 0
    for split, sizes in split_rows.items():
        (prepare / split).mkdir(parents=True, exist_ok=True)
        shards[split] = []
        for i, rows in enumerate(sizes):
            ids = np.arange(start, start + rows)
            start += rows
            columns = {"id": pa.array(ids.astype(np.float64)),
                       "act": pa.array((ids % 5).astype(np.float64))}
            if frames:
                joints = np.stack([ids, -ids, 2 * ids], 1).astype(np.float32)
                columns["joints"] = pa.FixedSizeListArray.from_arrays(joints.reshape(-1), 3)
                image = (ids[:, None] + np.arange(48)[None, :]).astype(np.uint8)
                inner = pa.FixedSizeListArray.from_arrays(image.reshape(-1), 3)
                columns["frame"] = pa.FixedSizeListArray.from_arrays(
                    pa.FixedSizeListArray.from_arrays(inner, 4), 4)
            rel = f"{split}/shard-{i:05d}.parquet"
            pq.write_table(pa.table(columns), prepare / rel, row_group_size=row_group)
            shards[split].append({"path": rel, "rows": rows})
    features = ["id", "joints", "frame"] if frames else ["id"]
    manifest = {"features": features, "targets": ["act"], "shards": shards,
                "columns": [{"name": "id", "type": "double"}, {"name": "act", "type": "double"}]}
    (prepare / "manifest.json").write_text(json.dumps(manifest))
    return load_manifest(prepare)


def loader(manifest: Manifest, world: int, rank: int, window: int, recipe: Recipe | None = None,
           batch: int = 8, seed: int = 3):
    recipe = recipe or get_recipe("bc")
    source = StreamSource.scan(manifest, recipe, window_rows=window)
    info = recipe.describe(manifest.features, manifest.targets, HP, source.labels,
                           feature_width=source.feature_width)
    model = recipe.build_model(info)  # identity normalization: batches carry the raw ids
    denv = DistEnv(rank=rank, local_rank=rank, world_size=world, enabled=world > 1)
    return source.loader(recipe, info, model, denv, batch, seed)


def ids_of(batches) -> list[list[int]]:
    return [x[:, 0].to(torch.int64).tolist() for x, _ in batches]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_every_row_once_plus_torchs_padding(tmp_path: Path, world: int) -> None:
    manifest = write_shards(tmp_path, {"train": [30, 11, 20], "val": [9]})
    loaders = [loader(manifest, world, rank, window=16) for rank in range(world)]
    per_rank = [sum(ids_of(ld.batches(epoch=0, skip=0)), []) for ld in loaders]
    flat = sum(per_rank, [])
    assert {len(rows) for rows in per_rank} == {-(-61 // world)}
    assert sorted(set(flat)) == list(range(61))  # every training row, no validation row
    assert len(flat) - 61 == (-61) % world  # padding only, as DistributedSampler pads
    assert all(ld.steps_per_epoch == len(list(ld.batches(0, 0))) for ld in loaders)
    # It is shuffled: not the stream order, and windows do not stay in shard order.
    assert per_rank[0] != sorted(per_rank[0])


def test_order_is_a_function_of_seed_and_epoch(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path, {"train": [30, 11, 20], "val": [9]})
    first = ids_of(loader(manifest, 2, 1, window=16).batches(0, 0))
    again = ids_of(loader(manifest, 2, 1, window=16).batches(0, 0))
    assert first == again
    assert ids_of(loader(manifest, 2, 1, window=16).batches(1, 0)) != first
    assert ids_of(loader(manifest, 2, 1, window=16, seed=4).batches(0, 0)) != first


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_every_resume_position_gives_the_remaining_batches_exactly(
        tmp_path: Path, world: int, rank: int) -> None:
    manifest = write_shards(tmp_path, {"train": [30, 11, 20], "val": [9]}, row_group=5)
    stream = loader(manifest, world, rank, window=16, batch=3)
    for epoch in (0, 1):
        full = list(stream.batches(epoch, 0))
        assert len(full) == stream.steps_per_epoch
        for skip in range(len(full) + 1):
            resumed = list(stream.batches(epoch, skip))
            assert len(resumed) == len(full) - skip
            for (x, y), (x0, y0) in zip(resumed, full[skip:]):
                assert torch.equal(x, x0) and torch.equal(y, y0)


def test_validation_is_split_over_ranks_without_padding(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path, {"train": [10], "val": [9, 12]})
    seen = []
    for rank in range(2):
        for x, _ in loader(manifest, 2, rank, window=4).val_chunks():
            seen += x[:, 0].to(torch.int64).tolist()
    assert sorted(seen) == list(range(10, 31))


def test_statistics_match_the_whole_split(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path, {"train": [30, 11, 20], "val": [9]})
    source = StreamSource.scan(manifest, get_recipe("bc"), window_rows=16)
    ids = np.arange(61, dtype=np.float64)
    assert source.x_stats[0].item() == pytest.approx(ids.mean())
    assert source.x_stats[1].item() == pytest.approx(ids.std())
    assert source.y_stats[0].item() == pytest.approx((ids % 5).mean())
    labels = StreamSource.scan(manifest, get_recipe("classifier")).labels
    assert labels.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_checkpoint_of_another_layout_is_refused(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path, {"train": [30, 11, 20], "val": [9]})
    state = loader(manifest, 1, 0, window=16).state()
    loader(manifest, 1, 0, window=16).check_state(state)
    with pytest.raises(TrainingError, match=r"window_rows.*16.*window_rows.*8.*delete the "
                                            r"checkpoints folder"):
        loader(manifest, 1, 0, window=8).check_state(state)


def test_array_columns_flatten_for_the_mlp_and_keep_dtype_and_shape(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path, {"train": [20], "val": [4]}, frames=True)
    table = pq.read_table(manifest.folder / "train" / "shard-00000.parquet")
    frame = column_array(table.column("frame").slice(5, 3), "frame", "test")
    assert frame.dtype == np.uint8 and frame.shape == (3, 4, 4, 3)
    assert frame[0].reshape(-1).tolist() == [(5 + i) % 256 for i in range(48)]
    stream = loader(manifest, 1, 0, window=8)
    x, _ = next(iter(stream.batches(0, 0)))
    assert x.shape == (8, 1 + 3 + 48) and x.dtype == torch.float32
    row = int(x[0, 0])
    assert x[0, 1:4].tolist() == [row, -row, 2 * row]
    assert x[0, 4:].tolist() == [float((row + i) % 256) for i in range(48)]
    assert stream.info.n_features == 52


class FramesRecipe(type(get_recipe("bc"))):
    """A vision recipe's shape of inputs: a dict of tensors by column, frames kept uint8."""

    fits_normalization = False

    def columns_to_tensors(self, info: ModelInfo, columns, split):
        inputs = {"frame": torch.from_numpy(columns["frame"]),
                  "joints": torch.from_numpy(columns["joints"])}
        return inputs, torch.from_numpy(columns["act"].astype(np.float32))[:, None]

    def training_tensors(self, model, x, y):
        return x, y


def test_a_recipe_can_take_columns_as_a_dict_of_tensors(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path, {"train": [20], "val": [5]}, frames=True)
    stream = loader(manifest, 2, 1, window=8, recipe=FramesRecipe(), batch=4)
    batches = list(stream.batches(0, 0))
    x, y = batches[0]
    assert x["frame"].dtype == torch.uint8 and x["frame"].shape == (4, 4, 4, 3)
    assert x["joints"].dtype == torch.float32 and x["joints"].shape == (4, 3)
    assert y.shape == (4, 1)
    for x, _ in batches:  # each frame is its row's (id + i) % 256: windows 2+ come from
        # slices of Parquet batches, which pyarrow 25's take misread (arrow_types.unsliced)
        ids = x["joints"][:, 0].to(torch.int64)
        assert torch.equal(x["frame"].reshape(len(ids), -1).to(torch.int64),
                           (ids[:, None] + torch.arange(48)) % 256)
    resumed = list(stream.batches(0, 1))
    assert torch.equal(resumed[0][0]["frame"], batches[1][0]["frame"])
    val = list(stream.val_chunks())
    assert sum(len(v[1]) for v in val) == 2 and val[0][0]["frame"].dtype == torch.uint8


@pytest.mark.parametrize("requested,memory,expected", [
    pytest.param("auto", None, "memory", id="auto-small"),
    pytest.param("auto", "1Ki", "stream", id="auto-over-budget"),
    pytest.param("stream", None, "stream", id="forced-stream"),
    pytest.param("memory", "1Ki", "memory", id="forced-memory"),
])
def test_loading_choice(tmp_path: Path, requested: str, memory: str | None,
                        expected: str) -> None:
    manifest = write_shards(tmp_path, {"train": [30], "val": [9]})
    mode, why = choose_loading(requested, manifest, memory)
    assert mode == expected
    assert ("auto:" in why) == (requested == "auto")


def test_the_choice_counts_array_columns_by_their_dtype_and_shape(tmp_path: Path) -> None:
    """A manifest of prepare's array columns ("dtype", "shape"): 1,000 uint8 64x64x3 frames are
    ~47 MiB as the MLP's float32 features: within half of what 1Gi leaves besides the process
    (128 MiB), so read whole; 128Mi leaves nothing for the data, so auto streams."""
    manifest = write_shards(tmp_path, {"train": [900], "val": [100]})
    manifest.raw["features"] = ["frame"]
    manifest.raw["columns"] = [
        {"name": "frame", "type": "fixed_size_list<...>", "dtype": "uint8", "shape": [64, 64, 3]},
        {"name": "act", "type": "double", "dtype": "float64", "shape": []}]
    assert manifest.row_bytes() == 4 * 64 * 64 * 3 + 8
    assert choose_loading("auto", manifest, "128Mi")[0] == "stream"
    assert choose_loading("auto", manifest, "1Gi")[0] == "memory"
    assert choose_loading("auto", manifest, "850Mi")[0] == "stream"  # 41 MiB left for data


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_about_its_share_of_the_rows(tmp_path: Path, world: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank read every training and validation row each epoch and kept 1/world of them:
    on hundreds of GPUs the data was read hundreds of times over. A rank now reads its share,
    plus at most the two windows its share begins and ends in."""
    from arf_trainer.trainer import stream

    manifest = write_shards(tmp_path, {"train": [200, 120, 160], "val": [50, 46]})
    read = {"n": 0}
    original = stream.ShardStream.read

    def counting(self, order, start):
        for batch in original(self, order, start):
            read["n"] += batch.num_rows
            yield batch

    window, batch = 16, 8
    monkeypatch.setattr(stream, "READ_ROWS", batch)  # Parquet reads of 8 rows: edges are exact
    for rank in range(world):
        ld = loader(manifest, world, rank, window=window)
        monkeypatch.setattr(stream.ShardStream, "read", counting)
        read["n"] = 0
        rows = sum(len(r) for r in ids_of(ld.batches(epoch=1, skip=0)))
        assert rows == -(-480 // world)
        assert read["n"] <= rows + 2 * (window + batch), (rank, read["n"])
        read["n"] = 0
        val = sum(len(x) for x, _ in ld.val_chunks())
        assert read["n"] <= val + 2 * (window + batch), (rank, read["n"])
        monkeypatch.setattr(stream.ShardStream, "read", original)
