"""Size-bounded logs for `arf up`: each component's log and `supervisor.log` stay under
`ARF_LOG_MAX_BYTES`, with `ARF_LOG_BACKUPS` older generations (`<name>.log.1` newest).

How, and why this way:

1. A component writes into a pipe, not into its file; a thread of the supervisor drains the pipe
   into the file and rotates by renaming (`.log` -> `.log.1` ...) and opening a new file. The
   obvious alternative, copy-then-truncate of a file the component appends to, loses what the
   component writes between the copy's last read and the truncate: measured at 3-4 % of the
   lines of a fast writer (about 30 rotations of 256 KiB), and logrotate's own manual warns of
   it. Only the single writer of a file can rotate it without losing a byte, so the supervisor
   becomes that writer.
2. The component never waits for the disk or the rotation: the pipe is enlarged (1 MiB where
   the kernel allows) and drained at once by a thread of its own, and what cannot be written
   (full disk, run folder gone) is dropped and counted, never left in the pipe; the log says
   how much once it can be written again. The cost: a component that outlives a SIGKILLed
   supervisor writes into a pipe nobody reads, so that output is lost (the writes fail with
   EPIPE: Python and PostgreSQL ignore SIGPIPE, and Python's logging drops what it cannot
   write); such a component is a leftover that the next `arf up` or `arf down` stops.
3. A rotation cuts at a line end when the chunk has one, so a line stays whole in one file; a
   line longer than the whole cap is split.
4. The supervisor's own log (its stdout and stderr, which `arf up` points at `supervisor.log`)
   rotates the same way, and the new file is moved onto fds 1 and 2, so that a traceback or a
   child that inherited them (the migration) lands in the current file, not an old generation.
5. Files are created 0600 (chmod too: an older version's log may be 0644) and renamed, never
   copied, so every generation keeps that mode. A log deleted under the stack (`rm run/*.log`)
   is noticed at the next write and created again, instead of filling an unlinked file that
   no one can see or remove.

Airflow's own log files (task and parsing logs) are not written through here: their age, not
their size, bounds them (`ARF_LOG_RETENTION_DAYS`, read with the other `ARF_LOG_*` settings so
that `arf up` refuses any bad one at once; applied by `arf_training.log_janitor`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from arf_training.errors import ArfError

DEFAULT_MAX_BYTES = 50 * 1024 ** 2
DEFAULT_BACKUPS = 3
MIN_MAX_BYTES = 64 * 1024  # below this, 'ARF_LOG_MAX_BYTES=50' meant 50 MiB, not 50 bytes
MAX_BACKUPS = 100  # each rotation renames every generation: a typo must not make it 10**6
DEFAULT_RETENTION_DAYS = 15  # Airflow's image: AIRFLOW__LOG_RETENTION_DAYS of `clean-logs`
MAX_RETENTION_DAYS = 36500  # "forever" is 0; a longer number is a typo (and 10**400 no float)
PIPE_BYTES = 1024 ** 2  # Linux's default cap for an unprivileged F_SETPIPE_SZ
_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2,
          "g": 1024 ** 3, "gib": 1024 ** 3}
_SIZE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class LogLimits:
    """How big one log may grow, how many rotated generations of it are kept, and for how
    many days Airflow's own log files are kept (0: forever)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    retention_days: int = DEFAULT_RETENTION_DAYS

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "LogLimits":
        """`ARF_LOG_MAX_BYTES` (bytes, or with KiB/MiB/GiB), `ARF_LOG_BACKUPS` and
        `ARF_LOG_RETENTION_DAYS`; an `ArfError` naming the variable, the value and the fix for
        a bad one."""
        env = os.environ if environ is None else environ
        return cls(_max_bytes(env.get("ARF_LOG_MAX_BYTES")),
                   _backups(env.get("ARF_LOG_BACKUPS")),
                   _retention_days(env.get("ARF_LOG_RETENTION_DAYS")))


