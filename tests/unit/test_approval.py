"""`evaluation.gate.approval: required`: the approval tasks of arf_evaluate and the evidence
they show (the end-to-end path through the REST API is tests/integration/test_approval_e2e.py)."""

from __future__ import annotations

from pathlib import Path

from arf_training.approval import APPROVAL_TASK, evidence, pending
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
    # A failed evaluation must fail the run: the watcher follows every task, one_failed.
    watcher = dag.get_task("fail_run_on_error")
    assert watcher.trigger_rule == "one_failed"
    assert watcher.upstream_task_ids == set(dag.task_ids) - {"fail_run_on_error"}
    approve = dag.get_task(APPROVAL_TASK)
    assert type(approve).__name__ == "ApprovalOperator"
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
