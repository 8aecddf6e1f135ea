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

Here: `TrackingSpool`, the trainer's side (records and the sender thread). The file and its
ack state: `arf_trainer.spool_file`; sending and `replay`: `arf_trainer.spool_delivery`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arf_trainer.errors import SpecError
from arf_trainer.spool_delivery import (HTTP_DEFAULTS, deliver, http_timeout_s, is_permanent,
                                        message_of, replay, shorten)
from arf_trainer.spool_file import ACKED_FILE, SPOOL_FILE, Spool, SpoolState

__all__ = ["ACKED_FILE", "SPOOL_FILE", "Spool", "SpoolState", "TrackingSpool", "deliver",
           "replay"]

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 1.0
SEND_INTERVAL_ENV, SEND_INTERVAL_S = "ARF_TRACKING_SEND_INTERVAL_S", 5.0
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
FINAL_DRAIN_S = 10.0
"""How long the last delivery attempt at the end of training may keep sending."""


def _now_ms() -> int:
    return int(time.time() * 1000)


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
                            shorten(message_of(exc)), self.spool.path)
                return self.spool.state
        self._thread = threading.Thread(target=self._run, name="arf-tracking-spool",
                                        daemon=True)
        self._thread.start()
        self._first_pass.wait(min(http_timeout_s() + 1.0, 10.0) if wait_s is None else wait_s)
        return self.spool.state

    def close(self) -> SpoolState:
        """One last bounded delivery attempt, then release the spool; returns the state."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            timeout = FINAL_DRAIN_S + http_timeout_s() + 1.0
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
                    if is_permanent(exc):
                        self.rejected = exc
                        log.error("MLflow at %s refused a tracking record (%s); sending stops, "
                                  "the spool %s keeps it and everything after it",
                                  self.tracking_uri, message_of(exc), self.spool.path)
                    else:
                        if down_since is None:
                            down_since = now
                            log.warning("MLflow at %s is unreachable (%s); training goes on, "
                                        "tracking is kept in %s and sent when it is back",
                                        self.tracking_uri, shorten(message_of(exc)),
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
