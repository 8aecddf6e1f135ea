"""`arf-trainer choose`: the first step of a DAG whose template has a `nightly:` section.

It decides tonight's recipe and returns the conf the rest of the DAG run uses (the operators of
prepare_data, train and register read it from this task's result instead of the trigger conf):

* the trigger conf's `nightly_recipe: fine-tune | retrain` is obeyed as given (what a re-run
  or `arf training reproduce` passes, and how an operator forces a night);
* `auto` (the default, a scheduled night) applies `arf_trainer.nightly.policy.choose` to what
  the data hub and MLflow hold: tonight's new rows (none: fine-tune, and prepare skips the
  run), the champion's recorded success rate, the nights run since the champion's line was
  trained from scratch and the samples they trained (`arf.samples`), and estimates of a
  retrain and of the budget's reference, both from row counts (`estimated_samples`).

The returned conf is the trigger conf plus `nightly_recipe` and, on a retrain night, the
aggregate query and the retrain hyperparameters (what the trigger conf sets wins), so the
training run records the recipe it ran and re-runs as it ran.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from arf_trainer.datahub.dataset_query import open_dataset_query, query_parameters, resolve_query
from arf_trainer.errors import SpecError
from arf_trainer.nightly.history import read_history
from arf_trainer.nightly.policy import (AUTO, CONF_KEY, FINETUNE, RECIPES, RETRAIN, Choice,
                                        choose, estimated_samples, retrain_conf, retrain_rows)
from arf_trainer.spec import StepEnv

log = logging.getLogger(__name__)


def run_choose(env: StepEnv) -> dict[str, Any]:
    spec = env.spec
    policy = spec.template.get("nightly")
    if not policy:
        raise SpecError(f"template {spec.name!r} has no nightly: section; the choose step is the "
                        "first task of a template with one")
    asked = spec.conf.get(CONF_KEY, AUTO)
    if asked not in RECIPES:
        raise SpecError(f"conf.{CONF_KEY}={asked!r} must be one of {list(RECIPES)}")
    given = {k: v for k, v in spec.conf.items() if k != CONF_KEY}
    estimate: dict[str, Any] = {}
    if asked != AUTO:
        choice = Choice(asked, f"the trigger conf sets {CONF_KEY}: {asked}")
    elif policy.get("mode") == FINETUNE:
        choice = Choice(FINETUNE, "nightly.mode is fine-tune")
    else:
        choice = _auto(env, policy, given, estimate)
    conf = {**(retrain_conf(policy) if choice.recipe == RETRAIN else {}), **given,
            CONF_KEY: choice.recipe}
    log.info("tonight: %s (%s)", choice.recipe, choice.reason)
    return {"recipe": choice.recipe, "reason": choice.reason, "conf": conf, "estimate": estimate}


def _auto(env: StepEnv, policy: dict[str, Any], given: dict[str, Any],
          estimate: dict[str, Any]) -> Choice:
    spec, dataset = env.spec, env.spec.dataset
    spill = env.workspace / "choose" / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    pins, values = dict(dataset.get("tables") or {}), query_parameters(env)

    def count(what: str, query: str) -> int:
        return open_dataset_query(env, what, query, pins, values, spill).count()

    try:
        estimate["tonight_rows"] = count("dataset.query", resolve_query(env))
        if estimate["tonight_rows"] == 0:
            return Choice(FINETUNE, "no new rows tonight (the prepare step skips or fails the "
                                    "run, as dataset.skip_if_empty says)")
        history = read_history(env.tracking_uri, spec.model["base_model"], spec.name,
                               spec.run.dag_id, spec.run.run_id)
        root = history.root
        estimate.update(champion_version=history.champion_version,
                        champion_rate=history.champion_rate, root_run_id=root.run_id,
                        nights_before=len(history.recipes), spent_samples=history.spent,
                        nights_without_samples=history.unknown)
        if root.epochs is None:
            return Choice(FINETUNE, f"the from-scratch run {root.run_id} at the root of the "
                          "champion's lineage records no epochs param, which sizes the budget")
        aggregate = count("nightly.aggregate_query", policy["aggregate_query"])
        replay = dataset.get("replay")
        available = count("dataset.replay.query", replay["query"]) if replay else 0
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    epochs = {**spec.hyperparameters, **(policy.get("retrain_hyperparameters") or {}),
              **given}.get("epochs")
    if isinstance(epochs, float) and epochs.is_integer():
        epochs = int(epochs)  # 2.0: a whole number, as the conf check and the template's take it
    if isinstance(epochs, bool) or not isinstance(epochs, int):
        raise SpecError(f"template {spec.name!r}: the nightly choice estimates a retrain from "
                        f"the hyperparameter 'epochs' (got {epochs!r}); declare it")
    split = float(dataset.get("validation_split", 0.0))
    rows = retrain_rows(aggregate, available, replay["ratio"] if replay else None)
    retrain = estimated_samples(rows, epochs=epochs, validation_split=split)
    reference = estimated_samples(aggregate, epochs=root.epochs, validation_split=split)
    estimate.update(aggregate_rows=aggregate, replay_rows_available=available,
                    retrain_rows=rows, retrain_samples=retrain, reference_samples=reference)
    return choose(policy, night=len(history.recipes) + 1, champion_rate=history.champion_rate,
                  last_retrain_night=history.last_retrain_night, spent=history.spent,
                  retrain=max(1, retrain), reference=max(1, reference))
