"""Fault tolerance of `arf-trainer train` with real signals, real torchrun and real restarts.

The property under test: however a run is interrupted (SIGTERM at any step, SIGKILL half-way
through a checkpoint write, a worker dying under an elastic torchrun), rerunning the same
command in the same workspace ends with exactly the weights of an uninterrupted run.

Kill points are deterministic: a test waits for a log line or for a checkpoint folder to
appear, then signals. ``ARF_TEST_STEP_DELAY_S`` slows training down so that the run is still
training when the signal lands; the other fault-injection hooks are described in
`arf_trainer.trainer.testhooks`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer_testkit import (
    VENV_BIN,
    fresh_tracking_uri,
    make_spec,
    prepare_digits,
    step_environ,
)

from arf_trainer.errors import PREEMPTED_EXIT

pytestmark = pytest.mark.integration

# 500 rows -> 400 training rows; global batch 32 -> 13 steps per epoch at world size 1 and 2.
ROWS = 500
HP = {"epochs": 3, "hidden_size": 32, "batch_size": 32}
TOTAL_STEPS = 39
EVERY = 4
SLOW = {"ARF_TEST_STEP_DELAY_S": "0.05"}  # ~2 s of training: time to signal it mid-run
TORCHRUN_SIGNALLED_EXIT = 1  # torchrun re-raises a SIGTERM it got as an exception: exit 1
STOPPED = re.compile(r"preempted: SIGTERM received .*?; stopped after step (\d+)/\d+ and saved "
                     r"(\S+)\. Rerun")
RESUMED = re.compile(r"resumed from \S+/checkpoints/step-(\d+) ")


class Run:
    """One start of `arf-trainer train` (one or more processes), output in one log file."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], log: Path) -> None:
        self.log, self.started = log, time.monotonic()
        with open(log, "ab") as out:  # append: every process of a run writes to it
            # Own session: os.killpg reaches torchrun and its workers, like a pod's processes.
            self.procs = [subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
                          for cmd in commands]

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"run ended or timed out before {what}:\n{self.output[-4000:]}")
            time.sleep(0.01)

    def signal(self, sig: int, group: bool = True) -> None:
        for proc in self.procs:
            (os.killpg if group else os.kill)(proc.pid, sig)

    def finish(self, timeout: float = 120) -> list[int]:
        try:
            return [proc.wait(timeout=max(1.0, self.started + timeout - time.monotonic()))
                    for proc in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not end within {timeout} s:\n{self.output[-4000:]}")

    def kill(self) -> None:
        import psutil

        for proc in self.procs:
            # torchrun starts each worker in a session of its own: killing torchrun's group
            # alone would leave workers behind, so reach every descendant.
            try:
                workers = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                workers = []
            for victim in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    victim.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


class Workspace:
    """A prepared workspace + job spec; `start` launches the same command every time."""

    def __init__(self, tmp: Path, name: str, nproc: int = 1) -> None:
        self.tmp, self.name, self.nproc, self.starts = tmp, name, nproc, 0
        self.path = tmp / name
        prepare_digits(self.path, rows=ROWS)
        spec = make_spec("digits_smoke", run_id=f"manual__{name}", hyperparameters=HP,
                         training={"checkpoint_every_steps": EVERY})
        spec_path = tmp / f"{name}-spec.json"
        spec_path.write_text(json.dumps(spec))
        # A tracking store per workspace: runs may be alive at the same time.
        tracking_uri = fresh_tracking_uri(tmp / f"{name}-mlflow")
        self.env = step_environ(spec_path, self.path, tracking_uri, tmp / "artifacts",
                                f"manual__{name}")
        self.env["PYTHONUNBUFFERED"] = "1"

    @property
    def checkpoints(self) -> Path:
        return self.path / "train" / "checkpoints"

    def commands(self, nodes: int) -> list[list[str]]:
        trainer = [str(VENV_BIN / "arf-trainer"), "train"]
        if self.nproc == 1 and nodes == 1:
            return [trainer]
        torchrun = [str(VENV_BIN / "torchrun"), "--monitor-interval=0.1"]
        if nodes == 1:
            return [torchrun + ["--standalone", f"--nproc-per-node={self.nproc}", "--no-python",
                                *trainer]]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [torchrun + [f"--nnodes={nodes}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={self.name}",
                            f"--node-rank={rank}", "--no-python", *trainer]
                for rank in range(nodes)]

    def start(self, env: dict[str, str] | None = None, torchrun_args: tuple[str, ...] = (),
              nodes: int = 1) -> Run:
        self.starts += 1
        commands = self.commands(nodes)
        if torchrun_args:
            commands = [[cmd[0], *torchrun_args, *cmd[1:]] for cmd in commands]
        return Run(commands, {**self.env, **(env or {})},
                   self.tmp / f"{self.name}-{self.starts}.log")

    def checkpoint_appears(self, step: int) -> Callable[[], bool]:
        return lambda: (self.checkpoints / f"step-{step}" / ".complete").is_file()

    def result(self) -> dict:
        return json.loads((self.path / "train" / "result.json").read_text())

    def complete(self, run: Run) -> dict:
        codes = run.finish()
        assert codes == [0] * len(codes), f"exit codes {codes}:\n{run.output[-4000:]}"
        return self.result()


def stopped_step(run: Run, ranks: int) -> int:
    """The step every rank stopped after (they must agree), from the CLI's 'preempted' lines."""
    found = STOPPED.findall(run.output)
    assert len(found) == ranks and len(set(found)) == 1, f"{found}:\n{run.output[-4000:]}"
    step, folder = found[0]
    assert Path(folder).name == f"step-{step}" and (Path(folder) / ".complete").is_file()
    return int(step)


def resumed_step(run: Run) -> int | None:
    found = RESUMED.findall(run.output)
    return int(found[0]) if found else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """The weights sha256 of uninterrupted runs, by world size (1 process; torchrun x2)."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = {n: Workspace(tmp, f"ref{n}", nproc=n) for n in (1, 2)}
    started = {n: ws.start() for n, ws in runs.items()}  # both at once: half the wall time
    shas = {n: runs[n].complete(run)["weights_sha256"] for n, run in started.items()}
    assert all(runs[n].result()["steps"] == TOTAL_STEPS for n in runs)
    return shas


def test_sigterm_anywhere_then_rerun_gives_uninterrupted_weights(
        tmp_path: Path, reference: dict[int, str]) -> None:
    """One process, one workspace: SIGTERM during setup, SIGTERM mid-epoch, SIGKILL half-way
    through a checkpoint write, then the run to the end."""
    ws = Workspace(tmp_path, "single")

    # 1. SIGTERM during setup (after the handler is installed, before the first step).
    run = ws.start(SLOW)
    run.wait_until(lambda: "on SIGTERM: finish the step" in run.output, "setup")
    run.signal(signal.SIGTERM)
    assert run.finish() == [PREEMPTED_EXIT], run.output[-4000:]
    assert "before the first training step; no new checkpoint written" in run.output
    assert not ws.checkpoints.exists() or not any(ws.checkpoints.iterdir())

    # 2. SIGTERM mid-epoch, once the first periodic checkpoint exists.
    run = ws.start(SLOW)
    run.wait_until(ws.checkpoint_appears(EVERY), f"step-{EVERY}")
    run.signal(signal.SIGTERM)
    assert run.finish() == [PREEMPTED_EXIT], run.output[-4000:]
    assert resumed_step(run) is None
    first_stop = stopped_step(run, ranks=1)
    assert EVERY <= first_stop < TOTAL_STEPS

    # 3. SIGKILL while a checkpoint is half-written: every file is on disk, but it is not yet
    #    marked complete and renamed (the hook holds the save there).
    run = ws.start({**SLOW, "ARF_TEST_CHECKPOINT_DELAY_S": "60"})
    run.wait_until(lambda: any(ws.checkpoints.glob(".tmp-step-*/shared.pt")), "a torn save")
    run.signal(signal.SIGKILL)
    assert run.finish() == [-signal.SIGKILL]
    assert resumed_step(run) == first_stop
    torn = next(ws.checkpoints.glob(".tmp-step-*"))
    torn_step = int(torn.name.rsplit("-", 1)[1])
    assert torn_step > first_stop and not (ws.checkpoints / f"step-{torn_step}").exists()

    # 4. Uninterrupted to the end, from the last complete checkpoint, not the torn one.
    run = ws.start()
    result = ws.complete(run)
    assert resumed_step(run) == first_stop
    assert not torn.exists()  # removed by the first successful save
    assert result["steps"] == TOTAL_STEPS
    assert result["weights_sha256"] == reference[1]


def test_torchrun_sigterm_and_elastic_restart_give_uninterrupted_weights(
        tmp_path: Path, reference: dict[int, str]) -> None:
    """2 processes, one workspace: SIGTERM to the whole process group (what the local backend
    sends), SIGTERM to torchrun alone (what a pod's PID 1 gets from Kubernetes; torchrun
    forwards it), then an elastic run (--max-restarts=1) that loses a worker to SIGKILL, is
    restarted by torchrun and finishes."""
    from arf_training import custom_launch

    ws = Workspace(tmp_path, "ddp", nproc=2)
    exits = tmp_path / "exits"
    stops = []
    for target, group in ((EVERY, True), (4 * EVERY, False)):
        custom_launch.clear_exit_codes(exits)
        run = ws.start({**SLOW, "ARF_EXIT_DIR": str(exits)})
        run.wait_until(ws.checkpoint_appears(target), f"step-{target}")
        run.signal(signal.SIGTERM, group=group)
        # Each worker exits 75; torchrun itself, once signalled, always exits 1. The ranks'
        # own codes tell the backends "preempted, resume me" (no retry spent).
        codes = run.finish()
        assert codes == [TORCHRUN_SIGNALLED_EXIT], run.output[-4000:]
        rank_codes = custom_launch.rank_exit_codes(exits)
        assert rank_codes == {"0": 75, "1": 75}, run.output[-4000:]
        assert custom_launch.was_preempted(codes, rank_codes, world_size=2)
        assert "Received 15 death signal, shutting down workers" in run.output
        assert resumed_step(run) == (stops[-1] if stops else None)
        stops.append(stopped_step(run, ranks=2))  # both ranks stopped after the same step

    # Rank 1 dies (SIGKILL, like the OOM killer) two steps after the next periodic checkpoint,
    # on the first attempt only; the restarted group resumes from that checkpoint.
    last_periodic = (stops[-1] // EVERY + 1) * EVERY
    assert last_periodic + 2 < TOTAL_STEPS, stops
    run = ws.start({"ARF_TEST_CRASH_AT_STEP": str(last_periodic + 2),
                    "ARF_TEST_CRASH_MODE": "kill"}, torchrun_args=("--max-restarts=1",))
    result = ws.complete(run)
    assert [int(s) for s in RESUMED.findall(run.output)] == [stops[-1], last_periodic], \
        run.output[-4000:]
    # Not torchrun's "failed (exitcode: -9) local_rank: 1": it names the failure it polled
    # first, which under load can be rank 0's gloo error. The second resume above is the restart.
    assert f"test hook: SIGKILL to rank 1 after step {last_periodic + 2}" in run.output
    assert result["weights_sha256"] == reference[2]


def test_two_nodes_on_localhost_match_one_node(tmp_path: Path,
                                               reference: dict[int, str]) -> None:
    """Two torchrun "nodes" (c10d rendezvous, 1 process each), twice: same weights, and the
    same as one node with 2 processes (same world size, same per-rank seeds and shards)."""
    shas = []
    for attempt in ("a", "b"):
        ws = Workspace(tmp_path, f"nodes-{attempt}", nproc=1)
        run = ws.start(nodes=2)
        result = ws.complete(run)
        assert result["world_size"] == 2, run.output[-4000:]
        shas.append(result["weights_sha256"])
    assert shas[0] == shas[1] == reference[2]


def test_a_failing_rank_fails_the_whole_job_promptly(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, "failing", nproc=2)
    run = ws.start({"ARF_TEST_CRASH_AT_STEP": "3", "ARF_TEST_CRASH_MODE": "raise"})
    codes = run.finish(timeout=60)
    assert codes == [1]  # torchrun: a worker failed
    assert "injected failure on rank 1 after step 3" in run.output
    assert time.monotonic() - run.started < 60
    assert not (ws.path / "train" / "result.json").exists()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigterm_at_a_random_step_then_rerun_gives_uninterrupted_weights(
        tmp_path: Path, reference: dict[int, str], seed: int) -> None:
    """The kill point drawn from a seed: SIGTERM after a random number of completed steps
    (the per-step delay makes steps ~50 ms apart, so a random wait lands at a random step)."""
    import random

    ws = Workspace(tmp_path, f"random{seed}")
    delay = random.Random(seed).uniform(0.0, 1.6)  # within the ~2 s of slowed training
    run = ws.start(SLOW)
    run.wait_until(lambda: "on SIGTERM: finish the step" in run.output, "setup")
    time.sleep(delay)
    run.signal(signal.SIGTERM)
    codes = run.finish()
    if codes == [0]:  # training ended before the signal: nothing to resume, still must match
        assert ws.result()["weights_sha256"] == reference[1]
        return
    assert codes == [PREEMPTED_EXIT], run.output[-4000:]
    rerun = ws.start()
    result = ws.complete(rerun)
    assert result["steps"] == TOTAL_STEPS
    assert result["weights_sha256"] == reference[1]
