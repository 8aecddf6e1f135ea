"""Tracking that survives MLflow outages: a local append-only spool, delivered exactly once.

Rank 0 of `arf-trainer train` never calls MLflow on the training path. Every tracking call (the
run itself, params, tags, metric points, the resolved-config artifact, the dataset input, the
final status) becomes one JSON line of ``<workspace>/train/tracking-spool.jsonl``::

    {"seq":7,"kind":"metric","key":"val_loss","value":0.31,"step":46,"ts":1732600000123}

``seq`` grows by one per record, across attempts of the step (a retried task appends). The
training loop only appends lines, so it neither stalls nor fails with MLflow. A background
thread (`TrackingSpool`) fsyncs the file once a second and, every ARF_TRACKING_SEND_INTERVAL_S
(default 5 s: each request costs the sender ~10 ms of CPU, so fewer, larger batches keep it off
the trainer's cores), sends the records MLflow has not acknowledged yet, in order, grouping
consecutive params/tags/metrics into `log_batch` calls. When MLflow is down or hangs, a send
fails within MLFLOW_HTTP_REQUEST_TIMEOUT (`HTTP_DEFAULTS`: 5 s and no HTTP-level retries in the
train process, unless the environment says otherwise), the records stay in the spool, and the
thread tries again after 1, 2, 4, ... up to 30 s. When training ends the thread makes one last
attempt (bounded by FINAL_DRAIN_S); anything still unsent is sent by `replay`, which the
register step runs before it registers anything.

The run is created lazily. The first record (kind ``run``) names the experiment and the DAG
run; when MLflow is first reachable the experiment and run are found or created by the
``arf.dag_run`` tag (so a lost create response cannot make a second run) and the run is dated
with the train step's start time. If MLflow never answered during training, train/result.json
says ``"mlflow_run_id": null`` and the register step writes the id in after its replay.

Exactly once. ``tracking-spool.acked`` (JSON, replaced atomically) holds the run id and two
sequence numbers: ``acked`` (MLflow confirmed every record up to it) and ``attempted`` (the last
record ever handed to MLflow). A group is sent only after its lines are fsynced and
``attempted`` is saved, and ``acked`` is saved only after MLflow confirms. Whatever happens in
between (a request that timed out although the server applied it, a crash before the ack was
saved), the only records that may already be in MLflow are those in (acked, attempted]: the
"ambiguous" ones. Params (same value), tags, artifacts, the dataset input and the final status
are idempotent in MLflow and are simply sent again. Metric points are not (log_batch appends),
so the ambiguous points are first looked up in the run's metric history by (key, step,
timestamp, value) and those already there are left out. Each point carries its timestamp from
the spool, so those four values identify it (the trainer never logs one key twice in the same
millisecond and step). Records after ``attempted`` were never sent. One process sends at a
time: the spool file is flock'ed by its holder (the trainer's sender thread, or `replay`).

A torn last line (a crash mid-write) was never fsynced, so never sent, and is dropped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from arf_trainer import tracking
from arf_trainer.errors import RegistryError, SpecError, SpoolError
from arf_trainer.spec import read_json, write_json_atomic

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

SPOOL_FILE = "tracking-spool.jsonl"
ACKED_FILE = "tracking-spool.acked"
# The train process's MLflow calls all come from the sender thread: fail fast there and let
# the spool retry, instead of MLflow's default 120 s timeout x 7 backed-off retries (minutes).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
SYNC_INTERVAL_S = 1.0
SEND_INTERVAL_ENV, SEND_INTERVAL_S = "ARF_TRACKING_SEND_INTERVAL_S", 5.0
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
FINAL_DRAIN_S = 10.0
"""How long the last delivery attempt at the end of training may keep sending."""
LOCK_TIMEOUT_S = 30.0
# log_batch limits (mlflow.utils.validation).
MAX_METRICS, MAX_PARAMS_TAGS, MAX_ENTITIES = 1000, 100, 1000
BATCH_KINDS = ("param", "tag", "metric")


@dataclass(frozen=True)
class SpoolState:
    """The content of ``tracking-spool.acked``."""

    acked: int = 0
    """Every record with seq <= acked is in MLflow."""
    attempted: int = 0
    """No record with seq > attempted was ever sent."""
    run_id: str | None = None
    experiment_id: str | None = None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_permanent(exc: BaseException) -> bool:
    """True when resending cannot help: MLflow refused the request (4xx) or the record."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (RegistryError, SpoolError)):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status != 429
    return False


