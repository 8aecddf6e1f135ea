"""The tracking spool's file: append-only JSON lines, fsynced in batches, and its ack state.

`Spool` holds ``tracking-spool.jsonl`` (one record a line, ``seq`` growing by one across the
step's attempts) and ``tracking-spool.acked`` (`SpoolState`), flock'ed by one process at a
time. The format, the exactly-once rule and who sends: `arf_trainer.tracking_spool`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from arf_trainer.errors import SpoolError
from arf_trainer.spec import read_json, write_json_atomic

log = logging.getLogger(__name__)

SPOOL_FILE = "tracking-spool.jsonl"
ACKED_FILE = "tracking-spool.acked"
LOCK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SpoolState:
    """The content of ``tracking-spool.acked``."""

    acked: int = 0
    """Every record with seq <= acked is in MLflow."""
    attempted: int = 0
    """No record with seq > attempted was ever sent."""
    run_id: str | None = None
    experiment_id: str | None = None


class Spool:
    """One training's spool file and ack state, held (flock) by one process at a time.

    `append` may be called from one thread while another calls `sync` and `deliver`.
    """

    def __init__(self, folder: Path, fh: IO[bytes], state: SpoolState,
                 pending: list[dict[str, Any]], next_seq: int) -> None:
        self.folder = folder
        self.path = folder / SPOOL_FILE
        self.state = state
        self._fh: IO[bytes] | None = fh
        self._pending = pending
        self._next_seq = next_seq
        self._dirty = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, lock_timeout: float = LOCK_TIMEOUT_S) -> "Spool":
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SPOOL_FILE
        fh = open(path, "ab")
        try:
            _flock(fh, path, lock_timeout)
            acked = folder / ACKED_FILE
            state = _read_state(acked) if acked.is_file() else SpoolState()
            records = _read_records(path)
        except BaseException:
            fh.close()
            raise
        last = records[-1]["seq"] if records else 0
        # Never reuse a number MLflow may have seen, even if the file lost lines.
        next_seq = max(last, state.attempted, state.acked) + 1
        return cls(folder, fh, state, [r for r in records if r["seq"] > state.acked], next_seq)

    def append(self, kind: str, **fields: Any) -> int:
        """Add one record (buffered; `sync` makes it durable) and return its seq."""
        with self._lock:
            if self._fh is None:
                raise SpoolError(f"the tracking spool {self.path} is closed")
            seq = self._next_seq
            record = {"seq": seq, "kind": kind, **fields}
            self._fh.write(json.dumps(record, separators=(",", ":"), default=str).encode()
                           + b"\n")
            self._next_seq += 1
            self._pending.append(record)
            self._dirty = True
        return seq

    def sync(self) -> list[dict[str, Any]]:
        """Make every appended record durable; return those MLflow has not acknowledged."""
        with self._lock:
            fh, dirty = self._fh, self._dirty
            if fh is not None and dirty:
                fh.flush()
                self._dirty = False
            pending = list(self._pending)
        if fh is not None and dirty:
            os.fsync(fh.fileno())  # outside the lock: appends go on meanwhile
        return pending

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def save_state(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)
        write_json_atomic(self.folder / ACKED_FILE, asdict(self.state))
        if "acked" in changes:
            with self._lock:
                self._pending = [r for r in self._pending if r["seq"] > self.state.acked]

    def close(self) -> None:
        """Flush, fsync and release the file (and with it the lock)."""
        with self._lock:
            fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fh.close()


def _flock(fh: IO[bytes], path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise SpoolError(
                    f"the tracking spool {path} is held by another process (a train or register "
                    f"step of the same DAG run still running?) after waiting {timeout:.0f} s; "
                    "let it finish, then retry the task") from None
            time.sleep(0.1)


def _read_state(path: Path) -> SpoolState:
    raw = read_json(path)
    fields = {"acked": int, "attempted": int, "run_id": str, "experiment_id": str}
    if not isinstance(raw, dict) or set(raw) - set(fields) or any(
            not (isinstance(v, fields[k]) and not isinstance(v, bool))
            and not (v is None and fields[k] is str) for k, v in raw.items()):
        raise SpoolError(f"{path} is not a spool state ({json.dumps(raw)[:200]}): expected "
                         '{"acked": int, "attempted": int, "run_id": str|null, '
                         '"experiment_id": str|null}; the file was damaged or written by a newer '
                         "arf-trainer")
    state = SpoolState(**raw)
    if not 0 <= state.acked <= state.attempted or (state.acked and state.run_id is None):
        raise SpoolError(f"{path} says acked={state.acked}, attempted={state.attempted}, "
                         f"run_id={state.run_id}, which no delivery leaves (acked <= attempted, "
                         "and a run id once anything was acked): the file was edited or damaged")
    return state


def _read_records(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        # Half a line: the writer died mid-write, before any fsync, so it was never sent.
        log.warning("dropping a torn last record (%d bytes) from %s", len(data) - end, path)
        os.truncate(path, end)
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            record = json.loads(line)
            seq, kind = record["seq"], record["kind"]
            if type(seq) is not int or not isinstance(kind, str):
                raise TypeError(f"seq {seq!r} is not an integer or kind {kind!r} not a string")
            if records and seq <= records[-1]["seq"]:
                # Acks count by seq: out of order, a record would be sent twice or never.
                raise ValueError(f"seq {seq} does not follow seq {records[-1]['seq']}")
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(
                f"{path} line {number} is not a spool record ({exc}): the file was damaged; "
                "its unsent tracking data cannot be recovered, move the file away to go on"
            ) from exc
        records.append(record)
    return records
