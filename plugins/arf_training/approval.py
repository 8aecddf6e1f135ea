"""Human approval of a promotion: `evaluation.gate.approval: required`.

With approval required, the evaluate step records the gate's decision but leaves the
`champion` alias where it is (`arf.gate.approval=pending` on the candidate). `arf_evaluate`
then continues::

    evaluate -> approval_needed -> approve_promotion -> promote_approved -> record_rejection

* `approval_needed` (short circuit): the evidence of every candidate the gate proposes, as
  Markdown (several versions of one model: which one an Approve promotes); nothing proposed
  (rejected by the gate, first versions) skips the question. It runs after `evaluate` failed
  too: the versions evaluated before another one failed are in `evaluate`'s XCom
  (`arf_training.backends.evaluate_each`) and still get their question.
* `approve_promotion`: the standard provider's `ApprovalOperator` (Airflow 3 human-in-the-loop)
  shows that evidence and waits for Approve / Reject (UI, or the REST API's `hitlDetails`).
  With `evaluation.gate.approval_timeout_hours`, no answer within that time counts as Reject
  (Airflow answers with the default option and no responder: recorded as rejected by
  `timeout`), so that unanswered questions do not hold arf_evaluate's few active runs forever.
* `promote_approved` (skipped on Reject): moves `champion` (the old one keeps
  `previous-champion`), tags `arf.gate.approval=approved` and who approved. If the champion
  moved since the gate compared against it, the evidence is stale: that version is refused
  (`stale`), the others still promoted, and then the task fails naming the refused ones.
  Without an Approve answer recorded by `approve_promotion` (the question marked success by
  hand, or this task run by hand after a Reject) nothing moves and the task fails.
* `record_rejection` (runs only when `promote_approved` was skipped by a rejection): tags
  `arf.gate.approval=rejected` and who rejected; the alias stays. Without a Reject answer
  (a task skipped by hand) it records nothing and is skipped; a version that another run's
  approval made champion meanwhile is left as it is, and the task fails saying so.
* `fail_run_on_error` (runs only when a task before it failed): fails the run, naming the
  failed task(s) (the run's last failed task is where a person looks first). Without it a
  failed evaluation would end the run `success`, because its last task (`record_rejection`,
  trigger rule all_skipped) is skipped then and Airflow judges a run by its last tasks. It
  follows `evaluate`, `promote_approved` and `record_rejection` only: `approval_needed` and
  `approve_promotion` skip every task directly after them (nothing proposed; Reject).

The `*_by` tags name who gave the latest answer: an approval drops an earlier
`arf.gate.rejected_by` of the version (it was evaluated again after a rejection), a rejection
an earlier `arf.gate.approved_by`. A candidate deleted before approval is refused before any
alias moves, so `previous-champion` keeps the version a rollback goes back to.

MLflow is imported inside the tasks (run time), never at DAG parse time.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

APPROVAL_TASK = "approve_promotion"
EVALUATE_TASK = "evaluate"
APPROVE, REJECT = "Approve", "Reject"  # the ApprovalOperator's two options
NO_ANSWER = "none recorded"
TIMEOUT = "timeout"  # who answered when no one did within approval_timeout_hours


def _approval_gates(templates: dict[str, Any]) -> list[Any]:
    gates = []
    for loaded in templates.values():
        evaluation = loaded.template.evaluation
        if evaluation is not None and evaluation.gate is not None \
                and evaluation.gate.approval == "required":
            gates.append(evaluation.gate)
    return gates


def approval_required(templates: dict[str, Any]) -> bool:
    """Whether any evaluable template asks for human approval of promotions."""
    return bool(_approval_gates(templates))


def approval_timeout(templates: dict[str, Any]) -> timedelta | None:
    """How long `approve_promotion` waits for an answer (None: until one comes)."""
    hours = [g.approval_timeout_hours for g in _approval_gates(templates)
             if g.approval_timeout_hours is not None]
    # One question asks about every template's versions, so one timeout holds for all: the
    # smallest. Running out only rejects (the champion stays; evaluating the version again asks
    # anew), while a longer wait holds one of arf_evaluate's few active runs, which every
    # model's evaluation shares: the template that needs them back soonest decides.
    return timedelta(hours=min(hours)) if hours else None


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
    versions: dict[str, list[str]] = {}
    for r in rows:
        versions.setdefault(r["model_name"], []).append(f"v{r['model_version']}")
    for name, proposed in versions.items():
        if len(proposed) > 1:  # promote_approved takes them in this order
            rest = ", ".join(proposed[1:])
            lines.append(f"- `{name}`: only one can become champion: on Approve {proposed[0]} "
                         f"is promoted and {rest} {'is' if len(proposed) == 2 else 'are'} "
                         "refused as stale (evaluate again against the new champion)")
    return "\n".join(lines)


def _figure(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _results(context: Any) -> list[dict[str, Any]]:
    return pending(context["ti"].xcom_pull(task_ids=EVALUATE_TASK))


def _answer(context: Any) -> tuple[str | None, str]:
    """The answer `approve_promotion` recorded: the option chosen, and who chose it; NO_ANSWER
    when there is none (the question marked success, or skipped, by hand)."""
    answer = context["ti"].xcom_pull(task_ids=APPROVAL_TASK)
    if not isinstance(answer, dict):
        return NO_ANSWER, "unknown"
    chosen = answer.get("chosen_options") or [None]
    user = answer.get("responded_by_user")
    if answer.get("timedout") or user is None:
        # Airflow's answer when the response timeout passed: the default option (Reject), no
        # responder (the HITL timeout sweep and trigger read a missing responder so too).
        return chosen[0], TIMEOUT
    who = str(user.get("name") or user.get("id") or "unknown") if isinstance(user, dict) \
        else str(user)
    return chosen[0], who


def _client() -> Any:
    from mlflow import MlflowClient

    from arf_training.settings import ArfSettings

    uri = ArfSettings.from_env().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _absent(call: Any, *args: Any) -> Any:
    """`call(*args)`, or None when MLflow says there is no such alias or version."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args)
    except MlflowException as exc:
        # Only "does not exist" means absent; any other error (MLflow unreachable) must fail
        # the task for a retry, not be read as a moved champion and tag the version stale.
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                              "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _champion(client: Any, name: str) -> str | None:
    found = _absent(client.get_model_version_by_alias, name, "champion")
    return None if found is None else str(found.version)


