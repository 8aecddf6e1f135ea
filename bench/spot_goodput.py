"""Spot goodput: a real training run under a seeded preemption trace, against the same run
uninterrupted, measured back to back in one invocation.

The trace: SIGTERM to the train step's PID 1 (torchrun: both templates train with 2
processes), as the kubelet sends on a spot reclaim, at exponential intervals of
wall time with the given mean (seeded); each interval starts when the previous start began. The
local backend restarts a start that exited 75 in the same task try (`LocalStepRunner`), exactly
as the DAG does. Reported per workload:

- goodput = uninterrupted wall time / wall time under the trace (the share of paid time that was
  useful training);
- recovery time per preemption = SIGTERM -> the restarted command resumed from its checkpoint
  (the "resumed from" / "resuming from" line);
- whether the final weights equal the uninterrupted run's (the built-in recipe promises bitwise
  resume; the Lightning example does not);
- cost on spot at PRICE x on-demand: spot/on-demand = PRICE / goodput (< 1: spot is cheaper).

    .venv/bin/python bench/spot_goodput.py --mean-s 20 --seed 0 [--workloads builtin,lightning]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPOT_PRICE = 0.35  # spot price as a fraction of on-demand (a typical discount; --price)


class Lines(logging.Handler):
    """Keeps every relayed step line with its monotonic time."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic(), record.getMessage()))


def _template(name: str, epochs_max: int):
    import yaml

    from arf_training.templates import LoadedTemplate, TrainingTemplate

    path = REPO / "config_templates" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    data["training"]["hyperparameters"]["epochs"]["maximum"] = epochs_max
    return LoadedTemplate(TrainingTemplate.model_validate(data), path, "bench")


def _spec(loaded, step: str, run: str, conf: dict):
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    return build_step_spec(loaded, step, RunIdentity(f"bench_{loaded.name}", run, step), conf,
                           ArfSettings.from_env())


def _run(loaded, run: str, conf: dict, prepared: Path, trace: list[float] | None
         ) -> dict:
    """One train step through LocalStepRunner; with `trace`, SIGTERMs at those intervals."""
    from arf_training.backends.local import LocalStepRunner

    spec = _spec(loaded, "train", run, conf)
    shutil.copytree(prepared, spec.workspace / "prepare")
    log = logging.getLogger(f"bench.{run}")
    log.propagate, log.level = False, logging.INFO
    lines = Lines()
    log.handlers[:] = [lines]
    runner = LocalStepRunner(log)
    kills: list[float] = []
    done = threading.Event()

    def preempt() -> None:
        for interval in trace or []:
            # Wait for a start to be running, then the interval of wall time from its start.
            while not done.is_set() and not any(p.poll() is None for p in runner._procs):
                time.sleep(0.05)
            if done.wait(interval):
                return
            alive = [p for p in runner._procs if p.poll() is None]
            if alive:
                kills.append(time.monotonic())
                os.kill(alive[0].pid, signal.SIGTERM)
                while not done.is_set() and alive[0].poll() is None:
                    time.sleep(0.05)

    thread = threading.Thread(target=preempt, daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        result = runner.run(spec)
    finally:
        done.set()
    wall = time.monotonic() - t0
    resumed = [t for t, text in lines.lines if "resumed from" in text or "resuming from" in text]
    recovery = [next((r - k for r in resumed if r > k), float("nan")) for k in kills]
    output = Path(spec.env["ARF_OUTPUT_DIR"])
    from arf_training.reproduce import folder_sha256

    sha = result.get("weights_sha256") or folder_sha256(output)
    return {"wall": wall, "preemptions": runner.preemptions, "kills": len(kills),
            "recovery": recovery, "sha": sha}


def _trace(seed: int, mean_s: float, n: int = 64) -> list[float]:
    rng = random.Random(seed)
    return [rng.expovariate(1.0 / mean_s) for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mean-s", type=float, action="append",
                        help="mean seconds between preemptions (repeatable; default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--price", type=float, default=SPOT_PRICE,
                        help="spot price / on-demand price (default 0.35)")
    parser.add_argument("--workloads", default="builtin,lightning")
    parser.add_argument("--builtin-epochs", type=int, default=60)
    parser.add_argument("--lightning-epochs", type=int, default=15)
    args = parser.parse_args()
    means = args.mean_s or [20.0]
    root = Path(tempfile.mkdtemp(prefix="arf-spot-bench-"))
    # Tracking to a SQLite file of the bench's own home: the embedded default (PostgreSQL) is
    # started by `arf up` / `airflow dags test`, not by a bare step runner.
    os.environ.update({"ARF_HOME": str(root), "MLFLOW_DISABLE_TELEMETRY": "true",
                       "ARF_TRACKING_URI": f"sqlite:///{root}/mlflow.db"})
    workloads = {"builtin": ("reach_bc", {"epochs": args.builtin_epochs}),
                 "lightning": ("digits_lightning", {"epochs": args.lightning_epochs})}
    try:
        subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub",
                        str(root / "datahub"), "--episodes", "80"], check=True,
                       capture_output=True)
        from arf_training.backends.local import LocalStepRunner

        for key in args.workloads.split(","):
            name, conf = workloads[key]
            loaded = _template(name, 10_000)
            prep = _spec(loaded, "prepare", "prep", conf)
            LocalStepRunner(logging.getLogger("bench.prep")).run(prep)
            prepared = prep.workspace / "prepare"
            for mean in means:
                trace = _trace(args.seed, mean)
                base = _run(loaded, f"base-{mean:g}", conf, prepared, None)
                spot = _run(loaded, f"spot-{mean:g}", conf, prepared, trace)
                goodput = base["wall"] / spot["wall"]
                rec = [f"{r:.1f}" for r in spot["recovery"]]
                promise = "promised" if key == "builtin" else "not promised by the recipe"
                print(f"{key} ({name}, {conf}), mean {mean:g} s between preemptions, seed "
                      f"{args.seed}:")
                print(f"  uninterrupted {base['wall']:.1f} s; under the trace {spot['wall']:.1f} s "
                      f"with {spot['preemptions']} preemption(s) (restarts without a retry)")
                print(f"  goodput {goodput:.3f}; recovery per preemption (SIGTERM -> resumed) "
                      f"[{', '.join(rec)}] s")
                print(f"  final weights equal to the uninterrupted run: "
                      f"{spot['sha'] == base['sha']} ({promise})")
                print(f"  cost at spot = {args.price:g}x on-demand: spot/on-demand = "
                      f"{args.price / goodput:.3f} ({'spot cheaper' if args.price / goodput < 1 else 'on-demand cheaper'})",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
