"""The streaming pass before training split over the ranks (arf_trainer.trainer.stream_scan):
each rank reads and checks its own shards only, and the ranks agree over a real gloo group on
the statistics, or on the first bad shard, which every rank then raises."""

from __future__ import annotations

import datetime
import json
import random
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.multiprocessing as mp

from arf_trainer.trainer.data import load_manifest
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.recipes import get_recipe
from arf_trainer.trainer.stream import StreamSource
from arf_trainer.trainer.stream_scan import owned
from test_stream import write_shards

TRAIN, VAL = [30, 11, 20, 7, 25], [9, 12, 5]


def _worker(rank: int, world: int, folder: str, init: str, recipe: str) -> None:
    """One rank: its share of the pass, then the agreement, over a real gloo process group.
    Writes what it got (statistics or the error) to rank-<r>.json."""
    import torch.distributed as dist

    # A hang here fails in a minute, not in gloo's default half hour.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out: dict = {}
    try:
        denv = DistEnv(rank=rank, local_rank=rank, world_size=world, enabled=True)
        source = StreamSource.scan(load_manifest(Path(folder) / "prepare"), get_recipe(recipe),
                                   window_rows=16, denv=denv)
        source.agree(denv)
        out = {"labels": source.labels.tolist(), "width": source.feature_width}
        for key, stats in (("x", source.x_stats), ("y", source.y_stats)):
            out[key] = None if stats is None else [t.tolist() for t in stats]
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}", "exit_code": getattr(exc, "exit_code", 1)}
    (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def run_ranks(folder: Path, world: int, recipe: str = "bc") -> list[dict]:
    # A new store file per group: torch's FileStore can outlive its group (its cleanup left
    # the file in one CI run), and a second group on it read the first one's addresses and
    # hung in init_process_group.
    store = folder / f"store-{uuid.uuid4().hex}"
    mp.spawn(_worker, args=(world, str(folder), f"file://{store}", recipe),
             nprocs=world, join=True)
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(world)]


def test_every_shard_has_one_owner_and_the_shares_are_balanced() -> None:
    rng = random.Random(7)
    for _ in range(300):
        rows = [rng.randint(0, 50) for _ in range(rng.randint(0, 12))]
        world = rng.randint(1, 9)
        shares = [owned(rows, world, r) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(len(rows)))
        for share in shares:  # contiguous blocks, in rank order
            assert share == list(range(share[0], share[0] + len(share))) if share else True
        if rows and sum(rows) and world <= len(rows):
            per = [sum(rows[i] for i in s) for s in shares]
            assert max(per) <= sum(rows) / world + max(rows), (rows, world, per)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_opens_and_reads_only_its_shards(tmp_path: Path, world: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank read every row of both splits (and hashed every shard) before training."""
    from arf_trainer.trainer import stream, stream_scan

    manifest = write_shards(tmp_path, {"train": TRAIN, "val": VAL})
    checked, read = [], {"n": 0}
    original_read, original_check = stream.ShardStream.read, stream_scan.checked_shard

    def counting(self, order, start):
        for batch in original_read(self, order, start):
            read["n"] += batch.num_rows
            yield batch

    monkeypatch.setattr(stream.ShardStream, "read", counting)
    monkeypatch.setattr(stream_scan, "checked_shard",
                        lambda m, shard: checked.append(shard["path"]) or original_check(m, shard))
    per_rank = []
    for rank in range(world):
        read["n"] = 0
        StreamSource(manifest, get_recipe("bc"), 16,
                     DistEnv(rank=rank, local_rank=rank, world_size=world, enabled=True))
        mine = [i for split in (TRAIN, VAL) for i in owned(split, world, rank)]
        assert mine, "every rank has shards here"
        per_rank.append(read["n"])
    assert sum(per_rank) == sum(TRAIN) + sum(VAL)  # each row read once, by one rank
    assert max(per_rank) < sum(TRAIN) + sum(VAL)
    assert sorted(checked) == sorted(f"{split}/shard-{i:05d}.parquet"
                                     for split, sizes in (("train", TRAIN), ("val", VAL))
                                     for i in range(len(sizes)))


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_agree_on_the_statistics_of_the_whole_split(tmp_path: Path, world: int) -> None:
    manifest = write_shards(tmp_path, {"train": TRAIN, "val": VAL})
    alone = StreamSource.scan(manifest, get_recipe("bc"), window_rows=16)
    ids = np.arange(sum(TRAIN), dtype=np.float64)
    results = run_ranks(tmp_path, world)
    assert all(r == results[0] for r in results), results  # bitwise the same on every rank
    got = results[0]
    assert got["width"] == alone.feature_width == 1
    assert got["x"][0][0] == pytest.approx(ids.mean(), rel=1e-6)
    assert got["x"][1][0] == pytest.approx(ids.std(), rel=1e-6)
    assert got["y"][0][0] == pytest.approx((ids % 5).mean(), rel=1e-6)
    assert got["x"][0][0] == pytest.approx(alone.x_stats[0].item(), rel=1e-6)
    assert run_ranks(tmp_path, world) == results  # and again: the same bits
    labels = run_ranks(tmp_path, world, "classifier")
    assert all(r["labels"] == [0.0, 1.0, 2.0, 3.0, 4.0] for r in labels), labels


def _poison_value(folder: Path, split: str, index: int, row: int) -> None:
    path = folder / "prepare" / split / f"shard-{index:05d}.parquet"
    table = pq.read_table(path)
    ids = table.column("id").to_numpy().copy()
    ids[row] = np.nan
    pq.write_table(table.set_column(0, "id", pa.array(ids)), path, row_group_size=7)


def test_bad_data_fails_every_rank_at_once_with_the_first_error(tmp_path: Path) -> None:
    """A NaN in a training shard of the last rank and a changed validation shard of the first:
    every rank raises the error one rank alone meets first (hashes before values), instead of
    one rank failing and the others waiting in a collective until the timeout."""
    world = 3
    write_shards(tmp_path, {"train": TRAIN, "val": VAL})
    last = owned(TRAIN, world, world - 1)[-1]
    _poison_value(tmp_path, "train", last, 2)
    results = run_ranks(tmp_path, world)
    assert all(r == results[0] for r in results), results
    assert results[0]["exit_code"] == 2
    assert f"train/shard-{last:05d}.parquet" in results[0]["error"]
    assert "row 2" in results[0]["error"]

    first_val = owned(VAL, world, 0)[0]
    manifest_path = tmp_path / "prepare" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"]["val"][first_val]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    results = run_ranks(tmp_path, world)
    assert all(r == results[0] for r in results), results
    assert "PreparedDataError" in results[0]["error"]
    assert f"val/shard-{first_val:05d}.parquet does not match its sha256" in results[0]["error"]
