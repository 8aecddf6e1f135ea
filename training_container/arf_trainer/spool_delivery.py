"""Delivery of the tracking spool's records to MLflow, in order and exactly once.

`deliver` sends what MLflow has not acknowledged (params/tags/metrics grouped into log_batch
calls; the ambiguous metric points looked up first); `replay` does it for a spool left behind
(the register step). The rules: `arf_trainer.tracking_spool`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arf_trainer import tracking
from arf_trainer.errors import RegistryError, SpoolError
from arf_trainer.spool_file import LOCK_TIMEOUT_S, SPOOL_FILE, Spool, SpoolState
from arf_trainer.tracking import shown_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# The train process's MLflow calls all come from the sender thread: fail fast there and let
# the spool retry, instead of MLflow's default 120 s timeout x 7 backed-off retries (minutes).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
# log_batch limits (mlflow.utils.validation).
MAX_METRICS, MAX_PARAMS_TAGS, MAX_ENTITIES = 1000, 100, 1000
BATCH_KINDS = ("param", "tag", "metric")


def is_permanent(exc: BaseException) -> bool:
    """True when resending cannot help: MLflow refused the request (4xx) or the record."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (RegistryError, SpoolError)):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status != 429
    return False


def http_timeout_s() -> float:
    try:
        return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", ""))
    except ValueError:
        return float(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])


def message_of(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def shorten(text: str, limit: int = 400) -> str:
    """The start and the end (where urllib3 puts the cause) of a long message."""
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


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
        if is_permanent(exc):
            raise RegistryError(
                f"MLflow at {shown_uri(tracking_uri)} refused a tracking record spooled by the train step "
                f"({message_of(exc)}); {left} record(s) remain in {spool.path}: fix the cause "
                "(e.g. a param logged with another value), then retry the task") from exc
        raise RegistryError(
            f"MLflow at {shown_uri(tracking_uri)} could not take the {left} tracking record(s) that the "
            f"train step spooled in {spool.path} ({message_of(exc)}); retry the task once MLflow "
            "is reachable") from exc
    finally:
        spool.close()
    if pending:
        log.info("sent %d spooled tracking record(s) to MLflow run %s", pending,
                 spool.state.run_id)
    return spool.state
