"""Step processes that read data hub tables and exit: how many abort at exit (SIGABRT,
"terminate called without an active exception") with the table's files read through
delta-rs's Python filesystem handler (delta-rs's default, what `open_table` used before) vs
through Arrow's own local filesystem (`tables.local_filesystem`, what it uses now).

Each round starts `--procs` processes at once per side (the sides alternate), each opening a
table of `--rows` rows and reading it as the failure loop's steps do (the whole table, then
a projection and a filter), then returning from main. A scan's read-ahead ends on Arrow's
worker threads after the read returned; with the Python handler the last buffer freed there
needs the GIL, and at interpreter exit that aborts the process. Prints exit codes per side.

    .venv/bin/python bench/datahub_exit_abort.py [--rounds 40] [--procs 2] [--rows 20000]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training_container"))

CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
import pyarrow.compute as pc
from deltalake import DeltaTable
from arf_trainer.datahub.tables import local_filesystem
side, path = sys.argv[1], sys.argv[2]
fs = local_filesystem(path) if side == "arrow" else None
for _ in range(3):
    dataset = DeltaTable(path).to_pyarrow_dataset(filesystem=fs)
    whole = dataset.to_table()
    dataset.to_table(columns=["episode", "seed"])
    dataset.to_table(filter=pc.field("seed") > 100)
print(whole.num_rows)
"""


def make_table(folder: Path, rows: int) -> Path:
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    rng = np.random.default_rng(0)
    path = folder / "failures"
    for part in range(4):  # several files, as appends leave them
        n = rows // 4
        write_deltalake(str(path), pa.table({
            "episode": np.arange(part * n, (part + 1) * n) // 20,
            "seed": rng.integers(0, 200, n),
            "obs": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(n * 10).astype("float32")), 10),
        }), mode="append")
    return path


def run_side(side: str, path: Path, procs: int) -> list[tuple[int, str]]:
    children = [subprocess.Popen(
        [sys.executable, "-c", CHILD, side, str(path), str(REPO / "training_container")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    results = []
    for child in children:
        _out, err = child.communicate(timeout=300)
        results.append((child.returncode, err.strip().splitlines()[-1] if err.strip() else ""))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    codes: dict[str, collections.Counter] = {"delta-rs": collections.Counter(),
                                             "arrow": collections.Counter()}
    messages: dict[str, set] = {side: set() for side in codes}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_table(Path(tmp), args.rows)
        start = time.time()
        for round_no in range(args.rounds):
            sides = list(codes) if round_no % 2 == 0 else list(reversed(codes))
            for side in sides:
                for code, last in run_side(side, path, args.procs):
                    codes[side][code] += 1
                    if code:
                        messages[side].add(last)
            print(f"round {round_no + 1}/{args.rounds} ({time.time() - start:.0f} s): " + "; ".join(
                f"{side} {dict(counter)}" for side, counter in codes.items()), flush=True)
    for side, counter in codes.items():
        total, failed = sum(counter.values()), sum(n for c, n in counter.items() if c)
        print(f"{side}: {failed} of {total} processes exited non-zero ({failed / total:.1%}); "
              f"exit codes {dict(counter)}; {sorted(messages[side])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
