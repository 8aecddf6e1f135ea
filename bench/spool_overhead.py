"""Tracking spool overhead: the training loop with the MLflow server up vs unreachable.

`arf-trainer train` (bc recipe, reach data, 1 process, OMP_NUM_THREADS=1) runs alternately
against a real `mlflow server` and against a closed port; the trainer reports its training
loop's wall seconds (`timing.train_seconds` in result.json). With the server down every point
stays in the spool and the sender backs off; the goal is that neither side slows the loop by
more than 2 %.

    .venv/bin/python bench/spool_overhead.py [--epochs 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "bench"))

from _mlflow_server import free_port, mlflow_server  # noqa: E402
from harness_overhead import _template  # noqa: E402


def _train(epochs: int, run: str, tracking_uri: str, prepared: Path) -> float:
    from dataclasses import replace

    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    settings = replace(ArfSettings.from_env(), tracking_uri=tracking_uri)
    spec = build_step_spec(_template(epochs), "train", RunIdentity("bench", run, "train"),
                           {"epochs": epochs}, settings)
    shutil.copytree(prepared, spec.workspace / "prepare")
    return LocalStepRunner().run(spec)["timing"]["train_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="arf-spool-bench-"))
    os.environ.update({"ARF_HOME": str(root), "OMP_NUM_THREADS": "1",
                       "MLFLOW_DISABLE_TELEMETRY": "true"})
    down = f"http://127.0.0.1:{free_port()}"
    try:
        with mlflow_server(root) as up:
            subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub",
                            str(root / "datahub")], check=True, capture_output=True)
            from arf_training.backends.local import LocalStepRunner
            from arf_training.settings import ArfSettings
            from arf_training.stepspec import RunIdentity, build_step_spec

            prep = build_step_spec(_template(1), "prepare", RunIdentity("bench", "prep", "prepare"),
                                   {}, ArfSettings.from_env())
            LocalStepRunner().run(prep)
            prepared = prep.workspace / "prepare"
            _train(2, "warmup", up, prepared)  # the server creates its experiment once
            times: dict[str, list[float]] = {"up": [], "down": []}
            for r in range(args.repeats):
                order = (("up", up), ("down", down)) if r % 2 == 0 else (("down", down), ("up", up))
                for mode, uri in order:
                    times[mode].append(_train(args.epochs, f"{mode}-{r}", uri, prepared))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t_up, t_down = statistics.median(times["up"]), statistics.median(times["down"])
    print(f"bc recipe, {args.epochs} epochs, 1 process; training loop seconds, median of "
          f"{args.repeats} interleaved runs")
    print(f"MLflow up  : {t_up:.2f} s  ({', '.join(f'{t:.2f}' for t in times['up'])})")
    print(f"MLflow down: {t_down:.2f} s  ({', '.join(f'{t:.2f}' for t in times['down'])})")
    slowdown = (t_down - t_up) / t_up
    print(f"ratio down / up: {t_down / t_up:.3f}  (slowdown with tracking down "
          f"{100 * slowdown:+.1f} %; goal <= 2 %: {'PASS' if slowdown <= 0.02 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
