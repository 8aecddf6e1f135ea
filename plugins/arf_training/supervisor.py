"""One supervisor for the components of `arf up`: start in order, restart what exits, stop all.

Generic over its components (the embedded stack's are built in `arf_training.stack`):

1. Start order with readiness: each component starts only once the previous one is ready (its
   `ready()` probe, else alive for a moment), so that e.g. the scheduler never starts a task
   before the api-server that serves the task's Execution API accepts connections.
2. Restart with backoff: a component that exits is logged with its name and exit code or
   signal, its whole process group and every descendant it left behind are killed (a SIGKILLed
   scheduler leaves its LocalExecutor workers and their step processes running), and it is
   started again after 1, 2, 4 ... up to 60 s (reset after a minute of uptime).
3. Stop: on SIGTERM/SIGINT (`arf down`) every group gets SIGTERM, then SIGKILL after a grace
   period; the database last, since the others write to it while they shut down.
4. State: `state.json` in the run folder, rewritten atomically on every change, is what
   `arf status` reads (pid, start time, restarts, port, last exit); SIGHUP restarts what waits
   in backoff at once (a second `arf up`). A state file that cannot be written (full disk, run
   folder deleted) is logged, never fatal: the components matter more than their report.
5. One supervisor per run folder: it holds an exclusive lock on `supervisor.lock` for its
   life (released by the kernel even after SIGKILL), so a second one exits before touching
   anything, and a pid file copied with the folder or naming a reused pid is not "running".
6. Logs (`<component>.log`, `supervisor.log`) are size-bounded: see `arf_training.logrotate`.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from arf_training.logrotate import LogLimits, RotatingLog, close_all, own_log
from arf_training.procs import Descendants, port_holder, reap, start_process, stop_groups

STATE_FILE = "state.json"
PID_FILE = "supervisor.pid"
LOCK_FILE = "supervisor.lock"
SETTLE_S = 3.0  # "ready" for a component without a probe: alive this long after its start
UPTIME_RESETS_BACKOFF_S = 60.0
MAX_DOUBLINGS = 30  # 2**30 x any base is past any cap; 2**1024 does not fit a float at all
_PRINT = functools.partial(print, flush=True)  # the log without `log=`: stdout, or see run()


@dataclass
class Component:
    """One long-running process of the stack."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int | None = None
    ready: Callable[[], bool] | None = None
    # A probe given the component's start (wall clock): for readiness that a predecessor could
    # fake, e.g. a heartbeat row in the database left by the scheduler that was just killed.
    ready_since: Callable[[float], bool] | None = None
    before_start: Callable[[], None] | None = None  # e.g. migrate once the DB is up
    popen_kwargs: dict = field(default_factory=dict)
    stop_last: bool = False  # the database: the others need it while they shut down
    stop_signal: int = signal.SIGTERM  # to the leader first; its group gets SIGTERM/SIGKILL after


