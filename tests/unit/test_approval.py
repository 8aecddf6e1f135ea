"""`evaluation.gate.approval: required`: the approval tasks of arf_evaluate and the evidence
they show (the end-to-end path through the REST API is tests/integration/test_approval_e2e.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from airflow.providers.standard.operators.hitl import ApprovalOperator

from arf_training.approval import APPROVAL_TASK, approval_timeout, evidence, pending
from arf_training.factory import build_evaluate_dag
from arf_training.templates import parse_template

REPO = Path(__file__).resolve().parents[2]
REACH = (REPO / "config_templates" / "reach_bc.yaml").read_text()
MARGIN = "  promotion_margin: 0.02\n"


def loaded(text: str):
    from arf_training.templates import LoadedTemplate

    path = Path("/tmp/approval-test.yaml")
    return LoadedTemplate(path=path, template=parse_template(text, str(path)),
                          sha256="0" * 64)


def test_approval_tasks_only_where_required():
    assert MARGIN in REACH
    plain = build_evaluate_dag([loaded(REACH)], "local")
    assert set(plain.task_ids) == {"evaluate"}
    required = REACH.replace(MARGIN, MARGIN + "  gate: {approval: required}\n")
    dag = build_evaluate_dag([loaded(required)], "local")
    assert set(dag.task_ids) == {"evaluate", "approval_needed", APPROVAL_TASK,
                                 "promote_approved", "record_rejection", "fail_run_on_error"}
    # A failed evaluation must fail the run: the watcher follows the chain's ends, one_failed
    # (a failure in between makes promote_approved upstream_failed). Never directly after the
    # two tasks that skip whatever follows them directly (nothing proposed; Reject): they would
    # skip the watcher of a failed evaluate too.
    watcher = dag.get_task("fail_run_on_error")
    assert watcher.trigger_rule == "one_failed"
    assert watcher.upstream_task_ids == {"evaluate", "promote_approved", "record_rejection"}
    for skipping in ("approval_needed", APPROVAL_TASK):
        assert "fail_run_on_error" not in dag.get_task(skipping).downstream_task_ids
    # The question is asked after a failed evaluate too (the versions evaluated before it).
    needed = dag.get_task("approval_needed")
    assert (needed.trigger_rule, needed.ignore_downstream_trigger_rules) == ("all_done", False)
    approve = dag.get_task(APPROVAL_TASK)
    assert isinstance(approve, ApprovalOperator)
    assert (approve.response_timeout, approve.defaults) == (None, None)  # waits for an answer
    assert approve.upstream_task_ids == {"approval_needed"}
    assert dag.get_task("promote_approved").upstream_task_ids == {APPROVAL_TASK}
    rejection = dag.get_task("record_rejection")
    assert rejection.upstream_task_ids == {"promote_approved"}
    assert rejection.trigger_rule == "all_skipped"


def test_evidence_lists_only_proposed_promotions():
    proposed = {"model_name": "reach_bc_policy", "model_version": "5",
                "gate": {"awaiting_approval": True, "champion_version": "3",
                         "candidate_rate": 0.92, "champion_rate": 0.7, "episodes": 50,
                         "p_value": 0.00012, "alpha": 0.05, "reason": "promoted: ..."}}
    rejected = {"model_name": "reach_bc_policy", "model_version": "6",
                "gate": {"awaiting_approval": False, "promoted": False}}
    assert pending([proposed, rejected, {"gate": None}]) == [proposed]
    text = evidence([proposed, rejected])
    assert "| `reach_bc_policy` | v5 | v3 | 92.0% / 70.0% | 50 | 0.00012 | 0.05 |" in text
    assert "v6" not in text
    assert evidence([rejected]) == "" and evidence(None) == ""


def _required(hours: str = "", model: str = "reach_bc_policy") -> str:
    gate = "{approval: required" + (f", approval_timeout_hours: {hours}" if hours else "") + "}"
    return REACH.replace(MARGIN, MARGIN + f"  gate: {gate}\n").replace(
        "name: reach_bc_policy", f"name: {model}")


def test_an_approval_timeout_rejects_by_default():
    """No answer within evaluation.gate.approval_timeout_hours: Airflow answers with the
    defaults, Reject, and the person is told so in the question."""
    dag = build_evaluate_dag([loaded(_required("36"))], "local")
    approve = dag.get_task(APPROVAL_TASK)
    assert (approve.response_timeout, approve.defaults) == (timedelta(hours=36), ["Reject"])
    assert "No answer within 36 h counts as Reject." in approve.body


@pytest.mark.parametrize("hours, expected", [
    pytest.param(("", ""), None, id="none-set"),
    pytest.param(("48", ""), timedelta(hours=48), id="one-set"),
    pytest.param(("48", "1.5"), timedelta(hours=1.5), id="the-smallest"),
])
def test_one_question_takes_the_smallest_timeout_of_its_templates(hours, expected):
    names = ("policy_a", "policy_b")
    templates = {name: loaded(_required(h, name)) for name, h in zip(names, hours)}
    assert approval_timeout(templates) == expected
