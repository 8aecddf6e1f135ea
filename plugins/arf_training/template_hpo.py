"""The `hpo:` section of a training template: the Optuna search space, budget and pruning.

Only pydantic here: it runs on every DAG parse.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from arf_training.template_sections import _Section

# An infinite bound (YAML's .inf) passes `low < high` and fails in Optuna at run time.
_Finite = Annotated[float, Field(allow_inf_nan=False)]


def _hp_value_problem(hp: Any, value: Any) -> str | None:
    """Why `value` cannot be a value of hyperparameter `hp` (type, bounds, enum), or None."""
    kind = hp.type
    ok = {"integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "string": isinstance(value, str), "boolean": isinstance(value, bool)}[kind]
    if not ok:
        return f"value {value!r} is not of the hyperparameter's type {kind}"
    enum = getattr(hp, "enum", None)
    if enum is not None and value not in enum:
        return f"value {value!r} is not one of the hyperparameter's enum {enum}"
    lo, hi = getattr(hp, "minimum", None), getattr(hp, "maximum", None)
    if lo is not None and value < lo:
        return f"value {value!r} is below the hyperparameter's minimum {lo}; narrow the range"
    if hi is not None and value > hi:
        return f"value {value!r} is above the hyperparameter's maximum {hi}; narrow the range"
    return None


class FloatSearch(_Section):
    """A real-valued dimension: uniform or log-uniform in [low, high] (Optuna FloatDistribution)."""

    type: Literal["float"]
    low: _Finite = Field(description="Smallest value tried.")
    high: _Finite = Field(description="Largest value tried (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (learning rates); needs low > 0.")
    step: _Finite | None = Field(None, gt=0, description="Discretization step; not with log.")

    @model_validator(mode="after")
    def _check(self) -> "FloatSearch":
        if not self.low < self.high:
            raise ValueError(f"empty range: low {self.low} must be below high {self.high}; "
                             "widen it, or drop the dimension and set the hyperparameter's default")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs a positive low bound, got low {self.low}; use e.g. "
                             "1.0e-5, or log: false")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna refuses it); drop one")
        if self.step is not None:
            # Optuna's own test (decimal, as written): it would silently lower high instead.
            span, step = Decimal(str(self.high)) - Decimal(str(self.low)), Decimal(str(self.step))
            if span % step:
                top = float(span // step * step + Decimal(str(self.low)))
                raise ValueError(f"high - low = {span} is not a multiple of step {self.step} "
                                 f"(Optuna would lower high to {top} without a word); set high "
                                 f"to {top}, or pick a step that divides the range")
        return self


class IntSearch(_Section):
    """A whole-number dimension: low, low+step, ..., high (Optuna IntDistribution)."""

    type: Literal["int"]
    low: int = Field(description="Smallest value tried.")
    high: int = Field(description="Largest value tried (inclusive).")
    step: int = Field(1, ge=1, description="Spacing of the values tried.")
    log: bool = Field(False, description="Sample on a log scale; needs low >= 1 and step 1.")

    @model_validator(mode="after")
    def _check(self) -> "IntSearch":
        if not self.low < self.high:
            raise ValueError(f"empty range: low {self.low} must be below high {self.high}; "
                             "widen it, or drop the dimension and set the hyperparameter's default")
        if self.log and self.low < 1:
            raise ValueError(f"log: true needs low >= 1, got low {self.low}")
        if self.log and self.step != 1:
            raise ValueError(f"log: true needs step 1, got step {self.step} (Optuna refuses it)")
        extra = (self.high - self.low) % self.step
        if extra:
            raise ValueError(f"high - low = {self.high - self.low} is not a multiple of step "
                             f"{self.step}; set high to {self.high - extra}")
        return self


class CategoricalSearch(_Section):
    """A choice among listed values (Optuna CategoricalDistribution)."""

    type: Literal["categorical"]
    choices: list[bool | int | _Finite | str] = Field(
        min_length=2, description="The values tried; at least two, all distinct.")

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Any]) -> list[Any]:
        if len({(type(c), c) for c in choices}) != len(choices):
            raise ValueError(f"choices {choices} repeat a value; list each value once")
        # Optuna stores a choice as the index of the first equal one: 1.0 after 1 (or true
        # after 1) would be recorded as 1, and the trial's params would name a value not tried.
        for i, choice in enumerate(choices):
            twins = [c for c in choices[:i] if c == choice]
            if twins:
                twin = twins[0]
                raise ValueError(f"choices {choices}: {choice!r} and {twin!r} are equal to "
                                 "Optuna (it records both as the first); keep one, or quote "
                                 "them as strings")
        return choices


SearchDimension = Annotated[Union[FloatSearch, IntSearch, CategoricalSearch],
                            Field(discriminator="type")]


class HpoBudget(_Section):
    """What one trial may spend; the pruner's resource axis (one intermediate value per epoch)."""

    epochs: int = Field(ge=1, le=10_000, description="Epochs each trial trains (replaces the "
                                                     "'epochs' hyperparameter in trials).")


class Hpo(_Section):
    """Hyperparameter search: an Optuna study per DAG run, trials as mapped Airflow tasks.

    trials = rounds x parallel: each round asks `parallel` trials at once, trains them as
    mapped tasks and tells their results, so the sampler learns between rounds.
    """

    search_space: dict[str, SearchDimension] = Field(
        min_length=1, description="Hyperparameters to search and their ranges; each name must be "
                                  "one of training.hyperparameters.")
    metric: Literal["val_loss", "val_accuracy", "train_loss"] = Field(
        "val_loss", description="Per-epoch metric reported to Optuna; the last epoch's is the "
                                "trial's value.")
    direction: Literal["minimize", "maximize"] = Field(
        "minimize", description="Whether a lower or a higher metric is better.")
    trials: int = Field(ge=1, le=10_000, description="Trials in the study (rounds x parallel).")
    parallel: int = Field(1, ge=1, le=256,
                          description="Trials per round, trained side by side (the mapped width).")
    sampler: Literal["tpe", "random", "gp", "qmc"] = Field(
        "tpe", description="Optuna sampler; seeded with `seed` (+ the round number).")
    seed: int = Field(0, ge=0, description="Seed of the sampler.")
    pruner: Literal["median", "successive_halving", "hyperband", "none"] = Field(
        "median", description="Optuna pruner that stops unpromising trials early.")
    budget: HpoBudget = Field(description="Per-trial budget.")

    @model_validator(mode="after")
    def _rounds(self) -> "Hpo":
        if self.trials % self.parallel:
            low = self.trials - self.trials % self.parallel
            raise ValueError(
                f"trials {self.trials} is not a multiple of parallel {self.parallel} (trials = "
                f"rounds x parallel); use trials {low or self.parallel} or "
                f"{low + self.parallel}, or change parallel")
        return self

    @property
    def rounds(self) -> int:
        return self.trials // self.parallel
