"""SIGTERM handling of the train step, in-process and in small subprocesses (no torchrun).

The end-to-end checks with real `arf-trainer` processes, torchrun, SIGKILL and elastic restarts
are in tests/integration/test_preemption.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_digits

from arf_trainer.errors import PREEMPTED_EXIT, Preempted, SpecError
from arf_trainer.preemption import DEFAULT_GRACE_S, grace_from_environ, sigterm_guard
from arf_trainer.trainer.run import run_train
from arf_trainer.trainer.testhooks import TestHooks

HP = {"epochs": 2, "hidden_size": 32, "batch_size": 32}  # 400 train rows: 13 steps per epoch


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param(None, DEFAULT_GRACE_S, id="default"),
    pytest.param("2.5", 2.5, id="seconds"),
])
def test_grace_period_from_environment(value: str | None, expected: float) -> None:
    assert grace_from_environ({} if value is None else {"ARF_PREEMPTION_GRACE_S": value}) \
        == expected


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_bad_grace_period_is_refused(value: str) -> None:
    with pytest.raises(SpecError, match=rf"ARF_PREEMPTION_GRACE_S='{value}' must be a number "
                                        r"of seconds > 0"):
        grace_from_environ({"ARF_PREEMPTION_GRACE_S": value})


def test_guard_records_sigterm_and_restores_the_previous_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_guard({}) as guard:
        with sigterm_guard({}) as inner:
            assert inner is guard  # the CLI's guard is shared by run_train
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards a second one: ignored
        deadline = time.monotonic() + 5
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        first = guard.received_at
        assert guard.requested and first is not None
        with pytest.raises(Preempted, match="SIGTERM received while loading the data"):
            guard.check_setup("while loading the data")
        assert guard.received_at == first
    assert signal.getsignal(signal.SIGTERM) == before


def test_watchdog_exits_75_when_the_grace_period_runs_out() -> None:
    # A step that never finishes (here: sleep) must not outlive the grace period.
    code = ("import os, signal, time\n"
            "from arf_trainer.preemption import sigterm_guard\n"
            "with sigterm_guard():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "ARF_PREEMPTION_GRACE_S": "0.3"}, timeout=30)
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr
    assert time.monotonic() - start < 15
    assert "still running 0.3 s after SIGTERM (ARF_PREEMPTION_GRACE_S)" in proc.stderr


def test_test_hooks_are_off_by_default_and_crash_on_the_first_attempt_only() -> None:
    assert TestHooks.from_environ({}) == TestHooks()
    hooks = TestHooks.from_environ({"ARF_TEST_CRASH_AT_STEP": "3"})
    assert hooks.crash_at_step == 3 and hooks.crash_rank == 1 and hooks.crash_mode == "raise"
    restarted = TestHooks.from_environ({"ARF_TEST_CRASH_AT_STEP": "3",
                                        "TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted.crash_at_step is None
    with pytest.raises(SpecError, match="ARF_TEST_CRASH_MODE='boom' must be one of"):
        TestHooks.from_environ({"ARF_TEST_CRASH_MODE": "boom"})


@pytest.mark.parametrize("loading", [pytest.param("auto", id="memory"),
                                     pytest.param("stream", id="stream")])
def test_sigterm_mid_training_checkpoints_and_resumes_bit_identically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loading: str) -> None:
    uri = fresh_tracking_uri(tmp_path)
    monkeypatch.setenv("ARF_STREAM_WINDOW_ROWS", "64")  # 400 rows: 7 windows when streaming

    def env_for(name: str):
        ws = tmp_path / name
        prepare_digits(ws, rows=500)
        spec = make_spec("digits_smoke", run_id=f"manual__{name}", hyperparameters=HP,
                         training={"checkpoint_every_steps": 4, "data_loading": loading})
        return make_env(spec, ws, uri, tmp_path / "artifacts")

    reference = run_train(env_for("reference"))
    assert reference is not None

    env = env_for("preempted")
    checkpoints = env.workspace / "train" / "checkpoints"

    def send_sigterm_after_step_4() -> None:
        deadline = time.monotonic() + 60
        while not (checkpoints / "step-4" / ".complete").is_file():
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setenv("ARF_TEST_STEP_DELAY_S", "0.05")
    sender = threading.Thread(target=send_sigterm_after_step_4, daemon=True)
    sender.start()
    with pytest.raises(Preempted, match=r"stopped after step (\d+)/26 and saved") as stopped:
        run_train(env)
    sender.join()
    step = int(stopped.value.args[0].split("stopped after step ")[1].split("/")[0])
    assert 4 <= step < 26 and (checkpoints / f"step-{step}" / ".complete").is_file()
    assert not (env.workspace / "train" / "result.json").exists()

    monkeypatch.delenv("ARF_TEST_STEP_DELAY_S")
    resumed = run_train(env)
    assert resumed is not None and resumed["steps"] == 26
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["data_loading"] == ("memory" if loading == "auto" else "stream")


def test_crash_hook_can_target_one_hpo_trial():
    env = {"ARF_TEST_CRASH_AT_STEP": "3", "ARF_TEST_CRASH_RANK": "0", "ARF_TEST_CRASH_TRIAL": "2"}
    assert TestHooks.from_environ(env, trial_number=2).crash_at_step == 3
    assert TestHooks.from_environ(env, trial_number=1).crash_at_step is None
    assert TestHooks.from_environ(env).crash_at_step is None  # not a trial: no crash
