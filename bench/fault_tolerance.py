"""Fault tolerance costs of `arf-trainer train` (bc recipe, reach data, 1 process).

1. Checkpoint cost: seconds spent in checkpoint saves at the template's default interval, as a
   share of the training loop's seconds (both reported by the trainer in its result metrics).
2. Resume time: SIGTERM during training -> exit 75 (checkpoint written) -> the same command again
   -> training resumed; against the baseline of a cold start of the same command.

    .venv/bin/python bench/fault_tolerance.py [--epochs 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "bench"))

from harness_overhead import _template  # noqa: E402  (same template tweaks as that bench)


def _step(epochs: int, run: str, step: str = "train"):
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    spec = build_step_spec(_template(epochs), step, RunIdentity("bench", run, step),
                           {"epochs": epochs}, ArfSettings.from_env())
    runner = LocalStepRunner()
    spec.workspace.mkdir(parents=True, exist_ok=True)
    job = spec.workspace / "jobspec.json"
    job.write_text(json.dumps(spec.job_spec))
    return spec, runner.commands(spec)[0], runner.environment(spec, job)


def _start(command, env, cwd) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)


def _wait_line(proc: subprocess.Popen, marker: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if marker in line:
            return time.monotonic()
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"never saw {marker!r} (exit {proc.poll()})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="arf-ft-bench-"))
    os.environ.update({"ARF_HOME": str(root), "OMP_NUM_THREADS": "1",
                       "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub",
                        str(root / "datahub")], check=True, capture_output=True)
        from arf_training.backends.local import LocalStepRunner

        prep, _, _ = _step(1, "prep", "prepare")
        LocalStepRunner().run(prep)

        # 1. checkpoint share, uninterrupted run at the default interval
        spec, command, env = _step(args.epochs, "full")
        shutil.copytree(prep.workspace / "prepare", spec.workspace / "prepare")
        result = LocalStepRunner().run(spec)
        ckpt_s, loop_s = result["timing"]["checkpoint_seconds"], result["timing"]["train_seconds"]
        interval = spec.job_spec["template"]["training"]["checkpoint_every_steps"]

        # 2. cold start vs resume after SIGTERM
        spec, command, env = _step(args.epochs, "cold")
        shutil.copytree(prep.workspace / "prepare", spec.workspace / "prepare")
        t0 = time.monotonic()
        proc = _start(command, env, spec.workspace)
        cold = _wait_line(proc, "MLflow run") - t0
        proc.wait()

        spec, command, env = _step(args.epochs, "preempt")
        shutil.copytree(prep.workspace / "prepare", spec.workspace / "prepare")
        proc = _start(command, env, spec.workspace)
        _wait_line(proc, "epoch 3/")
        t_term = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        for _ in proc.stdout:  # drain
            pass
        code = proc.wait()
        t_exit = time.monotonic()
        proc = _start(command, env, spec.workspace)
        t_training = _wait_line(proc, "resumed from")
        proc.wait()
        resumed_sha = json.loads(spec.result_path.read_text())["weights_sha256"]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"bc recipe, {args.epochs} epochs, 1 process, checkpoint every {interval} steps "
          f"(template default)")
    print(f"checkpoint cost: {ckpt_s:.3f} s of {loop_s:.2f} s training loop = "
          f"{100 * ckpt_s / loop_s:.2f} %   (goal <= 3 %: "
          f"{'PASS' if ckpt_s / loop_s <= 0.03 else 'FAIL'})")
    print(f"SIGTERM -> exit {code} (checkpoint written): {t_exit - t_term:.2f} s")
    print(f"restart -> training resumed from the checkpoint: {t_training - t_exit:.2f} s; "
          f"SIGTERM -> training again: {t_training - t_term:.2f} s")
    print(f"cold start -> training starts (baseline, same command): {cold:.2f} s; "
          f"ratio resume / cold start: {(t_training - t_exit) / cold:.2f}")
    print(f"resumed run's weights sha256 equals the uninterrupted run's: "
          f"{resumed_sha == result['weights_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
