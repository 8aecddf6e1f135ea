"""`nightly:` in a fine-tune template: per night, fine-tune the champion on the night's
corrections or retrain on the aggregate, within a stated compute budget.

The template's section is checked here; the choice is made at run time by the DAG's first
task, `choose_recipe` (`arf-trainer choose`, arf_trainer/nightly/), whose rule is:

1. over budget: fine-tune. `compute_budget` caps the nightly work, in samples trained (epochs x
   rows), at that fraction of one from-scratch retrain on tonight's aggregate (the epochs of the
   from-scratch run at the root of the champion's lineage, on the aggregate's rows); a retrain
   that would push the nights' total past it is not chosen, whatever else holds;
2. champion below `retrain_below` (its recorded evaluation success rate): retrain;
3. `retrain_every` nights since the last retrain: retrain;
4. otherwise fine-tune.

A retrain night runs the same DAG with `dataset_query` = `nightly.aggregate_query` and the
`nightly.retrain_hyperparameters`, warm-started from the champion like every run of a
fine-tune template. A trigger conf's `nightly_recipe: fine-tune | retrain` overrides the rule.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from arf_training.template_query import _check_single_select


class Nightly(BaseModel):
    """How the nightly run chooses between a fine-tune and a retrain on the aggregate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aggregate_query: str = Field(
        min_length=1, max_length=32_768,
        description="The retrain's query: everything collected so far (e.g. the "
                    "demonstrations UNION ALL every correction); same columns as dataset.query.")
    retrain_hyperparameters: dict[str, int | float] = Field(
        default_factory=dict,
        description="Hyperparameters of a retrain night (e.g. epochs: 10, lr: 0.001), each a "
                    "hyperparameter of the template, within its type and bounds.")
    retrain_below: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Retrain while the champion's evaluated success rate is below this.")
    retrain_every: int | None = Field(
        None, ge=1, le=365, description="Retrain at least every this many nights.")
    compute_budget: float = Field(
        0.25, gt=0.0, le=10.0,
        description="Cap on all nightly work together (samples trained: epochs x rows), as a "
                    "fraction of one "
                    "from-scratch retrain on tonight's aggregate (0.25: a quarter), counted "
                    "since the champion's line was trained from scratch.")
    mode: Literal["adaptive", "fine-tune"] = Field(
        "adaptive", description="'fine-tune' turns the choice off (every night fine-tunes).")

    @field_validator("aggregate_query")
    @classmethod
    def _one_select(cls, query: str) -> str:
        return _check_single_select(query)


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
    declared = template.training.hyperparameters  # type: ignore[attr-defined]
    unknown = sorted(set(nightly.retrain_hyperparameters) - set(declared))
    if unknown:
        problems.append(f"nightly.retrain_hyperparameters sets {', '.join(unknown)}, not "
                        f"hyperparameters of this template ({', '.join(sorted(declared))}); "
                        "declare them under training.hyperparameters or remove them")
    for name, value in sorted(nightly.retrain_hyperparameters.items()):
        if name in declared:
            problem = _value_problem(value, declared[name])
            if problem:
                problems.append(f"nightly.retrain_hyperparameters.{name} = {value!r} {problem} "
                                f"(training.hyperparameters.{name}); a retrain night would "
                                "fail its first step: change the value")
    if "epochs" not in declared:
        problems.append("nightly: the choice estimates a retrain's work from the "
                        "hyperparameter epochs; declare epochs under training.hyperparameters")
    return problems


def _value_problem(value: int | float, spec: object) -> str | None:
    """What makes `value` invalid for the declared hyperparameter `spec` (as the trigger conf's
    check would say at run time), or None."""
    if isinstance(value, bool) or not math.isfinite(value):
        return "is not a finite number"
    if getattr(spec, "type", None) == "integer" and value != int(value):
        return "is not a whole number"
    minimum, maximum = getattr(spec, "minimum", None), getattr(spec, "maximum", None)
    enum = getattr(spec, "enum", None)
    if minimum is not None and value < minimum:
        return f"is below the minimum {minimum}"
    if maximum is not None and value > maximum:
        return f"is above the maximum {maximum}"
    if enum is not None and value not in enum:
        return f"is not one of {enum}"
    return None
