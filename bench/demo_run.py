"""Wall time and peak memory of `make demo` from a fresh clone: first run vs second run.

Clones the current commit into a temporary folder (a fresh checkout: no .venv, no .arf), runs
`make demo` twice and samples the resident memory of the whole process tree every 0.25 s.
The first run includes creating the venv and seeding the data hub; the second reuses both.

    .venv/bin/python bench/demo_run.py [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def run_measured(command: list[str], cwd: Path, log: Path) -> tuple[int, float, int, int]:
    """(exit code, wall seconds, peak RSS of the tree, peak RSS of one process) in bytes."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak_tree = peak_one = 0
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                sizes = []
                for p in procs:
                    try:
                        sizes.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                peak_tree = max(peak_tree, sum(sizes))
                peak_one = max(peak_one, max(sizes, default=0))
            except psutil.Error:
                pass
            time.sleep(0.25)
    return proc.returncode, time.monotonic() - start, peak_tree, peak_one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the clone for inspection")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="arf-demo-bench-"))
    clone = tmp / "arf-training"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    rows = []
    try:
        for attempt in (1, 2):
            log = tmp / f"demo-{attempt}.log"
            code, wall, tree, one = run_measured(["make", "demo"], clone, log)
            rows.append((attempt, code, wall, tree, one, log))
            if code != 0:
                print(open(log).read()[-4000:])
                break
        summary = [line for line in open(rows[-1][5]).read().splitlines()
                   if line.startswith(("  DAG run", "  dataset", "  model", "  evaluation"))]
    finally:
        if not args.keep:
            # `make demo` leaves its PostgreSQL running for the user (detached); stop it
            # before its home goes, or it outlives the clone.
            subprocess.run(["make", "down"], cwd=clone, capture_output=True, check=False)
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"make demo from a fresh clone of {commit} ({clone if args.keep else 'removed'})")
    print(f"{'run':>4} {'exit':>5} {'wall s':>8} {'peak RSS tree MiB':>18} {'peak RSS 1 proc MiB':>20}")
    for attempt, code, wall, tree, one, _ in rows:
        print(f"{attempt:>4} {code:>5} {wall:>8.1f} {tree / 2**20:>18.0f} {one / 2**20:>20.0f}")
    if len(rows) == 2 and all(r[1] == 0 for r in rows):
        print(f"second / first wall time: {rows[1][2] / rows[0][2]:.2f}")
    print("\n".join(summary))
    return 0 if all(r[1] == 0 for r in rows) and len(rows) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
