"""Task-run-time helpers shared by every backend's operators (never called at parse time)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import IO, Any

from arf_training.errors import ConfError, StepFailed, StepSkipped
from arf_training.stepspec import RunIdentity
from arf_training.templates import LoadedTemplate


@contextlib.contextmanager
def fail_fast_on_bad_input() -> Iterator[None]:
    """Bad input fails the task without retries (a retry would fail the same way); a step
    that found nothing to do (`StepSkipped`, exit code 99) skips the task."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    try:
        yield
    except StepSkipped as exc:
        raise AirflowSkipException(str(exc)) from exc
    except ConfError as exc:
        raise AirflowFailException(str(exc)) from exc
    except StepFailed as exc:
        if not exc.retryable:
            raise AirflowFailException(str(exc)) from exc
        raise


class _TeeLog:
    """The operator's logger, each line also written as a JSON record to the task's log file
    (the format a supervisor writes and `FileTaskHandler` parses: timestamp, level, event)."""

    def __init__(self, log: Any, file: IO[str], logger_name: str):
        self._log, self._file, self._name = log, file, logger_name

    def log(self, level: int, msg: str, *args: Any) -> None:
        self._log.log(level, msg, *args)
        record = {"timestamp": datetime.now(timezone.utc).isoformat(),
                  "level": logging.getLevelName(level).lower(),
                  "event": msg % args if args else msg, "logger": self._name}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # the UI may read the file while the task runs

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args)


def _runs_without_supervisor() -> bool:
    """True inside `airflow dags test` (and so `arf demo`): Airflow runs the task in its own
    process through `run_task_in_process`, whose in-process comms write no log file."""
    supervisor = sys.modules.get("airflow.sdk.execution_time.supervisor")
    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    if supervisor is None or runner is None:
        return False
    comms = getattr(runner, "SUPERVISOR_COMMS", None)
    return isinstance(comms, supervisor.InProcessSupervisorComms)


@contextlib.contextmanager
def task_log(context: Any, log: Any) -> Iterator[Any]:
    """The logger a task's operator should write to: `log` itself, or under `airflow dags test`
    a tee that also writes the task's log file where the UI reads it.

    Under a scheduler the task's supervisor writes `[logging] base_log_folder` /
    `log_filename_template` (dag_id=.../run_id=.../task_id=.../attempt=N.log). `dags test` has
    no supervisor: the log went to the console only, and the UI, finding no file, asked the
    worker's log server and showed "Log file not found on worker". This writes that file with
    the operator's lines (the step's output) and, if the task fails, the reason.
    """
    if not _runs_without_supervisor():
        yield log
        return
    from airflow.sdk.exceptions import AirflowSkipException
    from airflow.sdk.log import init_log_file
    from airflow.utils.helpers import log_filename_template_renderer

    ti = context["ti"]
    path = init_log_file(log_filename_template_renderer()(ti=ti, try_number=ti.try_number))
    with open(path, "a") as file:
        tee = _TeeLog(log, file, f"airflow.task.operators.{type(ti.task).__module__}."
                                 f"{type(ti.task).__name__}")
        try:
            yield tee
        except AirflowSkipException as exc:
            tee.info("Task skipped: %s", exc)
            raise
        except BaseException as exc:
            tee.error("Task failed with exception: %s: %s", type(exc).__name__, exc)
            raise


# The first task of a template with a `nightly:` section (factory.py).
CHOOSE_TASK = "choose_recipe"


def run_identity(context: Any) -> RunIdentity:
    ti = context["ti"]
    dag_run = context["dag_run"]

    def iso(name: str) -> str | None:
        # A manual run may have no logical date and no data interval (None).
        value = getattr(dag_run, name, None)
        return value.isoformat() if value is not None else None

    return RunIdentity(
        dag_id=ti.dag_id,
        run_id=dag_run.run_id,
        task_id=ti.task_id,
        try_number=int(getattr(ti, "try_number", 1) or 1),
        logical_date=iso("logical_date"),
        data_interval_start=iso("data_interval_start"),
        data_interval_end=iso("data_interval_end"),
        run_after=iso("run_after"),
    )


def trigger_conf(context: Any) -> dict[str, Any]:
    """The run's conf as the step should see it: the trigger conf, or, after the
    `choose_recipe` task of a template with a `nightly:` section, the conf that task returned
    (the trigger conf plus the night's recipe: arf_trainer.nightly.step)."""
    task, dag = context.get("task"), context.get("dag")
    if task is not None and task.task_id != CHOOSE_TASK \
            and CHOOSE_TASK in (getattr(dag, "task_dict", None) or {}):
        chosen = context["ti"].xcom_pull(task_ids=CHOOSE_TASK)
        if not isinstance(chosen, dict) or not isinstance(chosen.get("conf"), dict):
            from arf_training.errors import ArfError

            raise ArfError(f"task {CHOOSE_TASK} returned {chosen!r}, not the night's conf; "
                           f"clear {CHOOSE_TASK} to run it again")
        return dict(chosen["conf"])
    return dict(getattr(context["dag_run"], "conf", None) or {})


def emit_model_event(context: Any, loaded: LoadedTemplate, result: dict[str, Any]) -> None:
    """Attach model name, version and run ids to this task's `arf-model://<name>` Asset event."""
    from airflow.sdk import Asset

    asset = Asset(loaded.template.model_asset_uri)
    context["outlet_events"][asset].extra = {
        "model_name": result["model_name"],
        "model_version": str(result["model_version"]),
        "model_uri": result.get("model_uri"),
        "training_run_id": result.get("training_run_id"),
        "template": loaded.name,
        "dag_id": context["ti"].dag_id,
        "dag_run_id": context["dag_run"].run_id,
    }


def models_to_evaluate(context: Any, templates: dict[str, LoadedTemplate]) -> list[dict[str, str]]:
    """(model name, version) pairs from the triggering Asset events, else from the run's params.

    A run made by the scheduler carries the events; a manual run (UI, `airflow dags test`)
    names the version in its conf (`model_name`, `model_version`).
    """
    found: dict[tuple[str, str], dict[str, str]] = {}
    events = context.get("triggering_asset_events") or {}
    for _asset, asset_events in events.items():
        for event in asset_events:
            extra = dict(getattr(event, "extra", None) or {})
            if "model_name" in extra and "model_version" in extra:
                key = (extra["model_name"], str(extra["model_version"]))
                found[key] = {"model_name": key[0], "model_version": key[1],
                              "source": f"asset event {getattr(event, 'id', '?')}"}
    params = context.get("params") or {}
    if not found and params.get("model_name"):
        if not params.get("model_version"):
            raise ConfError("param 'model_version' is required with 'model_name' "
                           "(e.g. --conf '{\"model_name\": \"reach_bc_policy\", \"model_version\": \"1\"}')")
        found[(params["model_name"], str(params["model_version"]))] = {
            "model_name": params["model_name"], "model_version": str(params["model_version"]),
            "source": "params"}
    if not found:
        raise ConfError("nothing to evaluate: no triggering arf-model:// Asset event and no "
                       "'model_name'/'model_version' in the run's conf")
    for item in found.values():
        if item["model_name"] not in templates:
            raise ConfError(f"model {item['model_name']!r} has no template with an 'evaluation' "
                           f"section; evaluable models: {sorted(templates)}")
    return list(found.values())
