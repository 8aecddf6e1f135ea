"""`evaluation.gate`: how sure the promotion gate must be, and whether a person approves.

Its own module so that `templates.py` only hooks it in. The statistics live on the container
side (`arf_trainer.gate`); this is the schema that configures them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


# Longest a question may wait: a month. Bounded so that a typo (hours meant as seconds) is
# caught, and the value stays a valid Airflow timedelta.
MAX_APPROVAL_TIMEOUT_HOURS = 24 * 31


class Gate(BaseModel):
    """The promotion gate's error rate, episode budget and approval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        0.05, gt=0.0, lt=0.5,
        description="False-promotion rate: the chance of promoting a candidate that is not "
                    "better than the champion is at most this (sequential McNemar exact test "
                    "with alpha spending over the looks).")
    max_episodes: int | None = Field(
        None, ge=1, le=100_000,
        description="Most paired seeds the gate may use; it evaluates in batches of "
                    "evaluation.episodes and stops as soon as the decision is clear. "
                    "Default: 4 x evaluation.episodes.")
    approval: Literal["none", "required"] = Field(
        "none",
        description="'required': a promotion waits for a person to approve it in Airflow "
                    "(human-in-the-loop task of arf_evaluate showing the evidence) before the "
                    "'champion' alias moves; a rejection is recorded on the version.")
    approval_timeout_hours: float | None = Field(
        None, gt=0, le=MAX_APPROVAL_TIMEOUT_HOURS, strict=True,
        description="With approval required: hours the question waits for an answer; none "
                    "within them counts as Reject (recorded as rejected by 'timeout'; the "
                    "alias stays, evaluating the version again asks anew). Unset: it waits "
                    "until someone answers, holding one of arf_evaluate's 4 active runs, which "
                    "every model's evaluation shares. One arf_evaluate DAG asks about every "
                    "template's versions: the smallest value among the templates applies.")


MAX_EVAL_SEED = 2**63 - 1  # arf_trainer.evaluator_checks.MAX_SEED (int64 seeds)


def check_gate(evaluation: Any) -> None:
    """Cross-field rules of `evaluation` involving the gate (raise ValueError: pydantic names
    the section)."""
    gate = evaluation.gate
    budget = max(evaluation.episodes, (gate.max_episodes or 0) if gate is not None else 0)
    if evaluation.seed + budget - 1 > MAX_EVAL_SEED:
        # The failures table stores seeds as int64: evaluate would refuse it at run time.
        raise ValueError(f"evaluation.seed={evaluation.seed} with up to {budget} episodes reaches "
                         f"seed {evaluation.seed + budget - 1}, past {MAX_EVAL_SEED}; pick a "
                         "smaller first seed, e.g. 100000")
    if gate is None:
        return
    if gate.approval_timeout_hours is not None and gate.approval != "required":
        raise ValueError(f"evaluation.gate.approval_timeout_hours={gate.approval_timeout_hours:g} "
                         f"is set but evaluation.gate.approval is {gate.approval!r}, so no one is "
                         "asked; set approval: required or remove approval_timeout_hours")
    if evaluation.promotion_margin is None:
        raise ValueError("evaluation.gate is set but evaluation.promotion_margin is not, so no "
                         "gate runs; set promotion_margin (e.g. 0.0 or 0.02) or remove gate")
    if gate.max_episodes is not None and gate.max_episodes < evaluation.episodes:
        raise ValueError(f"evaluation.gate.max_episodes={gate.max_episodes} is below "
                         f"evaluation.episodes={evaluation.episodes}, the gate's first batch; "
                         f"raise it (e.g. to {4 * evaluation.episodes}) or remove it")