@dataclass
class _Slot:
    component: Component
    proc: subprocess.Popen | None = None
    started_at: float | None = None  # wall clock, for uptime shown by `arf status`
    restarts: int = 0
    fast_exits: int = 0
    next_start: float | None = None  # monotonic time of the pending restart
    last_exit: str | None = None
    ready: bool = False
    descendants: Descendants = field(default_factory=Descendants)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Supervisor:
    def __init__(self, components: list[Component], run_dir: Path, *, grace_s: float = 15,
                 backoff_s: tuple[float, float] = (1.0, 60.0), ready_timeout_s: float = 300,
                 log: Callable[[str], None] | None = None, lock=None,
                 log_limits: LogLimits | None = None) -> None:
        self.slots = [_Slot(c) for c in components]
        self.run_dir = run_dir
        self.grace_s = grace_s
        self.backoff_s = backoff_s
        self.ready_timeout_s = ready_timeout_s
        self._log = log or _PRINT
        self.log_limits = log_limits or LogLimits()
        self._logs: dict[str, RotatingLog] = {}  # one per component, across its restarts
        self._stopping = False
        self._phase = "starting"
        self._started_at = time.time()
        self._last_snapshot = 0.0
        self._lock = lock  # from `take_run_lock`, when the caller took it before building us
        self._state_error: str | None = None

    def log(self, message: str) -> None:
        try:
            self._log(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} arf-supervisor: {message}")
        except OSError:
            pass  # a full disk under supervisor.log: keep supervising without a log

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_repair)
        self._lock = self._lock or take_run_lock(self.run_dir)
        if self._lock is None:
            self.log(another_supervisor(self.run_dir))
            return 1
        if self._log is _PRINT:  # now that the run folder is ours, so is its supervisor.log
            self._log = own_log(self.run_dir / "supervisor.log", self.log_limits) or _PRINT
        code = 0
        try:
            if self.start_all():
                while not self._stopping:
                    self.tick()
                    time.sleep(0.5)
            else:
                code = 0 if self._stopping else 1
        finally:
            self._phase = "stopping"
            self.write_state()
            self.stop_all()
            for name in (STATE_FILE, PID_FILE):
                try:
                    (self.run_dir / name).unlink(missing_ok=True)
                except OSError:
                    pass
            self._lock.close()  # the lock file itself stays: a new one would not be the same lock
        return code

    def _on_stop(self, signum, _frame) -> None:
        self.log(f"{signal.Signals(signum).name} received: stopping every component")
        self._stopping = True

    def _on_repair(self, _signum, _frame) -> None:
        for slot in self.slots:
            if slot.next_start is not None:
                slot.next_start = time.monotonic()
                slot.fast_exits = 0

    def start_all(self) -> bool:
        """Start the components in order, each once the previous one is ready; False if one
        did not get ready in time (or a stop was asked for meanwhile)."""
        for slot in self.slots:
            if not self._start_and_wait(slot):
                return False
        self._phase = "running"
        self.log("all components ready: " + ", ".join(
            f"{s.component.name} (pid {s.proc.pid})" for s in self.slots if s.proc))
        self.write_state()
        return True

    def _start_and_wait(self, slot: _Slot) -> bool:
        self._start(slot)
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._stopping and time.monotonic() < deadline:
            self.tick()
            if slot.ready:
                self.log(f"{slot.component.name} is ready")
                return True
            time.sleep(0.5)
        if not self._stopping:
            self.log(f"{slot.component.name} did not get ready within {self.ready_timeout_s:.0f} s"
                     f"; see its log in {self.run_dir}; stopping")
        return False

    def _start(self, slot: _Slot) -> None:
        c = slot.component
        slot.next_start = None
        slot.ready = False
        try:
            if c.before_start:
                c.before_start()
            log = self._logs.setdefault(c.name, RotatingLog(self.run_dir / f"{c.name}.log",
                                                            self.log_limits))
            slot.proc = start_process(c.command, c.env, log, **c.popen_kwargs)
        except Exception as exc:  # noqa: BLE001 (a failed start is retried like an exit)
            slot.proc = None
            self._schedule_restart(slot, f"could not start: {exc}", uptime=0.0)
            return
        slot.started_at = time.time()
        slot.descendants = Descendants()
        self.log(f"started {c.name} (pid {slot.proc.pid}): {' '.join(c.command)}")
        self.write_state()

    def tick(self) -> None:
        """Notice exits, start pending restarts, probe readiness, snapshot descendants."""
        now = time.monotonic()
        snapshot = now - self._last_snapshot > 2.0
        for slot in self.slots:
            proc = slot.proc
            if proc is not None and proc.poll() is not None:
                self._on_exit(slot, proc.returncode)
            elif proc is not None:
                if snapshot:
                    slot.descendants.snapshot(proc.pid)
                if not slot.ready:
                    slot.ready = self._probe(slot)
                    if slot.ready:
                        self.write_state()
            elif slot.next_start is not None and now >= slot.next_start and not self._stopping:
                self._start(slot)
        if snapshot:
            self._last_snapshot = now
            if self._state_error:  # space again, the folder back: `arf status` is current
                self.write_state()

    def _probe(self, slot: _Slot) -> bool:
        comp = slot.component
        started = slot.started_at or time.time()
        if comp.ready is None and comp.ready_since is None:
            return time.time() - started >= SETTLE_S
        try:
            return bool(comp.ready_since(started) if comp.ready_since else comp.ready())
        except Exception:  # noqa: BLE001 (not ready yet, whatever the reason)
            return False

    def _on_exit(self, slot: _Slot, returncode: int) -> None:
        pid = slot.proc.pid
        uptime = time.time() - (slot.started_at or time.time())
        # The exited leader's group and descendants may live on (orphaned workers holding
        # ports, running steps whose task is gone): stop them before starting a new one.
        slot.descendants.snapshot(pid)
        # SIGKILL at once, not SIGTERM: a task runner told to stop fails its task (a run with
        # retries: 0 then fails), while one that just vanishes is an orphan that the restarted
        # scheduler resets and runs again.
        stop_groups({slot.component.name: pid}, grace_s=5,
                    descendants={slot.component.name: slot.descendants},
                    first_signal=signal.SIGKILL)
        slot.proc = None
        what = f"{describe_exit(returncode)} after {uptime:.0f} s"
        port = slot.component.port
        holder = port and port_holder(port)
        if holder:  # the usual cause of a quick exit, and the component's log may not say
            what += f"; its port {port} is in use by {holder}"
        self._schedule_restart(slot, f"(pid {pid}) exited: {what}", uptime)

    def _schedule_restart(self, slot: _Slot, reason: str, uptime: float) -> None:
        slot.fast_exits = slot.fast_exits + 1 if uptime < UPTIME_RESETS_BACKOFF_S else 1
        base, cap = self.backoff_s
        delay = min(cap, base * 2 ** min(slot.fast_exits - 1, MAX_DOUBLINGS))
        slot.restarts += 1
        slot.last_exit = reason
        slot.ready = False
        slot.next_start = time.monotonic() + delay
        self.log(f"component {slot.component.name} {reason}; restart #{slot.restarts} "
                 f"in {delay:.1f} s")
        self.write_state()

    def stop_all(self) -> list[str]:
        running = [s for s in self.slots if s.proc is not None]
        stopped = []
        for last in (False, True):
            batch = [s for s in running if s.component.stop_last == last]
            for slot in batch:
                slot.descendants.snapshot(slot.proc.pid)
                if slot.component.stop_signal != signal.SIGTERM:
                    self._stop_leader(slot)
            stopped += stop_groups({s.component.name: s.proc.pid for s in batch},
                                   grace_s=self.grace_s,
                                   descendants={s.component.name: s.descendants for s in batch})
            for slot in batch:
                reap(slot.proc.pid)
                slot.proc = None
        close_all(self._logs.values())  # with the last words of what was just stopped
        if stopped:
            self.log("stopped " + ", ".join(stopped))
        return stopped

    def _stop_leader(self, slot: _Slot) -> None:
        """Its own stop signal to the leader alone, and a grace period to act on it."""
        try:
            slot.proc.send_signal(slot.component.stop_signal)
            slot.proc.wait(timeout=self.grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass

    # -- state file -------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "supervisor": {"pid": os.getpid(), "started_at": self._started_at,
                           "phase": self._phase},
            "components": [{
                "name": s.component.name,
                "pid": s.proc.pid if s.proc else None,
                "port": s.component.port,
                "started_at": s.started_at if s.proc else None,
                "restarts": s.restarts,
                "ready": s.ready,
                "state": ("running" if s.proc and s.ready else "starting" if s.proc
                          else "backoff" if s.next_start is not None else "stopped"),
                "last_exit": s.last_exit,
            } for s in self.slots],
        }

    def write_state(self) -> None:
        path = self.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.state(), indent=2))
            os.replace(tmp, path)
        except OSError as exc:
            if str(exc) != self._state_error:  # once per cause, not once per tick
                self._state_error = str(exc)
                self.log(f"cannot write {path} ({exc}); `arf status` shows an old state until "
                         "it can; the components keep running")
            return
        self._state_error = None