def _http_timeout_s() -> float:
    try:
        return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", ""))
    except ValueError:
        return float(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _short(text: str, limit: int = 400) -> str:
    """The start and the end (where urllib3 puts the cause) of a long message."""
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


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
            state = SpoolState(**read_json(acked)) if acked.is_file() else SpoolState()
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
            int(record["seq"]), record["kind"]  # noqa: B018 - the fields every record has
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(
                f"{path} line {number} is not a spool record ({exc}): the file was damaged; "
                "its unsent tracking data cannot be recovered, move the file away to go on"
            ) from exc
        records.append(record)
    return records


# -- delivery --------------------------------------------------------------------------------

def _point(key: str, step: int, timestamp: int, value: float) -> tuple:
    value = float(value)
    return key, int(step), int(timestamp), "nan" if math.isnan(value) else value


def _next_group(records: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """Consecutive param/tag/metric records from `start` that fit one log_batch call."""
    if records[start]["kind"] not in BATCH_KINDS:
        return [records[start]]
    group: list[dict[str, Any]] = []
    counts = {"param": 0, "tag": 0, "metric": 0}
    keys: set[tuple[str, str]] = set()
    for record in records[start:]:
        kind = record["kind"]
        if kind not in BATCH_KINDS or len(group) == MAX_ENTITIES:
            break
        if kind == "metric" and counts["metric"] == MAX_METRICS:
            break
        if kind != "metric":
            # A batch may not repeat a param or tag key: a repeat starts the next batch.
            if counts[kind] == MAX_PARAMS_TAGS or (kind, record["key"]) in keys:
                break
            keys.add((kind, record["key"]))
        counts[kind] += 1
        group.append(record)
    return group


def _send(client: "MlflowClient", run_id: str, group: list[dict[str, Any]],
          ambiguous_until: int) -> None:
    kind = group[0]["kind"]
    if kind in BATCH_KINDS:
        from mlflow.entities import Metric, Param, RunTag

        metrics = [r for r in group if r["kind"] == "metric"]
        ambiguous = [r for r in metrics if r["seq"] <= ambiguous_until]
        if ambiguous:
            logged: set[tuple] = set()
            for key in sorted({r["key"] for r in ambiguous}):
                logged.update(_point(m.key, m.step, m.timestamp, m.value)
                              for m in client.get_metric_history(run_id, key))
            metrics = [r for r in metrics if r["seq"] > ambiguous_until
                       or _point(r["key"], r["step"], r["ts"], r["value"]) not in logged]
            log.info("re-sending records %d..%d that MLflow may have seen: %d of %d metric "
                     "point(s) were already there", group[0]["seq"], group[-1]["seq"],
                     len(ambiguous) - sum(r["seq"] <= ambiguous_until for r in metrics),
                     len(ambiguous))
        params = [Param(r["key"], r["value"]) for r in group if r["kind"] == "param"]
        tags = [RunTag(r["key"], r["value"]) for r in group if r["kind"] == "tag"]
        if metrics or params or tags:
            client.log_batch(run_id, metrics=[Metric(r["key"], r["value"], r["ts"], r["step"])
                                              for r in metrics], params=params, tags=tags)
    elif kind == "artifact":
        client.log_dict(run_id, group[0]["json"], group[0]["path"])
    elif kind == "input":
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        record = group[0]
        client.log_inputs(run_id, datasets=[DatasetInput(
            Dataset(**record["dataset"]), tags=[InputTag(MLFLOW_DATASET_CONTEXT,
                                                         record["context"])])])
    elif kind == "end":
        client.set_terminated(run_id, group[0]["status"], end_time=group[0]["ts"])
    else:
        raise SpoolError(f"record {group[0]['seq']} has kind {kind!r}, which this arf-trainer "
                         "does not know: it was written by a newer version; replay with that one")


def deliver(spool: Spool, client: "MlflowClient", deadline: float | None = None) -> bool:
    """Send the spool's unacknowledged records to MLflow in order (see the module docstring).

    Returns True when nothing is left, False when `deadline` (time.monotonic) passed first.
    Raises what MLflow raised for the first group it could not take; that group and the ones
    after it stay pending.
    """
    records = spool.sync()
    i = 0
    while i < len(records):
        if deadline is not None and time.monotonic() > deadline:
            return False
        record = records[i]
        if record["kind"] == "run":
            run_id, existed = spool.state.run_id, True
            if run_id is None:
                experiment_id = tracking.get_or_create_experiment(
                    client, record["experiment"], record.get("artifact_root"))
                run_id, existed = tracking.find_or_create_run(
                    client, experiment_id, record["dag_id"], record["dag_run_id"],
                    record["tags"], start_time=record["ts"], key=record.get("run_key"),
                    parent_key=record.get("parent_key"))
                spool.save_state(run_id=run_id, experiment_id=experiment_id)
                log.info("MLflow run %s (%s) in experiment %s", run_id,
                         "resumed" if existed else "new", experiment_id)
            if existed:
                # Another attempt of the step continues the run (which an earlier attempt may
                # have ended as KILLED or FAILED): it is running again.
                client.update_run(run_id, status="RUNNING")
            spool.save_state(acked=record["seq"],
                             attempted=max(spool.state.attempted, record["seq"]))
            i += 1
            continue
        run_id = spool.state.run_id
        if run_id is None:
            raise SpoolError(f"record {record['seq']} of {spool.path} comes before any 'run' "
                             "record, so it has no MLflow run to go to: the spool is damaged")
        group = _next_group(records, i)
        ambiguous_until = spool.state.attempted
        if group[-1]["seq"] > ambiguous_until:
            spool.save_state(attempted=group[-1]["seq"])
        _send(client, run_id, group, ambiguous_until)
        spool.save_state(acked=group[-1]["seq"])
        i += len(group)
    return True


def replay(folder: Path, client: "MlflowClient", tracking_uri: str,
           lock_timeout: float = LOCK_TIMEOUT_S) -> SpoolState | None:
    """Send whatever the spool in `folder` still holds; None if there is no spool.

    Idempotent, so any step may call it; the register step does, before registering. Raises
    `RegistryError` when MLflow cannot be reached or refuses a record.
    """
    if not (folder / SPOOL_FILE).is_file():
        return None
    spool = Spool.open(folder, lock_timeout)
    try:
        pending = len(spool.sync())
        deliver(spool, client)
    except SpoolError:
        raise
    except Exception as exc:
        left = spool.pending_count
        if _is_permanent(exc):
            raise RegistryError(
                f"MLflow at {tracking_uri} refused a tracking record spooled by the train step "
                f"({_message(exc)}); {left} record(s) remain in {spool.path}: fix the cause "
                "(e.g. a param logged with another value), then retry the task") from exc
        raise RegistryError(
            f"MLflow at {tracking_uri} could not take the {left} tracking record(s) that the "
            f"train step spooled in {spool.path} ({_message(exc)}); retry the task once MLflow "
            "is reachable") from exc
    finally:
        spool.close()
    if pending:
        log.info("sent %d spooled tracking record(s) to MLflow run %s", pending,
                 spool.state.run_id)
    return spool.state


# -- the trainer's side ----------------------------------------------------------------------

class TrackingSpool:
    """Rank 0's tracking while training: record into the spool, send in the background.

    The record methods only append a line (~25 µs each) and never touch the network. `start`
    launches the sender thread; `close` gives it one bounded last attempt and releases the
    spool. `client` replaces the MLflow client (tests).
    """

    def __init__(self, spool: Spool, tracking_uri: str, client: Any = None) -> None:
        self.spool = spool
        self.tracking_uri = tracking_uri
        self._client = client
        self._stop = threading.Event()
        self._first_pass = threading.Event()
        self._thread: threading.Thread | None = None
        self._env_set: list[str] = []
        raw = os.environ.get(SEND_INTERVAL_ENV) or str(SEND_INTERVAL_S)
        try:
            self.send_interval_s = float(raw)
        except ValueError:
            self.send_interval_s = -1.0
        if not self.send_interval_s > 0:
            raise SpecError(f"{SEND_INTERVAL_ENV}={raw!r} must be a number of seconds > 0 "
                            f"(default {SEND_INTERVAL_S})")
        self.rejected: BaseException | None = None
        """The error MLflow answered with when it refused a record for good, if it did."""

    @classmethod
    def open(cls, folder: Path, tracking_uri: str, client: Any = None) -> "TrackingSpool":
        spool = Spool.open(folder)
        try:
            return cls(spool, tracking_uri, client)
        except BaseException:
            spool.close()
            raise

    # -- records --
    def start_run(self, experiment: str, artifact_root: str | None, dag_id: str,
                  dag_run_id: str, tags: Mapping[str, str], run_key: str | None = None,
                  parent_key: str | None = None) -> None:
        """`run_key`: the run's arf.dag_run key if not the DAG run's (a study's trial);
        `parent_key`: nest the run under the run with that key (see tracking.find_or_create_run)."""
        extra = {k: v for k, v in (("run_key", run_key), ("parent_key", parent_key)) if v}
        self.spool.append("run", ts=_now_ms(), experiment=experiment,
                          artifact_root=artifact_root, dag_id=dag_id, dag_run_id=dag_run_id,
                          tags={k: str(v) for k, v in tags.items()}, **extra)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.spool.append("tag", key=key, value=str(value))

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            self.spool.append("param", key=key, value=str(value))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = _now_ms()
        for key, value in metrics.items():
            self.spool.append("metric", key=key, value=float(value), step=int(step), ts=ts)

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        self.spool.append("artifact", path=artifact_file, json=dictionary)

    def log_input(self, dataset: dict[str, Any], context: str) -> None:
        """`dataset`: an MLflow dataset's `to_dict()` (name, digest, source, schema, ...)."""
        self.spool.append("input", dataset=dataset, context=context)

    def end_run(self, status: str) -> None:
        self.spool.append("end", status=status, ts=_now_ms())

    # -- delivery --
    def start(self, wait_s: float | None = None) -> SpoolState:
        """Start the sender; wait up to `wait_s` (default: one HTTP timeout) for its first try.

        Waiting once, before training, means a reachable MLflow shows the run from the start.
        """
        for name, value in HTTP_DEFAULTS.items():
            if name not in os.environ:
                os.environ[name] = value
                self._env_set.append(name)
        if self._client is None:
            # Built here, not in the sender: for a REST server that sends nothing, but for a
            # database URI (the embedded sqlite default) it sets up the SQLAlchemy store, 3-6 s
            # of Python that, past the wait below, would contend with the training loop for
            # the GIL (15-40 % slower epochs while it lasts, bench/harness_overhead.py).
            try:
                import mlflow

                self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri,
                                                   registry_uri=self.tracking_uri)
            except Exception as exc:  # the spool keeps everything; register replays it
                log.warning("cannot set up an MLflow client for %s (%s); tracking stays in %s "
                            "and the register step sends it", self.tracking_uri,
                            _short(_message(exc)), self.spool.path)
                return self.spool.state
        self._thread = threading.Thread(target=self._run, name="arf-tracking-spool",
                                        daemon=True)
        self._thread.start()
        self._first_pass.wait(min(_http_timeout_s() + 1.0, 10.0) if wait_s is None else wait_s)
        return self.spool.state

    def close(self) -> SpoolState:
        """One last bounded delivery attempt, then release the spool; returns the state."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            timeout = FINAL_DRAIN_S + _http_timeout_s() + 1.0
            thread.join(timeout)
            if thread.is_alive():
                # It still holds the spool (and its lock) and closes it when its request ends;
                # until then it needs the short HTTP timeout, so that stays set too.
                log.warning("MLflow at %s is still answering the last request after %.0f s; "
                            "leaving the rest of the tracking data in %s for the register step",
                            self.tracking_uri, timeout, self.spool.path)
                return self.spool.state
        self.spool.close()
        for name in self._env_set:
            os.environ.pop(name, None)
        self._env_set = []
        left = self.spool.pending_count
        if left:
            log.warning("%d tracking record(s) not yet in MLflow stay in %s; the register step "
                        "sends them", left, self.spool.path)
        return self.spool.state

    def _run(self) -> None:
        try:
            self._loop(self._client)
        except Exception:  # the spool keeps everything; register replays it
            log.exception("the tracking sender stopped; the spool %s keeps the tracking data "
                          "for the register step", self.spool.path)
        finally:
            self._first_pass.set()
            if self._stop.is_set():  # else training goes on appending; close() closes it
                self.spool.close()

    def _loop(self, client: Any) -> None:
        next_try, backoff, down_since = 0.0, MIN_BACKOFF_S, None
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            if self.rejected is not None or (now < next_try and not stopping):
                self.spool.sync()  # durable in batches even while MLflow is away
            else:
                try:
                    deliver(self.spool, client, now + FINAL_DRAIN_S if stopping else None)
                except Exception as exc:
                    if _is_permanent(exc):
                        self.rejected = exc
                        log.error("MLflow at %s refused a tracking record (%s); sending stops, "
                                  "the spool %s keeps it and everything after it",
                                  self.tracking_uri, _message(exc), self.spool.path)
                    else:
                        if down_since is None:
                            down_since = now
                            log.warning("MLflow at %s is unreachable (%s); training goes on, "
                                        "tracking is kept in %s and sent when it is back",
                                        self.tracking_uri, _short(_message(exc)),
                                        self.spool.path)
                        next_try, backoff = now + backoff, min(backoff * 2, MAX_BACKOFF_S)
                else:
                    if down_since is not None:
                        log.info("MLflow at %s is reachable again after %.0f s; spooled "
                                 "tracking sent", self.tracking_uri, now - down_since)
                    next_try, backoff, down_since = (now + self.send_interval_s, MIN_BACKOFF_S,
                                                     None)
                finally:
                    self._first_pass.set()
            if stopping:
                return
            self._stop.wait(SYNC_INTERVAL_S)