def _record(client: Any, name: str, version: str, tags: dict[str, str], drop: str) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    # Who gave an earlier, opposite answer (before the version was evaluated again).
    found = _absent(client.get_model_version, name, version)
    if found is not None and drop in found.tags:
        client.delete_model_version_tag(name, version, drop)


def approval_needed(**context: Any) -> str:
    """The evidence (truthy: ask a person) or "" (nothing proposed: skip the rest)."""
    return evidence(context["ti"].xcom_pull(task_ids=EVALUATE_TASK))


def promote_approved(**context: Any) -> list[str]:
    from airflow.sdk.exceptions import AirflowFailException

    choice, who = _answer(context)
    if choice in (REJECT, NO_ANSWER):
        raise AirflowFailException(
            f"{APPROVAL_TASK} holds no {APPROVE} answer ({choice}): no one approved, so "
            f"nothing moves. To be asked again, clear {APPROVAL_TASK}")
    client, promoted, refused = _client(), [], []
    for r in _results(context):
        why = _promote(client, str(r["model_name"]), str(r["model_version"]),
                       r["gate"].get("champion_version"), who)
        if why:
            refused.append(why)
        else:
            promoted.append(f"{r['model_name']}/{r['model_version']}")
    # Raised after every candidate is handled: one refusal must not leave the others
    # approved but unpromoted (a failed task is not retried and record_rejection skips).
    if refused:
        raise AirflowFailException("; ".join(refused) + (
            f" (promoted: {', '.join(promoted)})" if promoted else ""))
    return promoted


def _promote(client: Any, name: str, version: str, compared: Any, who: str) -> str | None:
    """Make an approved version champion; why it cannot be, or None once it is."""
    if _absent(client.get_model_version, name, version) is None:
        # Checked before any alias moves: previous-champion set over the champion and then
        # a failed champion move would lose the version a rollback goes back to.
        return (f"models:/{name}/{version} no longer exists (deleted since it was "
                "evaluated): nothing moved")
    # None: the gate found no champion; the approval holds only while there still is none.
    compared = None if compared is None else str(compared)
    current = _champion(client, name)
    if current != compared and current != version:
        client.set_model_version_tag(name, version, "arf.gate.approval", "stale")
        return (f"models:/{name}/{version} was compared with champion "
                f"{'v' + compared if compared else '(none)'}, but the champion is now "
                f"{'v' + current if current else '(none)'}: the evidence no longer holds. "
                f"Evaluate v{version} again (trigger arf_evaluate with model_name and "
                "model_version)")
    if current != version:
        if current is not None:
            client.set_registered_model_alias(name, "previous-champion", current)
        client.set_registered_model_alias(name, "champion", version)
    _record(client, name, version, {"arf.gate.approval": "approved",
                                    "arf.gate.approved_by": who}, drop="arf.gate.rejected_by")
    return None