def read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def take_run_lock(run_dir: Path, wait_s: float = 1.0):
    """The run folder's supervisor lock (an open file; held until it is closed or this
    process ends), with this process's pid in the pid file; None if another process holds it.
    Retried briefly: a reader (`supervisor_pid`) holds it shared for an instant."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 (held for the process's life)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(0.1)
    (run_dir / PID_FILE).write_text(str(os.getpid()))
    return handle


def another_supervisor(run_dir: Path) -> str:
    try:
        pid = (run_dir / PID_FILE).read_text().strip()
    except OSError:
        pid = "?"
    return (f"another supervisor (pid {pid}) already runs the stack of {run_dir}: nothing was "
            "started; `arf status` shows it, `arf down` stops it")


def _lock_held(run_dir: Path) -> bool | None:
    """Whether a live process holds the run folder's lock; None: no lock file (a supervisor
    of a version before the lock)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # none, or not ours to read: the pid file decides, as before the lock
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock, if we got it
    return False


def supervisor_pid(run_dir: Path, marker: str = "arf_training.stack") -> int | None:
    """The pid of a live supervisor of this run folder, else None: one that holds its lock
    (a pid file may outlive its process, name a reused pid or be copied with the folder),
    and `marker` in its command line."""
    import psutil

    if _lock_held(run_dir) is False:
        return None
    try:
        pid = int((run_dir / PID_FILE).read_text())
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    if marker not in cmdline or psutil.Process(pid).status() == "zombie":
        return None
    return pid


if __name__ == "__main__":  # pragma: no cover - the stack's entry point is arf_training.stack
    sys.exit("run `python -m arf_training.stack` (or `arf up`)")
