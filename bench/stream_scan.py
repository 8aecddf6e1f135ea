"""The streaming pass before training (sha256 of every shard, every value checked, statistics):
what one rank of a `--world`-rank job reads and spends, next to one rank reading it all (what
every rank did before the pass was split, `arf_trainer.trainer.stream_scan`).

Writes prepare-format shards (float64 columns), then, in paired rounds, times
`StreamSource(...)` for one rank alone (world 1) and for each rank of `--world` (their largest
share is what the job waits for; the ranks run one after the other here, as this machine has 2
cores: on a cluster they run at once, one per GPU). Prints the rows each read and per-round
ratios (largest share / whole pass).

    .venv/bin/python bench/stream_scan.py [--rows 2000000] [--shards 16] [--world 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training_container"))

from arf_trainer.datahub.shards import sha256_file  # noqa: E402
from arf_trainer.trainer import stream  # noqa: E402
from arf_trainer.trainer.data import load_manifest  # noqa: E402
from arf_trainer.trainer.dist import DistEnv  # noqa: E402
from arf_trainer.trainer.recipes import get_recipe  # noqa: E402


def write(folder: Path, rows: int, shards: int, features: int) -> None:
    import json

    prepare, rng, out = folder / "prepare", np.random.default_rng(0), {"train": [], "val": []}
    names = [f"f{i}" for i in range(features)]
    for split, count in (("train", shards), ("val", max(1, shards // 8))):
        (prepare / split).mkdir(parents=True)
        for i in range(count):
            n = rows // shards
            table = pa.table({**{c: rng.standard_normal(n) for c in names},
                              "act": rng.standard_normal(n)})
            rel = f"{split}/shard-{i:05d}.parquet"
            pq.write_table(table, prepare / rel, row_group_size=65_536)
            out[split].append({"path": rel, "rows": n, "sha256": sha256_file(prepare / rel)})
    columns = [{"name": c, "type": "double"} for c in names + ["act"]]
    (prepare / "manifest.json").write_text(json.dumps(
        {"features": names, "targets": ["act"], "shards": out, "columns": columns}))


def timed(manifest, rank: int, world: int, counter: dict) -> tuple[float, int]:
    counter["n"] = 0
    start = time.perf_counter()
    stream.StreamSource(manifest, get_recipe("bc"), 4096,
                        DistEnv(rank=rank, local_rank=rank, world_size=world, enabled=world > 1))
    return time.perf_counter() - start, counter["n"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), args.rows, args.shards, args.features)
        manifest = load_manifest(Path(tmp) / "prepare")
        counter, original = {"n": 0}, stream.ShardStream.read

        def counting(self, order, start):
            for batch in original(self, order, start):
                counter["n"] += batch.num_rows
                yield batch

        stream.ShardStream.read = counting
        ratios = []
        for r in range(args.rounds):
            whole, whole_rows = timed(manifest, 0, 1, counter)
            shares = [timed(manifest, rank, args.world, counter) for rank in range(args.world)]
            slowest = max(s for s, _ in shares)
            ratios.append(slowest / whole)
            print(f"round {r + 1}: one rank, whole pass {whole:.2f} s ({whole_rows} rows read); "
                  f"world {args.world}: shares {', '.join(f'{s:.2f} s/{n} rows' for s, n in shares)}"
                  f"; largest share / whole = {ratios[-1]:.3f}", flush=True)
        print(f"median ratio (largest share / whole pass), world {args.world}: "
              f"{statistics.median(ratios):.3f} (ideal {1 / args.world:.3f})")


if __name__ == "__main__":
    main()
