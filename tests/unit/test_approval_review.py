"""Human approval of promotions under an adversarial pass: the real approval tasks
(`arf_training.approval`) against real sqlite MLflow stores. The approver's answer is what the
ApprovalOperator returns (its XCom), handed over by a small fake task instance."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from trainer_testkit import fresh_tracking_uri

from arf_trainer import gate
from arf_trainer.gate import CHAMPION, PREVIOUS_CHAMPION, GateSettings, apply, first_version
from arf_training import approval
from arf_training.approval import APPROVAL_TASK, EVALUATE_TASK

MODELS = ("policy", "other")
SETTINGS = GateSettings(alpha=0.05, margin=0.0, batch=10, max_episodes=10)


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Two models of three versions each; v1 of each is the champion."""
    from mlflow import MlflowClient

    uri = fresh_tracking_uri(tmp_path / "mlflow")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name in MODELS:
        client.create_registered_model(name)
        for _ in range(3):
            client.create_model_version(name, source=str(tmp_path / "model"))
        apply(client, name, "1", first_version(0.0))
    monkeypatch.setattr(approval, "_client", lambda: client)
    return client


def answer(choice: str | None, who: Any = None) -> dict[str, Any] | None:
    """The ApprovalOperator's XCom after a person chose `choice` (None: no answer recorded)."""
    if choice is None:
        return None
    return {"chosen_options": [choice], "params_input": {},
            "responded_at": datetime(2026, 1, 1, tzinfo=UTC),
            "responded_by_user": who or {"id": "7", "name": "alice"}}


class TI:
    def __init__(self, results: list[dict[str, Any]], reply: dict[str, Any] | None) -> None:
        self.results, self.reply = results, reply

    def xcom_pull(self, task_ids: str) -> Any:
        return {EVALUATE_TASK: self.results, APPROVAL_TASK: self.reply}[task_ids]


def propose(client: Any, name: str, version: str, champion: str = "1") -> dict[str, Any]:
    """The evaluate result of `version` whose gate beat `champion`, with approval required."""
    decision = gate.sequential(SETTINGS, lambda start, n: (
        [{"seed": s, "success": True} for s in range(start, start + n)],
        [{"seed": s, "success": False} for s in range(start, start + n)]), champion)
    return {"model_name": name, "model_version": version,
            "gate": apply(client, name, version, decision, move_alias=False)}


def champion(client: Any, name: str, alias: str = CHAMPION) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


