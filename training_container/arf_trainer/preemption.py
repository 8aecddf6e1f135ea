"""Graceful preemption of `arf-trainer train`: SIGTERM -> finish the step, checkpoint, exit 75.

Kubernetes (pod deletion, node drain), spot/preemptible VMs and torchrun (which forwards the
signal it gets to every worker) all say "stop soon" with SIGTERM and follow up with SIGKILL
after a grace period. The contract:

* The SIGTERM handler only records the request (a flag): the interrupted code is never unwound
  in the middle of an optimizer step or a checkpoint write. A second SIGTERM (torchrun forwards
  the one a ``kill -TERM -<pgid>`` already delivered) is ignored.
* The trainer looks at the flag between optimizer steps; under DDP the ranks agree on it with
  one tiny all_reduce every ~0.25 s of training (`dist.StopAgreement`), so every rank stops
  after the *same* step, writes the same complete-or-absent checkpoint and exits with
  `PREEMPTED_EXIT` (75). Rerunning the same command in the same workspace resumes from that
  checkpoint with bit-identical results.
* A SIGTERM before the first training step exits 75 as well, without writing a checkpoint.
* ``ARF_PREEMPTION_GRACE_S`` (default 30 s) bounds all of it: if the process has not exited
  that long after the first SIGTERM (a peer is gone, storage hangs), a watchdog thread prints
  why and exits 75 at once. The checkpoint being written then stays a ``.tmp-step-N`` folder,
  which resume ignores. Set it below the platform's own kill deadline (Kubernetes'
  ``terminationGracePeriodSeconds``, torchrun's 30 s before it SIGKILLs its workers).

Only the train step installs the handler; the other steps keep the default (die at once).
This module is imported by the CLI before torch, so it must stay free of heavy imports.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from arf_trainer.errors import PREEMPTED_EXIT, Preempted, SpecError

GRACE_ENV = "ARF_PREEMPTION_GRACE_S"
DEFAULT_GRACE_S = 30.0


def grace_from_environ(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get(GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACE_S
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not 0 < grace < float("inf"):
        raise SpecError(f"{GRACE_ENV}={raw!r} must be a number of seconds > 0 (the time a "
                        "preempted training step has to checkpoint and exit); unset it for "
                        f"the default of {DEFAULT_GRACE_S:g}")
    return grace


class PreemptionGuard:
    """Records SIGTERM and enforces the grace period. Create it with `sigterm_guard()`."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received_at: float | None = None
        """time.monotonic() of the first SIGTERM, None if none arrived."""
        self._signalled = threading.Event()
        self._closed = threading.Event()

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def request(self) -> None:
        """What the SIGTERM handler does (tests may call it directly)."""
        if self.received_at is not None:
            return
        self.received_at = time.monotonic()
        # Event.set() is safe in a handler: only the watchdog thread ever waits on it.
        self._signalled.set()

    def check_setup(self, where: str) -> None:
        """Raise `Preempted` if SIGTERM arrived during setup (before any collective)."""
        if self.requested:
            raise Preempted(f"SIGTERM received {where}, before training started; no checkpoint "
                            "written. Rerun the same command to start again")

    def _handle(self, signum: int, frame: object) -> None:
        self.request()

    def _watchdog(self) -> None:
        self._signalled.wait()
        if self._closed.is_set() or self._closed.wait(self.grace_s):
            return
        os.write(2, (f"arf-trainer: still running {self.grace_s:g} s after SIGTERM "
                     f"({GRACE_ENV}); exiting with code {PREEMPTED_EXIT} now. A checkpoint "
                     "being written is left incomplete and will not be loaded; the next run "
                     "resumes from the last complete one\n").encode())
        os._exit(PREEMPTED_EXIT)

    def _close(self) -> None:
        self._closed.set()
        self._signalled.set()  # wake the watchdog so that it ends


_active: PreemptionGuard | None = None


@contextmanager
def sigterm_guard(environ: Mapping[str, str] | None = None) -> Iterator[PreemptionGuard]:
    """Handle SIGTERM as a preemption request for the duration of the block.

    Nested uses share the outermost guard (the CLI installs it before importing torch, so a
    SIGTERM during the imports counts too; `run_train` uses it, or installs one when called
    in-process). Outside the main thread Python cannot install signal handlers: the guard is
    then inert (never requested) and SIGTERM keeps its previous meaning.
    """
    global _active
    if _active is not None:
        yield _active
        return
    guard = PreemptionGuard(grace_from_environ(environ))
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = signal.signal(signal.SIGTERM, guard._handle)
    threading.Thread(target=guard._watchdog, name="arf-preemption-watchdog", daemon=True).start()
    _active = guard
    try:
        yield guard
    finally:
        _active = None
        guard._close()
        signal.signal(signal.SIGTERM, previous)
