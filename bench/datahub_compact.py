"""What compaction (`arf datahub compact`) buys a table grown by many small appends.

Builds a table from `--appends` appends of `--rows` rows each (ids, a robot id, a timestamp,
two float scalars and a `FLOAT[7]` joint vector: what each ingest or evaluation adds), compacts
it, then, in paired rounds with the order alternating, reads the version before the compaction
(one file per append) and the version after it (the same rows in a few files) both ways a run
reads the hub: a full scan (`open_table(...).dataset.to_table()`, what prepare streams) and a
DuckDB aggregate through the query sandbox (`run_query`, what a dataset query runs). Both
versions stay in the same table, so the log replayed to open them is the same. Prints per-round
times and ratios (before / after) and their medians.

    .venv/bin/python bench/datahub_compact.py [--appends 500] [--rows 2000] [--rounds 5]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training_container"))

from arf_trainer.datahub.maintenance import compact, describe_compact  # noqa: E402
from arf_trainer.datahub.query import run_query  # noqa: E402
from arf_trainer.datahub.tables import open_table, write_table  # noqa: E402

TABLE = "episodes"
AGGREGATE = ("SELECT robot, count(*) AS n, avg(reward) AS reward, "
             "avg(list_sum(joints)) AS joints FROM episodes GROUP BY robot")


def build(hub: Path, appends: int, rows: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(appends):
        joints = rng.standard_normal((rows, 7), dtype=np.float32)
        write_table(hub, TABLE, pa.table({
            "episode_id": np.arange(i * rows, (i + 1) * rows, dtype=np.int64),
            "robot": np.full(rows, i % 8, dtype=np.int32),
            "t": pa.array(np.arange(rows, dtype=np.int64) + i * 10**9, pa.timestamp("us", "UTC")),
            "reward": rng.standard_normal(rows),
            "speed": rng.standard_normal(rows).astype(np.float32),
            "joints": pa.FixedSizeListArray.from_arrays(joints.reshape(-1), 7),
        }))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp) / "hub"
        took, _ = timed(lambda: build(hub, args.appends, args.rows))
        print(f"built {args.appends} appends of {args.rows:,} rows in {took:.1f} s", flush=True)
        took, summary = timed(lambda: compact(hub, TABLE))
        print(f"{describe_compact(summary)} in {took:.1f} s", flush=True)
        versions = {"before": summary["version_before"], "after": summary["version_after"]}

        def scan(which: str) -> int:
            return open_table(hub, TABLE, versions[which]).dataset.to_table().num_rows

        def aggregate(which: str) -> pa.Table:
            return run_query(hub, AGGREGATE, {TABLE: versions[which]}, timeout_s=600)[0]

        ratios: dict[str, list[float]] = {"scan": [], "aggregate": []}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            line = []
            for name, fn in (("scan", scan), ("aggregate", aggregate)):
                times, outs = {}, {}
                for which in order:
                    times[which], outs[which] = timed(lambda: fn(which))
                same = (outs["before"] == outs["after"] if name == "scan"
                        else outs["before"].num_rows == outs["after"].num_rows)
                assert same, f"{name}: the versions before and after differ"
                ratios[name].append(times["before"] / times["after"])
                line.append(f"{name} {times['before']:.3f} s before, {times['after']:.3f} s "
                            f"after ({ratios[name][-1]:.2f}x)")
            print(f"round {r + 1} ({order[0]} first): {'; '.join(line)}", flush=True)
        print("median before / after: " + ", ".join(
            f"{name} {statistics.median(values):.2f}x" for name, values in ratios.items()))


if __name__ == "__main__":
    main()
