"""Human approval of a promotion: `evaluation.gate.approval: required`.

With approval required, the evaluate step records the gate's decision but leaves the
`champion` alias where it is (`arf.gate.approval=pending` on the candidate). `arf_evaluate`
then continues::

    evaluate -> approval_needed -> approve_promotion -> promote_approved -> record_rejection

* `approval_needed` (short circuit): the evidence of every candidate the gate proposes, as
  Markdown; nothing proposed (rejected by the gate, first versions) skips the rest of the run.
* `approve_promotion`: the standard provider's `ApprovalOperator` (Airflow 3 human-in-the-loop)
  shows that evidence and waits for Approve / Reject (UI, or the REST API's `hitlDetails`).
* `promote_approved` (skipped on Reject): moves `champion` (the old one keeps
  `previous-champion`), tags `arf.gate.approval=approved` and who approved. If the champion
  moved since the gate compared against it, the evidence is stale: the task fails and says so.
* `record_rejection` (runs only when `promote_approved` was skipped by a rejection): tags
  `arf.gate.approval=rejected` and who rejected; the alias stays.
* `fail_run_on_error` (runs only when a task before it failed): fails the run. Without it a
  failed evaluation would end the run `success`, because its last task (`record_rejection`,
  trigger rule all_skipped) is skipped then and Airflow judges a run by its last tasks.

MLflow is imported inside the tasks (run time), never at DAG parse time.
"""

from __future__ import annotations

from typing import Any

APPROVAL_TASK = "approve_promotion"
EVALUATE_TASK = "evaluate"


def approval_required(templates: dict[str, Any]) -> bool:
    """Whether any evaluable template asks for human approval of promotions."""
    for loaded in templates.values():
        evaluation = loaded.template.evaluation
        if evaluation is not None and evaluation.gate is not None \
                and evaluation.gate.approval == "required":
            return True
    return False


def pending(results: Any) -> list[dict[str, Any]]:
    """The evaluate results whose promotion waits for approval."""
    return [r for r in (results or []) if isinstance(r, dict)
            and (r.get("gate") or {}).get("awaiting_approval")]


def evidence(results: Any) -> str:
    """Markdown shown to the approver: one row per proposed promotion."""
    rows = pending(results)
    if not rows:
        return ""
    lines = ["The promotion gate proposes these versions as `champion`:", "",
             "| model | candidate | champion | candidate / champion on paired seeds | seeds | "
             "p-value | alpha |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["gate"]
        # A value the gate did not measure (no champion to compare with) shows as "-".
        champion = f"v{g['champion_version']}" if g.get("champion_version") else "none"
        lines.append(
            f"| `{r['model_name']}` | v{r['model_version']} | {champion} | "
            f"{_figure(g.get('candidate_rate'), '.1%')} / {_figure(g.get('champion_rate'), '.1%')}"
            f" | {g.get('episodes')} | {_figure(g.get('p_value'), '.3g')} | "
            f"{g.get('alpha') if g.get('alpha') is not None else '-'} |")
    lines += ["", *[f"- v{r['model_version']}: {r['gate']['reason']}" for r in rows]]
    return "\n".join(lines)


def _figure(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _results(context: Any) -> list[dict[str, Any]]:
    return pending(context["ti"].xcom_pull(task_ids=EVALUATE_TASK))


def _responder(context: Any) -> str:
    answer = context["ti"].xcom_pull(task_ids=APPROVAL_TASK) or {}
    user = answer.get("responded_by_user") or {}
    return str(user.get("name") or user.get("id") or "unknown") if isinstance(user, dict) \
        else str(user)


def _client() -> Any:
    from mlflow import MlflowClient

    from arf_training.settings import ArfSettings

    uri = ArfSettings.from_env().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(client: Any, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException as exc:
        # Only "no such alias" means no champion; any other error (MLflow unreachable) must
        # fail the task for a retry, not be read as a moved champion and tag the version stale.
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                              "INVALID_PARAMETER_VALUE"):
            return None
        raise


def approval_needed(**context: Any) -> str:
    """The evidence (truthy: ask a person) or "" (nothing proposed: skip the rest)."""
    return evidence(context["ti"].xcom_pull(task_ids=EVALUATE_TASK))


def promote_approved(**context: Any) -> list[str]:
    from airflow.sdk.exceptions import AirflowFailException

    client, who, promoted = _client(), _responder(context), []
    for r in _results(context):
        name, version = r["model_name"], str(r["model_version"])
        # None: the gate found no champion; the approval holds only while there still is none.
        compared = r["gate"].get("champion_version")
        compared = None if compared is None else str(compared)
        current = _champion(client, name)
        if current != compared and current != version:
            client.set_model_version_tag(name, version, "arf.gate.approval", "stale")
            raise AirflowFailException(
                f"models:/{name}/{version} was compared with champion "
                f"{'v' + compared if compared else '(none)'}, but the champion is now "
                f"{'v' + current if current else '(none)'}: the evidence no longer holds. "
                f"Evaluate v{version} "
                "again (trigger arf_evaluate with model_name and model_version)")
        if current != version:
            if current is not None:
                client.set_registered_model_alias(name, "previous-champion", current)
            client.set_registered_model_alias(name, "champion", version)
        client.set_model_version_tag(name, version, "arf.gate.approval", "approved")
        client.set_model_version_tag(name, version, "arf.gate.approved_by", who)
        promoted.append(f"{name}/{version}")
    return promoted


def record_rejection(**context: Any) -> list[str]:
    client, who, rejected = _client(), _responder(context), []
    for r in _results(context):
        name, version = r["model_name"], str(r["model_version"])
        client.set_model_version_tag(name, version, "arf.gate.approval", "rejected")
        client.set_model_version_tag(name, version, "arf.gate.rejected_by", who)
        rejected.append(f"{name}/{version}")
    return rejected


def fail_run_on_error() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException("a task of this arf_evaluate run failed (see the failed task's "
                               "log); the run is marked failed so the failure is not hidden")


def add_approval(evaluate: Any) -> None:
    """Append the approval tasks after `evaluate` (inside the DAG's context)."""
    from airflow.providers.standard.operators.hitl import ApprovalOperator
    from airflow.sdk import task

    needed = task.short_circuit(task_id="approval_needed")(approval_needed)()
    approve = ApprovalOperator(
        task_id=APPROVAL_TASK, subject="Promote the evaluated version(s) to champion?",
        body="{{ ti.xcom_pull(task_ids='approval_needed') }}")
    promote = task(task_id="promote_approved")(promote_approved)()
    # Runs only when promote_approved was skipped: by a Reject (the short circuit skips this
    # task too when nothing was proposed).
    rejected = task(task_id="record_rejection", trigger_rule="all_skipped")(record_rejection)()
    evaluate >> needed >> approve >> promote >> rejected
    watcher = task(task_id="fail_run_on_error", trigger_rule="one_failed")(fail_run_on_error)()
    [evaluate, needed, approve, promote, rejected] >> watcher
