"""Task-run-time helpers shared by every backend's operators (never called at parse time)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

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
    )


def trigger_conf(context: Any) -> dict[str, Any]:
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
