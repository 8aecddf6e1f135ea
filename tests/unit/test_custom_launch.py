"""A template's own training command under the local backend: the launch wrapper's environment
(MLflow variables for rank 0 only), SIGTERM passed on with its grace period, and exit 75
("preempted, resume me") restarted in the same task try, also under torchrun with 2 processes."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from arf_training import custom_launch
from arf_training.backends.local import LocalStepRunner
from arf_training.errors import StepFailed
from arf_training.stepspec import StepSpec
from arf_training.templates import Resources

# A command as a user writes it: checkpoints its progress in ARF_CHECKPOINT_DIR, on SIGTERM
# saves and exits 75, resumes from the checkpoint when started again, and records what it saw.
COMMAND = r"""
import json, os, signal, sys, time
from pathlib import Path
rank = int(os.environ.get("RANK", "0"))
ckpt = Path(os.environ["ARF_CHECKPOINT_DIR"]) / f"rank-{rank}.txt"
ckpt.parent.mkdir(parents=True, exist_ok=True)
step = int(ckpt.read_text()) if ckpt.exists() else 0
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
seen = Path(os.environ["ARF_WORKSPACE"]) / f"seen-rank-{rank}.jsonl"
with seen.open("a") as fh:
    fh.write(json.dumps({k: os.environ.get(k) for k in (
        "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "ARF_LOG_TO_MLFLOW", "ARF_BASE_MODEL_DIR",
        "ARF_PREEMPTION_GRACE_S")} | {"start_step": step}) + "\n")
print(f"rank {rank} ready at step {step}", flush=True)
while step < STEPS:
    if stop:
        ckpt.write_text(str(step))
        print(f"rank {rank} preempted at step {step}", flush=True)
        sys.exit(75)
    time.sleep(0.05)
    step += 1
if rank == 0:
    out = Path(os.environ["ARF_RESULT_PATH"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": step}))
"""

ENV_FILE = """export ARF_BASE_MODEL_DIR=/base/model
if [ "${RANK:-0}" = 0 ]; then
  export MLFLOW_TRACKING_URI='sqlite:///x.db' MLFLOW_RUN_ID=abc123 ARF_LOG_TO_MLFLOW=true
else
  export ARF_LOG_TO_MLFLOW=false
fi
"""


def _spec(tmp_path: Path, *, steps: int, procs: int = 1) -> StepSpec:
    train = tmp_path / "train"
    train.mkdir(parents=True, exist_ok=True)
    (train / custom_launch.ENV_FILE).write_text(ENV_FILE)
    result = train / "result.json"
    return StepSpec(
        step="train", image="img",
        command=custom_launch.wrap([sys.executable, "-c", COMMAND.replace("STEPS", str(steps))]),
        env={"ARF_WORKSPACE": str(tmp_path), "ARF_RESULT_PATH": str(result),
             "ARF_CHECKPOINT_DIR": str(train / "checkpoints"), "ARF_PREEMPTION_GRACE_S": "7",
             **custom_launch.env_for(train)},
        job_spec={"run": {"try_number": 1}}, workspace=tmp_path, resources=Resources(),
        procs_per_node=procs, timeout_s=120, result_path=result, grace_s=7)


def _seen(tmp_path: Path, rank: int) -> list[dict]:
    import json

    path = tmp_path / f"seen-rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _preempt_once(tmp_path: Path, runner: LocalStepRunner, procs: int) -> threading.Thread:
    """SIGTERM the step's session leader once every rank has started (as the kubelet signals PID 1
    of a pod on a spot reclaim)."""
    def reclaim() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if len(list(tmp_path.glob("seen-rank-*.jsonl"))) >= procs and runner._procs:
                time.sleep(0.3)
                os.kill(runner._procs[0].pid, signal.SIGTERM)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=reclaim, daemon=True)
    thread.start()
    return thread


def test_exit_75_restarts_the_command_without_failing_and_it_resumes(tmp_path):
    runner = LocalStepRunner(logging.getLogger("t"))
    thread = _preempt_once(tmp_path, runner, 1)
    result = runner.run(_spec(tmp_path, steps=60))
    thread.join(5)
    assert result == {"steps": 60}
    assert runner.preemptions == 1
    starts = _seen(tmp_path, 0)
    assert len(starts) == 2 and 0 < starts[1]["start_step"] < 60  # resumed, not restarted
    assert starts[0]["ARF_PREEMPTION_GRACE_S"] == "7"
    assert starts[0]["MLFLOW_RUN_ID"] == "abc123" and starts[0]["ARF_LOG_TO_MLFLOW"] == "true"
    assert starts[0]["ARF_BASE_MODEL_DIR"] == "/base/model"


def test_other_exit_codes_still_fail_the_step(tmp_path):
    spec = _spec(tmp_path, steps=1)
    spec = StepSpec(**{**spec.__dict__, "command": custom_launch.wrap(
        [sys.executable, "-c", "import sys; sys.exit(3)"])})
    with pytest.raises(StepFailed, match="exit code 3"):
        LocalStepRunner(logging.getLogger("t")).run(spec)


@pytest.mark.slow  # two torchrun starts: ~35 s on the shared machine
def test_two_processes_under_torchrun_rank_zero_logs_and_both_resume(tmp_path):
    runner = LocalStepRunner(logging.getLogger("t"))
    thread = _preempt_once(tmp_path, runner, 2)
    result = runner.run(_spec(tmp_path, steps=200, procs=2))
    thread.join(5)
    assert result == {"steps": 200}
    assert runner.preemptions == 1  # torchrun exited 1: the ranks' recorded 75s decided
    rank0, rank1 = _seen(tmp_path, 0), _seen(tmp_path, 1)
    assert len(rank0) == len(rank1) == 2
    assert rank0[0]["MLFLOW_RUN_ID"] == "abc123" and rank0[0]["ARF_LOG_TO_MLFLOW"] == "true"
    assert rank1[0]["MLFLOW_RUN_ID"] is None and rank1[0]["ARF_LOG_TO_MLFLOW"] == "false"
    assert rank1[0]["MLFLOW_TRACKING_URI"] is None
    assert rank0[1]["start_step"] > 0 and rank1[1]["start_step"] > 0