def _max_bytes(text: str | None) -> int:
    if text is None or not text.strip():
        return DEFAULT_MAX_BYTES
    match = _SIZE.fullmatch(text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise ArfError(f"ARF_LOG_MAX_BYTES={text[:60]!r} is not a size; give bytes or a whole "
                       "number with KiB, MiB or GiB, e.g. 52428800 or 50MiB (or unset it for "
                       "50MiB)")
    value = int(match.group(1)) * unit
    if value < MIN_MAX_BYTES:
        raise ArfError(f"ARF_LOG_MAX_BYTES={text!r} is {value} bytes, below the minimum "
                       f"{MIN_MAX_BYTES} (64KiB); give e.g. 50MiB (or unset it for 50MiB)")
    return value


def _backups(text: str | None) -> int:
    return whole_setting(text, "ARF_LOG_BACKUPS", "a number of rotated logs to keep",
                         DEFAULT_BACKUPS, 1, MAX_BACKUPS)


def _retention_days(text: str | None) -> int:
    return whole_setting(text, "ARF_LOG_RETENTION_DAYS",
                         "a number of days to keep Airflow's log files", DEFAULT_RETENTION_DAYS,
                         0, MAX_RETENTION_DAYS,
                         f" (keep them forever) to {MAX_RETENTION_DAYS}, e.g. 30")


def whole_setting(text: str | None, name: str, what: str, default: int, low: int, high: int,
                  range_text: str = "") -> int:
    """`text` as a whole number from `low` to `high`; `default` if unset; else an error naming
    the variable, its value and the range."""
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ArfError(f"{name}={text[:60]!r} is not {what}; give a whole number from {low}"
                       f"{range_text or f' to {high}'} (or unset it for {default})")
    return value


def private_fd(path: Path) -> int:
    """`path` opened for appending, 0600 whether new or left readable by an older version:
    a component's log may quote its configuration, connection strings included."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class RotatingLog:
    """One log file of at most `limits.max_bytes`, rotated to `<path>.1` ... `<path>.N`.

    Thread-safe, and `write` never raises: the pump threads of a component's earlier and
    current processes may write at once, and a failed write must not stop a pump."""

    def __init__(self, path: Path, limits: LogLimits, *, fds: tuple[int, ...] = ()) -> None:
        self.path = path
        self.limits = limits
        self._fds = fds  # moved onto each new file (the supervisor's stdout and stderr)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._dropped = 0
        self._error: str | None = None
        self._pumps: list[threading.Thread] = []

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                self._write(data)
            except Exception as exc:  # noqa: BLE001 (a pump that died would block its writer)
                self._drop(len(data), exc)

    def line(self, text: str) -> None:
        self.write(text.encode(errors="replace") + b"\n")

    @contextlib.contextmanager
    def pipe(self) -> Iterator[int]:
        """The write end of a new pipe for a child's stdout, drained into this log by a thread
        until every holder of the write end has closed it; closed here once the child has it."""
        with self._lock:
            self._size()  # the file exists from the start, as before a component writes
        read, write = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # a smaller pipe still works
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        pump = threading.Thread(target=self._drain, args=(read,), daemon=True,
                                name=f"log pump {self.path.name}")
        pump.start()
        self._pumps = [p for p in self._pumps if p.is_alive()] + [pump]
        try:
            yield write
        finally:
            os.close(write)

    def close(self, deadline: float) -> None:
        """Wait until `deadline` (monotonic) for the pumps to drain what the stopped processes
        wrote, then close the file (a later write opens it again)."""
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _drain(self, read: int) -> None:
        try:
            while chunk := os.read(read, 65536):
                self.write(chunk)
        finally:
            os.close(read)

    # -- inside the lock ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        rotated = False
        while data:
            size = self._size()
            if size is None:
                self._drop(len(data))
                return
            room = max(0, self.limits.max_bytes - size)
            if len(data) <= room:
                self._put(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1
            if not cut and size and not rotated:  # the line starts in a new file, whole
                self._rotate()
                rotated = True
                continue
            # A line longer than the cap is split; room 0 after a rotation: someone else
            # refilled the new file (an old fd 1), and another rotation would not help.
            cut = cut or room or len(data)
            self._put(data[:cut])
            data = data[cut:]
            self._rotate()
            rotated = True

    def _size(self) -> int | None:
        """The current file's size, (re)opening it first if it is not open or was deleted;
        None if it cannot be opened."""
        if self._fd is not None:
            st = os.fstat(self._fd)
            if st.st_nlink:
                return st.st_size
            os.close(self._fd)  # deleted under us: a new one, visible and removable
            self._fd = None
        try:
            fd = private_fd(self.path)
            for target in self._fds:
                os.dup2(fd, target)
        except OSError as exc:
            self._drop(0, exc)
            return None
        self._fd = fd
        if self._dropped:
            note = (f"[arf: {self._dropped} bytes of this log were dropped: {self._error}]\n")
            self._dropped, self._error = 0, None
            self._put(note.encode())
        return os.fstat(fd).st_size

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _rotate(self) -> None:
        keep = self.limits.backups
        for stale in self.path.parent.glob(self.path.name + ".*"):  # kept under a larger setting
            suffix = stale.name[len(self.path.name) + 1:]
            if suffix.isdigit() and int(suffix) > keep:
                with contextlib.suppress(OSError):
                    stale.unlink()
        for gen in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._generation(gen), self._generation(gen + 1))
        try:
            os.replace(self.path, self._generation(1))
        except FileNotFoundError:
            pass  # deleted under us: what was in it is gone already
        except OSError as exc:
            self._drop(0, exc)
            return  # keep writing to the current file rather than losing the output
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _generation(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _drop(self, count: int, exc: Exception | None = None) -> None:
        self._dropped += count
        if exc is not None:
            self._error = str(exc)


def close_all(logs: Iterable[RotatingLog], timeout_s: float = 2.0) -> None:
    """Close `logs` once their pumps have drained what the stopped processes wrote, waiting
    `timeout_s` at most in all (a descendant that escaped the stop may hold a pipe open)."""
    deadline = time.monotonic() + timeout_s
    for log in logs:
        log.close(deadline)


def own_log(path: Path, limits: LogLimits) -> Callable[[str], None] | None:
    """A line writer for the supervisor's own log if its stdout is `path` (as `arf up` starts
    it); that file then rotates too, and stdout and stderr follow each new file. None if the
    stdout is something else (a terminal, a test's pipe): nothing of ours to rotate."""
    try:
        out, st = os.fstat(1), path.stat()
    except OSError:
        return None
    if (out.st_dev, out.st_ino) != (st.st_dev, st.st_ino):
        return None
    return RotatingLog(path, limits, fds=(1, 2)).line