def tags(client: Any, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


def promote(results: list[dict[str, Any]], choice: str | None = "Approve", who: Any = None):
    return approval.promote_approved(ti=TI(results, answer(choice, who)))


def test_a_stale_candidate_does_not_block_another_models_approved_promotion(client: Any):
    """One run, two models: `policy`'s champion was moved by hand while the question waited.
    That refusal must not leave `other`'s approved promotion undone (pending forever: the
    failed task is not retried and record_rejection does not run)."""
    from airflow.sdk.exceptions import AirflowFailException

    results = [propose(client, "policy", "2"), propose(client, "other", "2")]
    client.set_registered_model_alias("policy", CHAMPION, "3")
    with pytest.raises(AirflowFailException, match=r"models:/policy/2 was compared with "
                                                   r"champion v1, but the champion is now v3"):
        promote(results)
    assert (champion(client, "other"), champion(client, "other", PREVIOUS_CHAMPION)) == ("2", "1")
    assert tags(client, "other", "2")["arf.gate.approval"] == "approved"
    assert champion(client, "policy") == "3" and tags(client, "policy", "2")[
        "arf.gate.approval"] == "stale"


def test_two_versions_of_one_model_proposed_in_one_run(client: Any):
    """Both were compared with v1; only one can be champion. The evidence must say so before
    the person answers, and what it says must be what happens."""
    from airflow.sdk.exceptions import AirflowFailException

    results = [propose(client, "policy", "2"), propose(client, "policy", "3")]
    text = approval.approval_needed(ti=TI(results, None))
    assert "only one can become champion" in text and "v3 is refused" in text, text
    with pytest.raises(AirflowFailException, match="models:/policy/3 was compared with champion "
                                                   "v1, but the champion is now v2"):
        promote(results)
    assert (champion(client, "policy"), champion(client, "policy", PREVIOUS_CHAMPION)) == ("2", "1")


@pytest.mark.parametrize("failing", [
    pytest.param(("set_registered_model_alias", PREVIOUS_CHAMPION), id="previous-champion"),
    pytest.param(("set_registered_model_alias", CHAMPION), id="champion"),
    pytest.param(("set_model_version_tag", "arf.gate.approval"), id="approval-tag"),
])
def test_a_retry_after_mlflow_failed_mid_promotion(client: Any, monkeypatch: pytest.MonkeyPatch,
                                                   failing: tuple[str, str]):
    """The server applies the call but the answer is lost (the worst case for a retry): the
    retry must move each alias once and keep v1 as previous-champion."""
    from mlflow.exceptions import MlflowException

    results = [propose(client, "policy", "2")]
    method, key = failing
    real, failed = getattr(client, method), []

    def once(*args: Any) -> Any:
        done = real(*args)
        if key in args and not failed:
            failed.append(key)
            raise MlflowException("API request failed: connection reset by peer")
        return done

    monkeypatch.setattr(client, method, once)
    with pytest.raises(MlflowException, match="connection reset"):
        promote(results)
    assert promote(results) == ["policy/2"]  # the task's retry
    assert (champion(client, "policy"), champion(client, "policy", PREVIOUS_CHAMPION)) == ("2", "1")
    assert tags(client, "policy", "2")["arf.gate.approval"] == "approved"


def test_the_same_version_approved_in_two_runs_moves_the_aliases_once(client: Any):
    """arf_evaluate triggered twice for v2 while the first question waited (one question
    takes one answer: Airflow refuses a second with 409; two questions take one each)."""
    first, second = [propose(client, "policy", "2")], [propose(client, "policy", "2")]
    promote(first)
    assert promote(second, who={"id": "8", "name": "bob"}) == ["policy/2"]
    assert (champion(client, "policy"), champion(client, "policy", PREVIOUS_CHAMPION)) == ("2", "1")
    assert tags(client, "policy", "2")["arf.gate.approved_by"] == "bob"


def test_a_reject_after_the_version_became_champion_elsewhere_says_so(client: Any):
    """Two runs proposed v2; the first was approved. A Reject in the second cannot be honoured
    (a rejection never moves the alias): the person must learn that, and the champion must
    keep the record of who approved it."""
    from airflow.sdk.exceptions import AirflowFailException

    first, second = [propose(client, "policy", "2")], [propose(client, "policy", "2")]
    promote(first)
    with pytest.raises(AirflowFailException, match="models:/policy/2 became champion in "
                                                   "another run before this Reject"):
        approval.record_rejection(ti=TI(second, answer("Reject", {"id": "9", "name": "carol"})))
    final = tags(client, "policy", "2")
    assert final["arf.gate.approval"] == "approved" and final["arf.gate.approved_by"] == "alice"
    assert champion(client, "policy") == "2"


@pytest.mark.parametrize("choice", [pytest.param("Reject", id="rejected"),
                                    pytest.param(None, id="no-answer")])
def test_promotion_needs_an_approve_answer(client: Any, choice: str | None):
    """promote_approved runs after a Reject only if someone runs it by hand (a cleared task run
    with its dependencies ignored, `airflow tasks test`), and without an answer when the
    question was marked success by hand: no person approved, so nothing may move."""
    from airflow.sdk.exceptions import AirflowFailException

    results = [propose(client, "policy", "2")]
    with pytest.raises(AirflowFailException, match="no one approved"):
        promote(results, choice)
    assert champion(client, "policy") == "1"
    assert tags(client, "policy", "2")["arf.gate.approval"] == "pending"


@pytest.mark.parametrize("choice", [pytest.param("Approve", id="approved"),
                                    pytest.param(None, id="no-answer")])
def test_a_rejection_is_recorded_only_after_a_reject_answer(client: Any, choice: str | None):
    """record_rejection also runs when promote_approved was skipped by hand (or the question
    was): "rejected by unknown" would be a record of an answer nobody gave."""
    from airflow.sdk.exceptions import AirflowSkipException

    results = [propose(client, "policy", "2")]
    with pytest.raises(AirflowSkipException, match="no one rejected"):
        approval.record_rejection(ti=TI(results, answer(choice)))
    assert tags(client, "policy", "2")["arf.gate.approval"] == "pending"
    assert "arf.gate.rejected_by" not in tags(client, "policy", "2")


def test_reject_then_evaluate_again_then_approve(client: Any):
    """The version's tags say who decided last, not a rejection next to an approval."""
    results = [propose(client, "policy", "2")]
    assert approval.record_rejection(ti=TI(results, answer("Reject"))) == ["policy/2"]
    assert tags(client, "policy", "2")["arf.gate.rejected_by"] == "alice"
    results = [propose(client, "policy", "2")]  # arf_evaluate triggered again for v2
    assert tags(client, "policy", "2")["arf.gate.approval"] == "pending"
    promote(results, who={"id": "8", "name": "bob"})
    final = tags(client, "policy", "2")
    assert final["arf.gate.approval"] == "approved" and final["arf.gate.approved_by"] == "bob"
    assert "arf.gate.rejected_by" not in final, final


@pytest.mark.parametrize("who, recorded", [
    pytest.param({"id": "7", "name": "Zoë O'Brien | `x` <b>\n"}, "Zoë O'Brien | `x` <b>\n",
                 id="odd-name"),
    pytest.param({"id": "oidc|42", "name": ""}, "oidc|42", id="id-only"),
])
def test_the_approver_is_recorded_verbatim(client: Any, who: dict[str, str], recorded: str):
    promote([propose(client, "policy", "2")], who=who)
    assert tags(client, "policy", "2")["arf.gate.approved_by"] == recorded


def test_champion_removed_by_hand_before_approval_is_stale(client: Any):
    from airflow.sdk.exceptions import AirflowFailException

    results = [propose(client, "policy", "2")]
    client.delete_registered_model_alias("policy", CHAMPION)
    with pytest.raises(AirflowFailException, match=r"champion v1, but the champion is now "
                                                   r"\(none\)"):
        promote(results)
    assert tags(client, "policy", "2")["arf.gate.approval"] == "stale"


def test_a_candidate_deleted_before_approval_keeps_the_rollback_target(client: Any):
    """v2 champion, v1 previous-champion, v3 proposed and then deleted by hand. Approving it
    must fail saying so, and must not move previous-champion onto the champion (which would
    lose v1, the version a rollback goes back to)."""
    from airflow.sdk.exceptions import AirflowFailException

    promote([propose(client, "policy", "2")])
    results = [propose(client, "policy", "3", champion="2")]
    client.delete_model_version("policy", "3")
    with pytest.raises(AirflowFailException, match="models:/policy/3 no longer exists"):
        promote(results)
    assert (champion(client, "policy"), champion(client, "policy", PREVIOUS_CHAMPION)) == ("2", "1")


def test_gate_tags_written_by_a_person_do_not_steer_the_approval(client: Any):
    """The approval tasks act on the evaluate step's result and the live aliases only: tags
    edited by hand (garbled, or claiming another decision) neither block nor redirect them."""
    results = [propose(client, "policy", "2")]
    for key, value in {"arf.gate.champion_version": "v3?", "arf.gate.decision": "rejected",
                       "arf.gate.approval": "approved", "arf.gate.evidence": "{not json"}.items():
        client.set_model_version_tag("policy", "2", key, value)
    client.delete_model_version_tag("policy", "2", "arf.gate.reason")
    assert promote(results) == ["policy/2"]
    assert (champion(client, "policy"), champion(client, "policy", PREVIOUS_CHAMPION)) == ("2", "1")


@pytest.mark.integration
def test_a_failed_evaluation_fails_the_run_and_names_the_task(embedded, monkeypatch, tmp_path,
                                                               capfd):
    """dag.test() runs arf_evaluate (approval required) through Airflow's task runner with
    nothing to evaluate: the run must end failed, and the watcher, the run's last failed task
    and so the first place a person looks, must name the task that failed."""
    from arf_training.factory import build_evaluate_dag
    from arf_training.templates import load_template

    text = (Path(__file__).resolve().parents[2] / "config_templates" / "reach_bc.yaml")\
        .read_text().replace("  promotion_margin: 0.02\n",
                             "  promotion_margin: 0.02\n  gate: {approval: required}\n")
    monkeypatch.setenv("ARF_TEMPLATES_DIR", str(tmp_path))  # dag.test() reads the DAG folder
    (tmp_path / "reach_bc.yaml").write_text(text)
    run = build_evaluate_dag([load_template(tmp_path / "reach_bc.yaml")], "local").test()
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert str(run.state) == "failed"
    assert states["evaluate"] == states["fail_run_on_error"] == "failed", states
    # approval_needed runs after a failed evaluate (all_done) and finds nothing to ask about.
    assert (states["approval_needed"], states[APPROVAL_TASK], states["promote_approved"],
            states["record_rejection"]) == ("success", "skipped", "skipped", "skipped"), states
    assert "AirflowFailException: evaluate failed (see its log)" in capfd.readouterr().out


class PushTI:
    """What the approval operator's `execute_complete` uses of its task instance."""

    map_index = -1

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def _asked(timeout_hours: float | None = None) -> Any:
    """approve_promotion of arf_evaluate built from reach_bc with approval required."""
    from arf_training.factory import build_evaluate_dag
    from arf_training.templates import LoadedTemplate, parse_template

    extra = f", approval_timeout_hours: {timeout_hours}" if timeout_hours else ""
    text = (Path(__file__).resolve().parents[2] / "config_templates" / "reach_bc.yaml")\
        .read_text().replace("  promotion_margin: 0.02\n",
                             "  promotion_margin: 0.02\n  gate: {approval: required"
                             + extra + "}\n")
    path = Path("/tmp/approval-review.yaml")
    loaded = LoadedTemplate(path=path, template=parse_template(text, str(path)), sha256="0" * 64)
    return build_evaluate_dag([loaded], "local").get_task(APPROVAL_TASK)


@pytest.mark.parametrize("event, who", [
    pytest.param({"responded_by_user": {"id": "9", "name": "carol"}, "timedout": False},
                 "carol", id="a-person"),
    # The scheduler's timeout sweep (and the triggerer's HITLTrigger before Airflow 3.3)
    # answers with the defaults and no responder.
    pytest.param({"responded_by_user": None, "timedout": True}, approval.TIMEOUT,
                 id="timed-out"),
])
def test_a_reject_answer_is_kept_for_record_rejection(client: Any, event: dict[str, Any],
                                                      who: str):
    """The provider's ApprovalOperator skips promote_approved on Reject by raising, so its
    answer never becomes its return value: the operator pushes it first, and record_rejection
    records who rejected (`timeout` when no one answered in time)."""
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    task, ti = _asked(timeout_hours=2), PushTI()
    assert task.defaults == ["Reject"]
    with pytest.raises(DownstreamTasksSkipped) as skipped:
        task.execute_complete({"ti": ti, "task": task}, {
            "chosen_options": ["Reject"], "params_input": {},
            "responded_at": datetime(2026, 1, 1, tzinfo=UTC), **event})
    assert skipped.value.tasks == ["promote_approved"]  # not fail_run_on_error
    results = [propose(client, "policy", "2")]
    assert approval.record_rejection(ti=TI(results, ti.pushed["return_value"])) == ["policy/2"]
    recorded = tags(client, "policy", "2")
    assert (recorded["arf.gate.approval"], recorded["arf.gate.rejected_by"]) == ("rejected", who)
    assert champion(client, "policy") == "1"


def test_an_answer_outside_the_options_is_refused_before_it_is_kept():
    task, ti = _asked(), PushTI()
    with pytest.raises(ValueError, match="not in"):
        task.execute_complete({"ti": ti, "task": task}, {
            "chosen_options": ["Maybe"], "params_input": {}, "responded_by_user": None,
            "responded_at": datetime(2026, 1, 1, tzinfo=UTC)})
    assert ti.pushed == {}


def test_nothing_proposed_records_no_rejection(client: Any):
    """record_rejection (trigger rule all_skipped) runs when approval_needed skipped the
    question, e.g. after a failed evaluate that proposed nothing: it must skip, not fail."""
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match="no version was proposed"):
        approval.record_rejection(ti=TI([], None))
