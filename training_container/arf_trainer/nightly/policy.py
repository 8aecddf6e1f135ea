"""Per night: fine-tune the champion on the night's corrections or retrain on the aggregate.

A fine-tune of a champion far below the success threshold competes with a retrain on
everything collected so far (DAgger's aggregate), which is what lifts such a champion, but a
retrain costs many times a fine-tune. A retrain night runs the same DAG with the conf
`retrain_conf()` returns: `dataset_query` = `nightly.aggregate_query` and the
`nightly.retrain_hyperparameters`. It starts from the champion's weights like every run of a
fine-tune template (a cold start would need a trainer option the train step does not have
yet): a warm-started retrain on the aggregate. The rule, in order:

1. over budget: fine-tune. `compute_budget` caps the nightly work, in optimizer steps, at that
   fraction of one from-scratch retrain on the aggregate; a retrain that would push the total
   past it is not chosen, whatever else holds;
2. champion below `retrain_below` (its recorded evaluation success rate): retrain;
3. `retrain_every` nights since the last retrain: retrain (a periodic reset of accumulated
   fine-tune drift);
4. otherwise fine-tune.

Pure: no I/O, so it is tested on known cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FINETUNE, RETRAIN = "fine-tune", "retrain"
AUTO = "auto"
RECIPES = (AUTO, FINETUNE, RETRAIN)
CONF_KEY = "nightly_recipe"  # the trigger conf's choice: auto (default), fine-tune or retrain


@dataclass(frozen=True)
class Choice:
    recipe: str  # FINETUNE or RETRAIN
    reason: str


def choose(policy: dict[str, Any], *, night: int, champion_rate: float | None,
           last_retrain_night: int | None, spent_steps: int, retrain_steps: int,
           budget_reference_steps: int) -> Choice:
    """The recipe of `night` (1-based) under the template's `nightly` section (`policy`, as the
    job spec holds it). `retrain_steps` estimates tonight's retrain; `budget_reference_steps`
    is the from-scratch retrain the budget is a fraction of."""
    if min(night, retrain_steps, budget_reference_steps) < 1 or spent_steps < 0:
        raise ValueError(f"night={night}, retrain_steps={retrain_steps}, "
                         f"budget_reference_steps={budget_reference_steps} must be positive "
                         f"and spent_steps={spent_steps} not negative")
    if policy.get("mode", "adaptive") == FINETUNE:
        return Choice(FINETUNE, "nightly.mode is fine-tune")
    fraction = float(policy.get("compute_budget", 0.25))
    budget = fraction * budget_reference_steps
    if spent_steps + retrain_steps > budget:
        return Choice(FINETUNE, f"a retrain (~{retrain_steps} steps) would take the nightly "
                      f"total to {spent_steps + retrain_steps} > budget {budget:.0f} "
                      f"({fraction:.0%} of {budget_reference_steps})")
    below = policy.get("retrain_below")
    if below is not None and champion_rate is not None and champion_rate < below:
        return Choice(RETRAIN, f"champion {champion_rate:.0%} < retrain_below {below:.0%}; "
                      f"{spent_steps + retrain_steps} of {budget:.0f} budgeted steps")
    every = policy.get("retrain_every")
    since = night - (last_retrain_night or 0)
    if every is not None and since >= every:
        return Choice(RETRAIN, f"{since} night(s) since the last retrain >= retrain_every "
                      f"{every}")
    if below is not None and champion_rate is None:
        return Choice(FINETUNE, "the champion has no recorded evaluation (arf.eval.success_rate)"
                      " to compare with retrain_below")
    return Choice(FINETUNE, "champion at or above retrain_below" if below is not None
                  else "no retrain rule applies")


def retrain_rows(aggregate: int, replay_available: int, replay_ratio: float | None) -> int:
    """Rows a retrain night trains on per epoch: the aggregate query's, plus the template's
    replay as the prepare step samples it (`round(ratio x new rows)`, at most what the replay
    query holds)."""
    if not replay_ratio:
        return aggregate
    return aggregate + min(round(replay_ratio * aggregate), replay_available)


def estimated_steps(rows: int, *, epochs: int, batch_size: int, world_size: int,
                    validation_split: float) -> int:
    """Optimizer steps of a training on `rows`: the train split, sharded over the ranks, in
    batches (the last one partial), per epoch. An estimate: a split by episode is not exact."""
    train = math.ceil(rows * (1.0 - validation_split))
    return epochs * math.ceil(math.ceil(train / max(1, world_size)) / max(1, batch_size))


def retrain_conf(policy: dict[str, Any]) -> dict[str, Any]:
    """The conf of a retrain night (validated by the DAG's Params like any conf)."""
    return {"dataset_query": str(policy["aggregate_query"]).strip(),
            **(policy.get("retrain_hyperparameters") or {})}
