"""Per night: fine-tune the champion on the night's corrections or retrain on the aggregate.

A fine-tune of a champion far below the success threshold competes with a retrain on
everything collected so far (DAgger's aggregate), which is what lifts such a champion, but a
retrain costs many times a fine-tune. A retrain night runs the same DAG with the conf
`retrain_conf()` returns: `dataset_query` = `nightly.aggregate_query` and the
`nightly.retrain_hyperparameters`. It starts from the champion's weights like every run of a
fine-tune template (a cold start would need a trainer option the train step does not have
yet): a warm-started retrain on the aggregate. The rule, in order:

1. over budget: fine-tune. `compute_budget` caps the nightly work at that fraction of one
   from-scratch retrain on the aggregate; a retrain that would push the total past it is not
   chosen, whatever else holds. Work is counted in samples trained (epochs x train rows):
   optimizer steps are not comparable across batch sizes and process counts (a 2-process run
   of batch 256 takes half the steps of a 1-process one for the same work);
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
CONF_KEY = "nightly_recipe"  # the trigger conf's choice; the Airflow side: params.NIGHTLY_PARAM


@dataclass(frozen=True)
class Choice:
    recipe: str  # FINETUNE or RETRAIN
    reason: str


def choose(policy: dict[str, Any], *, night: int, champion_rate: float | None,
           last_retrain_night: int | None, spent: int, retrain: int, reference: int) -> Choice:
    """The recipe of `night` (1-based) under the template's `nightly` section (`policy`, as the
    job spec holds it). In samples trained: `spent` by the nights before, `retrain` tonight's
    retrain (an estimate), `reference` the from-scratch retrain the budget is a fraction of."""
    if min(night, retrain, reference) < 1 or spent < 0:
        raise ValueError(f"night={night}, retrain={retrain}, reference={reference} must be "
                         f"positive and spent={spent} not negative")
    if policy.get("mode", "adaptive") == FINETUNE:
        return Choice(FINETUNE, "nightly.mode is fine-tune")
    fraction = float(policy.get("compute_budget", 0.25))
    budget = fraction * reference
    if spent + retrain > budget:
        return Choice(FINETUNE, f"a retrain (~{retrain:,} samples) would take the nightly "
                      f"total to {spent + retrain:,} > budget {budget:,.0f} ({fraction:.0%} of "
                      f"a from-scratch retrain's {reference:,})")
    below = policy.get("retrain_below")
    if below is not None and champion_rate is not None and champion_rate < below:
        return Choice(RETRAIN, f"champion {champion_rate:.0%} < retrain_below {below:.0%}; "
                      f"{spent + retrain:,} of {budget:,.0f} budgeted samples")
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


def estimated_samples(rows: int, *, epochs: int, validation_split: float) -> int:
    """Samples trained on `rows` (the train split, every epoch): the unit the train step
    records (`arf.samples`). An estimate: a split by episode is not exact."""
    return epochs * math.ceil(rows * (1.0 - validation_split))


def retrain_conf(policy: dict[str, Any]) -> dict[str, Any]:
    """The conf of a retrain night (validated by the DAG's Params like any conf)."""
    return {"dataset_query": str(policy["aggregate_query"]).strip(),
            **(policy.get("retrain_hyperparameters") or {})}
