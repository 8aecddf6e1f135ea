"""Fault injection for the fault-tolerance tests. Test hooks only: unset in production.

Each hook is an ``ARF_TEST_*`` environment variable, read once; with none set (the production
case) nothing here does anything. A set hook is logged as a warning so that it cannot go
unnoticed in a real run.

=============================  ==================================================================
ARF_TEST_STEP_DELAY_S          sleep this long after every optimizer step, so that a test can
                               signal a run while it is still training
ARF_TEST_CHECKPOINT_DELAY_S    sleep this long after every rank wrote its checkpoint files and
                               before the folder is marked complete and renamed, so that a test
                               can SIGKILL a save half-way (`Checkpointer.save`)
ARF_TEST_CRASH_AT_STEP         after this optimizer step, fail on rank ARF_TEST_CRASH_RANK
                               (default 1), on the first torchrun attempt only
                               (TORCHELASTIC_RESTART_COUNT unset or 0), as ARF_TEST_CRASH_MODE
                               says: ``raise`` (default) a TrainingError, or ``kill`` the process
                               with SIGKILL (a worker lost to the OOM killer or a dead node)
ARF_TEST_CRASH_TRIAL           with ARF_TEST_CRASH_AT_STEP: crash only in this HPO trial (its
                               number); the study's other trials train normally
=============================  ==================================================================
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

from arf_trainer.errors import SpecError, TrainingError

log = logging.getLogger(__name__)

CRASH_MODES = ("raise", "kill")


def _number(env: Mapping[str, str], name: str, kind: type) -> float | int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise SpecError(f"test hook {name}={raw!r} must be a {kind.__name__}; unset it outside "
                        "tests") from None


@dataclass(frozen=True)
class TestHooks:
    __test__ = False  # not a pytest test class

    step_delay_s: float | None = None
    checkpoint_delay_s: float | None = None
    crash_at_step: int | None = None
    crash_rank: int = 1
    crash_mode: str = "raise"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     trial_number: int | None = None) -> "TestHooks":
        """The hooks set in `environ`; `trial_number` is the HPO trial this process trains."""
        env = os.environ if environ is None else environ
        crash_at = _number(env, "ARF_TEST_CRASH_AT_STEP", int)
        if crash_at is not None and env.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
            crash_at = None  # a restarted attempt: let it finish
        crash_trial = _number(env, "ARF_TEST_CRASH_TRIAL", int)
        if crash_trial is not None and crash_trial != trial_number:
            crash_at = None  # another trial crashes, not this one
        mode = env.get("ARF_TEST_CRASH_MODE", "raise")
        if mode not in CRASH_MODES:
            raise SpecError(f"test hook ARF_TEST_CRASH_MODE={mode!r} must be one of {CRASH_MODES}")
        crash_rank = _number(env, "ARF_TEST_CRASH_RANK", int)
        hooks = cls(step_delay_s=_number(env, "ARF_TEST_STEP_DELAY_S", float),
                    checkpoint_delay_s=_number(env, "ARF_TEST_CHECKPOINT_DELAY_S", float),
                    crash_at_step=crash_at,  # type: ignore[arg-type]
                    # `or 1` would turn rank 0 into 1: a single process could not crash.
                    crash_rank=1 if crash_rank is None else int(crash_rank),
                    crash_mode=mode)
        if hooks != cls(crash_rank=hooks.crash_rank, crash_mode=hooks.crash_mode):
            log.warning("fault-injection test hooks are active: %s", hooks)
        return hooks

    def after_step(self, step: int, rank: int) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.crash_at_step == step and self.crash_rank == rank:
            if self.crash_mode == "kill":
                # Said first: torchrun's own log names whichever rank it polled first.
                log.warning("test hook: SIGKILL to rank %d after step %d", rank, step)
                os.kill(os.getpid(), signal.SIGKILL)
            raise TrainingError(f"injected failure on rank {rank} after step {step} "
                                "(test hook ARF_TEST_CRASH_AT_STEP)")

    def before_checkpoint_commit(self) -> None:
        if self.checkpoint_delay_s:
            time.sleep(self.checkpoint_delay_s)
