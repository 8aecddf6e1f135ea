"""`evaluation.gate` in a template: defaults, the approval choice, its timeout and their error
messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from arf_training.errors import TemplateError
from arf_training.templates import parse_template

REPO = Path(__file__).resolve().parents[2]
FINETUNE = (REPO / "config_templates" / "reach_bc_failure_finetune.yaml").read_text()
MARGIN = "  promotion_margin: 0.02\n"


def with_gate(gate: str, text: str = FINETUNE) -> str:
    assert MARGIN in text
    return text.replace(MARGIN, MARGIN + gate, 1)


def test_gate_section_parses_with_defaults():
    assert parse_template(FINETUNE).evaluation.gate is None  # defaults apply in the evaluator
    gate = parse_template(with_gate("  gate: {approval: required}\n")).evaluation.gate
    assert (gate.alpha, gate.max_episodes, gate.approval) == (0.05, None, "required")
    assert gate.approval_timeout_hours is None  # the question waits until someone answers
    timed = with_gate("  gate: {approval: required, approval_timeout_hours: 24}\n")
    assert parse_template(timed).evaluation.gate.approval_timeout_hours == 24.0


@pytest.mark.parametrize("text, fragments", [
    pytest.param(with_gate("  gate: {max_episodes: 20}\n"),
                 ["evaluation", "max_episodes=20 is below evaluation.episodes=50", "200"],
                 id="budget-below-one-batch"),
    pytest.param(with_gate("  gate: {alpha: 0.7}\n"), ["evaluation.gate.alpha", "0.5"],
                 id="alpha-too-large"),
    pytest.param(with_gate("  gate: {approval: maybe}\n"),
                 ["evaluation.gate.approval", "'none' or 'required'", "maybe"],
                 id="approval-not-a-choice"),
    pytest.param(with_gate("  gate: {approval: required, approval_timeout_hours: 0}\n"),
                 ["evaluation.gate.approval_timeout_hours", "greater than 0"],
                 id="timeout-zero"),
    pytest.param(with_gate("  gate: {approval: required, approval_timeout_hours: 745}\n"),
                 ["evaluation.gate.approval_timeout_hours", "744", "745"], id="timeout-too-long"),
    pytest.param(with_gate("  gate: {approval: required, approval_timeout_hours: '24'}\n"),
                 ["evaluation.gate.approval_timeout_hours", "valid number", "'24'"],
                 id="timeout-a-string"),
    pytest.param(with_gate("  gate: {approval_timeout_hours: 24}\n"),
                 ["evaluation.gate.approval_timeout_hours=24 is set",
                  "evaluation.gate.approval is 'none'", "set approval: required"],
                 id="timeout-without-approval"),
    pytest.param(with_gate("  gate: {alpha: 0.05}\n").replace(MARGIN, ""),
                 ["promotion_margin is not", "no gate runs"], id="gate-without-margin"),
    # The gate's budget counts: 2**63 - 100 + 200 episodes pass int64, as seeds of the failures
    # table (the evaluate step refused it only at run time).
    pytest.param(with_gate("  gate: {max_episodes: 200}\n").replace(
        "  seed: 100000", "  seed: 9223372036854775708"),
        ["evaluation.seed=9223372036854775708 with up to 200 episodes", "past 9223372036854775807",
         "e.g. 100000"], id="seeds-past-int64"),
])
def test_bad_gate_settings_are_named(text, fragments):
    with pytest.raises(TemplateError) as info:
        parse_template(text, "ft.yaml")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