def record_rejection(**context: Any) -> list[str]:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    choice, who = _answer(context)
    if not _results(context):  # it runs (trigger rule all_skipped) when nothing was proposed
        raise AirflowSkipException("no version was proposed for approval: nothing to record")
    if choice != REJECT:
        raise AirflowSkipException(
            f"{APPROVAL_TASK} holds no {REJECT} answer ({choice}): no one "
            "rejected, so nothing is recorded (the versions stay arf.gate.approval=pending)")
    client, rejected, refused = _client(), [], []
    for r in _results(context):
        name, version = r["model_name"], str(r["model_version"])
        if _champion(client, name) == version:
            # Approved in another run that proposed it too: a rejection never moves the alias,
            # so the person must learn that this one changed nothing.
            refused.append(f"models:/{name}/{version} became champion in another run before "
                           f"this {REJECT}; nothing recorded and the alias left. To undo that "
                           "promotion, move 'champion' back to 'previous-champion'")
            continue
        _record(client, name, version, {"arf.gate.approval": "rejected",
                                        "arf.gate.rejected_by": who}, drop="arf.gate.approved_by")
        rejected.append(f"{name}/{version}")
    if refused:
        raise AirflowFailException("; ".join(refused))
    return rejected


def fail_run_on_error(**context: Any) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    ti = context["ti"]
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id) or {}
    except Exception:  # noqa: BLE001 - naming the task is a courtesy: the run fails regardless
        states = {}
    failed = sorted(task for task, state in states.items() if state == "failed")
    raise AirflowFailException(
        f"{', '.join(failed) or 'a task of this run'} failed (see its log): this arf_evaluate "
        "run is marked failed so that the failure is not hidden")


@functools.cache
def _approval_operator() -> type:
    """The provider's ApprovalOperator, which also keeps a Reject answer as its XCom.

    It skips `promote_approved` on Reject by raising (Airflow 3's SkipMixin), so its
    `execute_complete` never returns the answer and no XCom holds it: record_rejection would
    not know that anyone rejected, nor who. The answer is pushed before that. Defined when a
    DAG is built, as the provider is imported then (not by every import of this module)."""
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    class RecordingApprovalOperator(ApprovalOperator):
        def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
            if "error" not in event:
                self.validate_chosen_options(event["chosen_options"])
                context["ti"].xcom_push(key="return_value", value={
                    key: event.get(key) for key in
                    ("chosen_options", "responded_by_user", "responded_at", "timedout")})
            return super().execute_complete(context, event)

    RecordingApprovalOperator.__qualname__ = RecordingApprovalOperator.__name__
    return RecordingApprovalOperator


def add_approval(evaluate: Any, timeout: timedelta | None = None) -> None:
    """Append the approval tasks after `evaluate` (inside the DAG's context); `timeout`: no
    answer within it counts as Reject (`approval_timeout`)."""
    from airflow.sdk import task

    # all_done: a failed evaluate may still hand over the versions it evaluated. Only the
    # question is skipped when nothing is proposed; the tasks after it follow their trigger
    # rules (record_rejection runs and skips itself).
    needed = task.short_circuit(task_id="approval_needed", trigger_rule="all_done",
                                ignore_downstream_trigger_rules=False)(approval_needed)()
    note = "" if timeout is None else (
        f"\n\nNo answer within {timeout.total_seconds() / 3600:g} h counts as {REJECT}.")
    approve = _approval_operator()(
        task_id=APPROVAL_TASK, subject="Promote the evaluated version(s) to champion?",
        body="{{ ti.xcom_pull(task_ids='approval_needed') }}" + note,
        response_timeout=timeout, defaults=None if timeout is None else REJECT)
    promote = task(task_id="promote_approved")(promote_approved)()
    # Runs only when promote_approved was skipped: by a Reject, or because nothing was proposed
    # (then it skips itself).
    rejected = task(task_id="record_rejection", trigger_rule="all_skipped")(record_rejection)()
    evaluate >> needed >> approve >> promote >> rejected
    watcher = task(task_id="fail_run_on_error", trigger_rule="one_failed")(fail_run_on_error)()
    # Not after approval_needed or approve_promotion: both skip every task directly after them
    # (nothing proposed; Reject), and so would skip the watcher of a failed evaluate, queued
    # beside them. A failure of either still reaches it: promote_approved is upstream_failed.
    [evaluate, promote, rejected] >> watcher
