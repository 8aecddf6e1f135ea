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
from arf_trainer.custom_setup import env_file_text

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
        "ARF_BASE_MODEL_VERSION",
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

# What arf-trainer custom-setup writes (its MLflow run and pinned base model made up here).
ENV_FILE = env_file_text("sqlite:///x.db", "7", "abc123",
                         {"dir": "/base/model", "uri": "models:/m@champion", "version": "3"})


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
    assert starts[0]["ARF_BASE_MODEL_VERSION"] == "3"


def test_a_pods_command_reads_its_job_spec_from_the_file_setup_wrote(tmp_path):
    # In a pod the step's job spec is inline (ARF_JOB_SPEC_JSON) and ARF_JOB_SPEC is unset; a
    # script written for the local backend (json.load(open($ARF_JOB_SPEC))) must run unchanged.
    import json
    import subprocess

    spec_file = tmp_path / "train" / "job_spec.json"
    spec_file.parent.mkdir(parents=True)
    spec_file.write_text(json.dumps({"seed": 3, "base_model": {"version": "4"}}))
    env_file = tmp_path / "train" / custom_launch.ENV_FILE
    env_file.write_text(env_file_text("sqlite:///x.db", "7", "abc", None, spec_file))
    read = ("import json, os; s = json.load(open(os.environ['ARF_JOB_SPEC'])); "
            "print(s['base_model']['version'], os.environ.get('ARF_JOB_SPEC_JSON'))")
    out = subprocess.run(custom_launch.wrap([sys.executable, "-c", read]), env={
        "PATH": os.environ["PATH"], "ARF_CUSTOM_ENV": str(env_file),
        "ARF_JOB_SPEC_JSON": '{"seed": 3}'}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "None"]


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
    assert rank1[0]["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"  # a logger on every rank needs it
    assert rank0[1]["start_step"] > 0 and rank1[1]["start_step"] > 0


# --- Kubernetes: a PyTorchJob replica of a custom command --------------------------------------


def _pod_exit(tmp_path: Path, rank_codes: list[int]) -> int:
    """Run the replica's PID 1 with a stand-in for torchrun: it starts each rank through the
    rank wrapper (as torchrun does) and exits 1 when one failed (as torchrun does)."""
    import subprocess

    ranks = " ; ".join(
        f"RANK={rank} {' '.join(_quote(custom_launch.wrap([sys.executable, '-c', f'raise SystemExit({code})'])))}"
        for rank, code in enumerate(rank_codes))
    fake_torchrun = ["/bin/sh", "-c", ranks + f" ; exit {int(any(rank_codes))}"]
    env = {"PATH": os.environ["PATH"], "HOSTNAME": "job-master-0",
           "ARF_EXIT_DIR": str(tmp_path / "exits"), "ARF_PROCS_PER_POD": str(len(rank_codes))}
    return subprocess.run(custom_launch.pod_wrap(fake_torchrun), env=env, timeout=60).returncode


def _quote(words: list[str]) -> list[str]:
    import shlex

    return [shlex.quote(w) for w in words]


@pytest.mark.parametrize(("rank_codes", "pod_code"), [
    pytest.param([75, 75], custom_launch.RESTARTABLE_EXIT, id="all-preempted-restarts"),
    pytest.param([75, 3], 1, id="one-failed-stays-a-failure"),
    pytest.param([0, 0], 0, id="success"),
    # torchrun exits 1 when a rank fails; the pod's exit says bad input: no retry, no restart.
    pytest.param([2, 75], 2, id="bad-input-while-the-other-rank-was-stopped"),
    pytest.param([1, 2], 2, id="bad-input-on-rank-1"),
])
def test_pytorchjob_replica_turns_preempted_ranks_into_a_restartable_exit(
        tmp_path, rank_codes, pod_code):
    # The Training Operator's restartPolicy ExitCode restarts a replica on 128+ only.
    assert _pod_exit(tmp_path, rank_codes) == pod_code


def test_a_ranks_bad_input_under_torchrun_fails_the_step_without_retries(tmp_path):
    """torchrun reports the rank's exit 2 as its own 1, which was retried as any failure."""
    spec = _spec(tmp_path, steps=1, procs=2)
    spec = StepSpec(**{**spec.__dict__, "command": custom_launch.wrap(
        [sys.executable, "-c", "import os, sys; sys.exit(2 if os.environ['RANK'] == '0' else 0)"])})
    with pytest.raises(StepFailed) as failed:
        LocalStepRunner(logging.getLogger("t")).run(spec)
    assert "exit code 1; a rank exited 2: bad input" in str(failed.value)
    assert not failed.value.retryable


def test_the_built_in_trainer_records_its_bad_input_exit(tmp_path):
    """What the backends read under torchrun (the trainer's own exit code is lost there)."""
    import subprocess

    from trainer_testkit import make_spec, step_environ

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(__import__("json").dumps(make_spec("digits_smoke")))
    env = step_environ(spec_path, tmp_path / "ws", "sqlite:////tmp/unused-arf.db",
                       tmp_path / "artifacts", "manual__1")
    env["ARF_EXIT_DIR"] = str(tmp_path / "exits")
    out = subprocess.run([sys.executable, "-m", "arf_trainer.cli", "train"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr  # no prepared data: bad input
    assert custom_launch.rank_exit_codes(tmp_path / "exits") == {"0": 2}


def test_pytorchjob_of_the_lightning_template_runs_setup_and_the_wrappers():
    # (test_k8s_render validates every shipped template's manifests strictly, this one included)
    from arf_training.kubernetes.config import KubernetesSettings
    from arf_training.kubernetes.jobs import PyTorchJobRenderer
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec
    from arf_training.templates import load_template

    repo = Path(__file__).resolve().parents[2]
    loaded = load_template(repo / "config_templates" / "digits_lightning.yaml")
    ident = RunIdentity("digits_lightning", "manual__1", "train", 1)
    spec = build_step_spec(loaded, "train", ident, {}, ArfSettings.from_env())
    job = PyTorchJobRenderer().render(spec, ident, KubernetesSettings.from_env({}))
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (box,) = pod["containers"]
    assert box["command"][:2] == ["/bin/sh", "-c"] and "torchrun" in box["command"]
    assert box["command"][-3:] == ["python", "-m", "arf_trainer.examples.lightning_digits"]
    env = {e["name"]: e.get("value") for e in box["env"]}
    assert env["ARF_PROCS_PER_POD"] == "2" and env["ARF_EXIT_DIR"].endswith("/train/exits")
    assert [c["command"] for c in pod["initContainers"]] == [["arf-trainer", "custom-setup"]]


@pytest.mark.parametrize("wrapped", [pytest.param(True, id="custom-command"),
                                     pytest.param(False, id="plain-process")])
def test_a_command_the_sigterm_kills_outright_is_resumed_too(tmp_path, wrapped):
    # No SIGTERM handler (e.g. still importing its framework): it dies of the signal (143).
    code = ("import json, os, pathlib, time\n"
            "mark = pathlib.Path(os.environ['ARF_WORKSPACE']) / 'started-once'\n"
            "if not mark.exists():\n"
            "    mark.write_text('1'); time.sleep(60)\n"
            "p = pathlib.Path(os.environ['ARF_RESULT_PATH']); p.write_text(json.dumps({'ok': 1}))\n")
    spec = _spec(tmp_path, steps=1)
    command = [sys.executable, "-c", code]
    spec = StepSpec(**{**spec.__dict__,
                       "command": custom_launch.wrap(command) if wrapped else command})
    runner = LocalStepRunner(logging.getLogger("t"))

    def reclaim() -> None:
        while not (tmp_path / "started-once").exists():
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(runner._procs[0].pid, signal.SIGTERM)

    threading.Thread(target=reclaim, daemon=True).start()
    assert runner.run(spec) == {"ok": 1}
    assert runner.preemptions == 1


def test_restarts_after_preemption_share_the_steps_time_limit(tmp_path):
    from arf_training.errors import StepTimeout

    spec = _spec(tmp_path, steps=1)
    spec = StepSpec(**{**spec.__dict__, "timeout_s": 4.0, "command": custom_launch.wrap(
        [sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(75)"])})
    runner = LocalStepRunner(logging.getLogger("t"))
    with pytest.raises(StepTimeout, match="timeout of 4s"):
        runner.run(spec)
    assert 1 <= runner.preemptions < 10
