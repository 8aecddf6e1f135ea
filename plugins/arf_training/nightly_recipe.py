"""`nightly:` in a fine-tune template: per night, fine-tune the champion on the night's
corrections or retrain on the aggregate, within a stated compute budget.

A fine-tune of a champion far below the success threshold competes with a retrain on
everything collected so far (DAgger's aggregate), which is what lifts such a champion, but a
retrain costs many times a fine-tune. A retrain night runs the same DAG with the trigger conf
`retrain_conf()` returns: `dataset_query` = `nightly.aggregate_query` (the template must allow
query overrides) and the `nightly.retrain_hyperparameters`. It starts from the champion's
weights like every run of a fine-tune template (a cold start would need a trainer option the
train step does not have yet): a warm-started retrain on the aggregate. The policy, in order:

1. over budget: fine-tune. `compute_budget` caps the nightly work, in optimizer steps, at that
   fraction of one from-scratch retrain on the final aggregate; a retrain that would push the
   total past it is not chosen, whatever else holds;
2. champion below `retrain_below` (its recorded evaluation success rate): retrain;
3. `retrain_every` nights since the last retrain: retrain (a periodic reset of accumulated
   fine-tune drift);
4. otherwise fine-tune.

The choice and its reason are returned for the caller to record (the failure loop puts them in
its table and record). Pure: no I/O, no Airflow, so it is tested on known cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FINETUNE, RETRAIN = "fine-tune", "retrain"


class Nightly(BaseModel):
    """How the nightly run chooses between a fine-tune and a retrain on the aggregate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aggregate_query: str = Field(
        min_length=1, max_length=32_768,
        description="The retrain's query: everything collected so far (e.g. the "
                    "demonstrations UNION ALL every correction); same columns as dataset.query.")
    retrain_hyperparameters: dict[str, int | float] = Field(
        default_factory=dict,
        description="Hyperparameters of a retrain night (e.g. epochs: 10, lr: 0.001), checked "
                    "against the template's hyperparameters when the night is triggered.")
    retrain_below: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Retrain while the champion's evaluated success rate is below this.")
    retrain_every: int | None = Field(
        None, ge=1, le=365, description="Retrain at least every this many nights.")
    compute_budget: float = Field(
        0.25, gt=0.0, le=10.0,
        description="Cap on all nightly optimizer steps together, as a fraction of one "
                    "from-scratch retrain on the final aggregate (0.25: a quarter).")
    mode: Literal["adaptive", "fine-tune"] = Field(
        "adaptive", description="'fine-tune' turns the choice off (every night fine-tunes).")


@dataclass(frozen=True)
class Choice:
    recipe: str  # FINETUNE or RETRAIN
    reason: str


def choose(policy: Nightly, *, night: int, champion_rate: float | None,
           last_retrain_night: int | None, spent_steps: int, retrain_steps: int,
           budget_reference_steps: int) -> Choice:
    """The recipe of `night` (1-based). `retrain_steps` estimates tonight's retrain;
    `budget_reference_steps` is the from-scratch retrain the budget is a fraction of."""
    if min(night, retrain_steps, budget_reference_steps) < 1 or spent_steps < 0:
        raise ValueError(f"night={night}, retrain_steps={retrain_steps}, "
                         f"budget_reference_steps={budget_reference_steps} must be positive "
                         f"and spent_steps={spent_steps} not negative")
    if policy.mode == "fine-tune":
        return Choice(FINETUNE, "nightly.mode is fine-tune")
    budget = policy.compute_budget * budget_reference_steps
    if spent_steps + retrain_steps > budget:
        return Choice(FINETUNE, f"a retrain (~{retrain_steps} steps) would take the nightly "
                      f"total to {spent_steps + retrain_steps} > budget {budget:.0f} "
                      f"({policy.compute_budget:.0%} of {budget_reference_steps})")
    if policy.retrain_below is not None and champion_rate is not None \
            and champion_rate < policy.retrain_below:
        return Choice(RETRAIN, f"champion {champion_rate:.0%} < retrain_below "
                      f"{policy.retrain_below:.0%}; {spent_steps + retrain_steps} of "
                      f"{budget:.0f} budgeted steps")
    since = night - (last_retrain_night or 0)
    if policy.retrain_every is not None and since >= policy.retrain_every:
        return Choice(RETRAIN, f"{since} night(s) since the last retrain >= retrain_every "
                      f"{policy.retrain_every}")
    return Choice(FINETUNE, "champion at or above retrain_below" if policy.retrain_below
                  is not None else "no retrain rule applies")


def retrain_episodes(aggregate: int, tonight: int, replay_ratio: float | None) -> int:
    """Episodes a retrain night trains on, per epoch: the aggregate query's, plus the template's
    replay (`round(ratio x new)` rows, at most what the replay query holds: everything but
    tonight's corrections), as the prepare step samples it."""
    replayable = max(0, aggregate - tonight)
    return aggregate + (min(round((replay_ratio or 0.0) * aggregate), replayable)
                        if replay_ratio else 0)


def retrain_conf(policy: Nightly) -> dict[str, object]:
    """The trigger conf of a retrain night (validated by the DAG's Params like any conf)."""
    return {"dataset_query": policy.aggregate_query.strip(), **policy.retrain_hyperparameters}


def nightly_problems(template: object) -> list[str]:
    """Cross-section rules of `nightly` (messages for the template's validator to report)."""
    nightly = getattr(template, "nightly", None)
    problems: list[str] = []
    if nightly is None:
        return problems
    if template.model.base_model is None:  # type: ignore[attr-defined]
        problems.append("nightly is set but model.base_model is not: the nightly choice is for "
                        "fine-tune templates (base_model: models:/<name>@champion)")
    if not template.dataset.allow_query_override:  # type: ignore[attr-defined]
        problems.append("nightly: a retrain night replaces the query with "
                        "nightly.aggregate_query, which needs dataset.allow_query_override: "
                        "true")
    return problems
