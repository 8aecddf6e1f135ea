"""Training template schema v1: the only schema of `config_templates/*.yaml`.

One pydantic v2 model per YAML section, `extra="forbid"`, frozen. The JSON Schema for editors
(`arf templates schema`) is exported from these models. Loading reports every problem of a file
with its line, field path, the value received and how to fix it (`TemplateError`).

Only pydantic and PyYAML are imported here: this module runs on every DAG parse.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from arf_training.errors import TemplateError, TemplateIssue
from arf_training.template_dataset import DatasetLayout
from arf_training.template_federated import Federated, check_federated
from arf_training.nightly_recipe import Nightly, nightly_problems
from arf_training.template_gate import Gate, check_gate
from arf_training.template_yaml import node_at, read_yaml

API_VERSION = "arf.dev/v1"
KIND = "TrainingTemplate"

# Hyperparameters each built-in recipe understands (the container side checks them again).
RECIPE_HYPERPARAMETERS: dict[str, frozenset[str]] = {
    "bc": frozenset({"epochs", "batch_size", "lr", "hidden_size", "num_layers", "weight_decay"}),
    "classifier": frozenset({"epochs", "batch_size", "lr", "hidden_size", "num_layers", "weight_decay"}),
    "bc_pixels": frozenset({"epochs", "batch_size", "lr", "hidden_size", "num_layers", "weight_decay"}),
}
SCHEDULE_PRESETS = ("@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")
# Kubernetes resource quantities (the subset people write): 500m, 2, 1.5, 512Mi, 2Gi, 1G.
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SQL_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_SQL_STRING = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
# Airflow's data-interval macros a dataset query may use. They are not pasted into the SQL:
# `rewrite_query_macros` turns each into a DuckDB named parameter ($data_interval_start), and
# the prepare step binds the run's values (TIMESTAMP WITH TIME ZONE) to it.
QUERY_MACROS = ("data_interval_start", "data_interval_end", "logical_date")
_MACRO = re.compile(r"\{\{(.*?)\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_PARAMETER = re.compile(r"\$(" + "|".join(QUERY_MACROS) + r")\b")
# Longest dataset query (characters): the container refuses longer ones before parsing them
# (arf_trainer.datahub.sqlcheck.MAX_QUERY_CHARS, the same number; a test keeps them equal).
# This side may not import the container's module, and refusing here shows it at lint time.
MAX_QUERY_CHARS = 32_768


def rewrite_query_macros(query: str) -> str:
    """`{{ data_interval_start }}` (and the other QUERY_MACROS) -> `$data_interval_start`.

    Raises ValueError naming the expression for anything else in braces (other macros, Jinja
    blocks, filters) and for a macro inside a quoted SQL string, where it would be text.
    """
    for literal in _SQL_STRING.findall(_SQL_COMMENT.sub(" ", query)):
        if "{{" in literal or "{%" in literal:
            raise ValueError(
                f"the string literal {literal} holds a template expression; write "
                "{{ data_interval_start }} without quotes: it is bound as a TIMESTAMP WITH TIME "
                "ZONE parameter, not pasted into the SQL")

    def replace(match: re.Match[str]) -> str:
        name = (match.group(1) or "").strip()
        if match.group(1) is None or name not in QUERY_MACROS:
            raise ValueError(
                f"uses the template expression {match.group(0)!r}; only "
                + ", ".join("{{ " + m + " }}" for m in QUERY_MACROS)
                + " are allowed (bound as query parameters, never pasted into the SQL); "
                "write other values into the query")
        return f"${name}"

    return _MACRO.sub(replace, query)


def uses_data_interval(query: str) -> bool:
    """Whether a (rewritten) query reads one of the run's data-interval parameters."""
    return bool(_PARAMETER.search(_SQL_STRING.sub("''", _SQL_COMMENT.sub(" ", query))))


def _check_query_size(data: Any, field: str) -> Any:
    """Refuse an oversized query before any regex or parser runs over it. A model-level check
    (not a field validator), so that the issue quotes a short prefix, not the whole value."""
    query = data.get("query") if isinstance(data, dict) else None
    if isinstance(query, str) and len(query) > MAX_QUERY_CHARS:
        raise ValueError(
            f"{field} is {len(query):,} characters long, over the limit of {MAX_QUERY_CHARS:,} "
            f"(starts {' '.join(query[:60].split())!r}); shorten it, e.g. join a hub table of "
            "ids instead of a long IN list")
    return data


def _check_single_select(query: str) -> str:
    """Rewrite the macros and check for one SELECT; returns the rewritten query."""
    query = rewrite_query_macros(query)
    # A cheap first line of defence so lint catches it; the container enforces it with
    # DuckDB's own parser inside the sandbox.
    body = _SQL_STRING.sub("''", _SQL_COMMENT.sub(" ", query)).strip().rstrip(";").strip()
    if ";" in body:
        raise ValueError("holds more than one statement; keep a single SELECT")
    first = body.split(None, 1)[0].upper() if body else ""
    if first not in ("SELECT", "WITH", "FROM", "VALUES", "("):
        raise ValueError(
            f"must be a single SELECT, but starts with {first or 'nothing'!r}; "
            "data hub queries are read-only (no COPY, ATTACH, INSTALL, CREATE, ...)"
        )
    return query


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Section):
    """Who owns the template and how it shows in the Airflow UI."""

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,62}$",
        description="Template name; also the DAG id. Lower-case letters, digits and '_'.",
    )
    description: str = Field("", description="Markdown shown as the DAG's documentation.")
    owner: str = Field("arf", min_length=1, description="Owning team, shown in the DAG list.")
    tags: list[str] = Field(default_factory=list, description="DAG tags for filtering in the UI.")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.startswith("arf_"):
            raise ValueError(f"names starting with 'arf_' are reserved for platform DAGs "
                             f"(got {name!r}); choose another name")
        return name


class _HyperparameterBase(_Section):
    description: str = Field("", description="Help text shown under the field in the trigger form.")

    def bounds_check(self) -> None:
        lo, hi = getattr(self, "minimum", None), getattr(self, "maximum", None)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"minimum {lo} is greater than maximum {hi}; swap them")
        default, enum = self.default, getattr(self, "enum", None)
        if enum is not None:
            if not enum:
                raise ValueError("enum is empty; list the allowed values or remove 'enum'")
            if default not in enum:
                raise ValueError(f"default {default!r} is not one of enum {enum}; add it or change it")
        if lo is not None and default < lo:
            raise ValueError(f"default {default} is below minimum {lo}")
        if hi is not None and default > hi:
            raise ValueError(f"default {default} is above maximum {hi}")


class IntegerHyperparameter(_HyperparameterBase):
    """A whole-number hyperparameter (an integer field in the trigger form)."""

    type: Literal["integer"]
    default: int = Field(description="Value used when the trigger conf does not set it.")
    minimum: int | None = Field(None, description="Smallest accepted value.")
    maximum: int | None = Field(None, description="Largest accepted value.")
    enum: list[int] | None = Field(None, description="If set, the only accepted values (a dropdown).")

    @model_validator(mode="after")
    def _check(self) -> "IntegerHyperparameter":
        self.bounds_check()
        return self


class NumberHyperparameter(_HyperparameterBase):
    """A real-valued hyperparameter."""

    type: Literal["number"]
    default: float = Field(description="Value used when the trigger conf does not set it.")
    minimum: float | None = Field(None, description="Smallest accepted value.")
    maximum: float | None = Field(None, description="Largest accepted value.")
    enum: list[float] | None = Field(None, description="If set, the only accepted values.")

    @model_validator(mode="after")
    def _check(self) -> "NumberHyperparameter":
        self.bounds_check()
        return self


class StringHyperparameter(_HyperparameterBase):
    """A string hyperparameter, usually a choice (`enum`)."""

    type: Literal["string"]
    default: str = Field(description="Value used when the trigger conf does not set it.")
    enum: list[str] | None = Field(None, description="If set, the only accepted values (a dropdown).")

    @model_validator(mode="after")
    def _check(self) -> "StringHyperparameter":
        self.bounds_check()
        return self


class BooleanHyperparameter(_HyperparameterBase):
    """An on/off hyperparameter (a toggle in the trigger form)."""

    type: Literal["boolean"]
    default: bool = Field(description="Value used when the trigger conf does not set it.")


Hyperparameter = Annotated[
    Union[IntegerHyperparameter, NumberHyperparameter, StringHyperparameter, BooleanHyperparameter],
    Field(discriminator="type"),
]


class Replay(_Section):
    """Replay of old data: `round(ratio x new rows)` rows sampled (seeded with the template's
    seed, without replacement) from this query's result and added to the new rows."""

    query: str = Field(min_length=1, description="A single SELECT over hub tables returning the "
                       "same columns as dataset.query; may use the data-interval macros too.")
    ratio: float = Field(gt=0, le=1000, description="Replay rows per new row, e.g. 1.0 for as "
                                                    "many old rows as new ones.")

    @model_validator(mode="before")
    @classmethod
    def _query_size(cls, data: Any) -> Any:
        return _check_query_size(data, "dataset.replay.query")

    @field_validator("query")
    @classmethod
    def _single_select(cls, query: str) -> str:
        return _check_single_select(query)


class Dataset(DatasetLayout, _Section):
    """What to pull from the data hub: one SQL SELECT over its versioned tables (split_by and
    order_by: arf_training.template_dataset)."""

    hub: str = Field("default", pattern=r"^[a-z][a-z0-9_-]*$",
                     description="Data hub to query; 'default' is the deployment's ARF_DATAHUB_URI.")
    query: str = Field(
        min_length=1,
        description="A single SQL SELECT (DuckDB dialect) over hub tables. May use "
                    "{{ data_interval_start }}, {{ data_interval_end }} and {{ logical_date }}: "
                    "bound as TIMESTAMP WITH TIME ZONE parameters ($data_interval_start, ...), "
                    "never pasted in; such a template needs a schedule.")
    tables: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Pinned table versions, e.g. {reach_demos: 3}; unpinned tables use the latest.",
    )
    validation_split: float = Field(0.1, ge=0.0, lt=1.0,
                                    description="Fraction of rows held out for validation.")
    features: list[str] = Field(min_length=1,
                                description="Input columns; names or globs such as 'obs_*'.")
    targets: list[str] = Field(min_length=1, description="Target columns; names or globs.")
    allow_query_override: bool = Field(
        False, description="Offer a 'dataset_query' field in the trigger form to replace the query."
    )

    skip_if_empty: bool = Field(
        False,
        description="When the query returns no rows, skip the run (prepare exits 99; the later "
                    "tasks are skipped and the run is not failed) instead of failing it. For "
                    "incremental queries over the data interval, e.g. a nightly fine-tune.")
    replay: Replay | None = Field(
        None, description="Old data mixed into the new rows (against forgetting): a second "
                          "SELECT and how many of its rows to add per new row.")

    @model_validator(mode="before")
    @classmethod
    def _query_size(cls, data: Any) -> Any:
        return _check_query_size(data, "dataset.query")

    @field_validator("query")
    @classmethod
    def _single_select(cls, query: str) -> str:
        return _check_single_select(query)


class Model(_Section):
    """Where the trained model goes in the registry (MLflow; the ARF plugin market)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$",
                      description="Registered model name.")
    base_model: str | None = Field(
        None, pattern=r"^models:/[A-Za-z][A-Za-z0-9_.-]*(/[0-9]+|@[A-Za-z0-9_-]+)$",
        description="Model to start from, e.g. models:/reach_bc_policy@champion or models:/x/3.",
    )


class CustomCommand(_Section):
    """Run your own container command instead of a built-in recipe (any framework)."""

    image: str = Field(min_length=1, description="Container image (used by the Kubernetes backend).")
    command: list[str] = Field(min_length=1, description="Command and arguments to run.")


class Distributed(_Section):
    """The distributed shape: nodes x processes per node (DDP world size = the product)."""

    nodes: int = Field(1, ge=1, le=1024, description="Machines (pods); >1 uses a PyTorchJob.")
    procs_per_node: int = Field(1, ge=1, le=64, description="Processes per machine (torchrun).")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class Resources(_Section):
    """Per-process-group resources of the training step (per pod on Kubernetes)."""

    cpu: float | str = Field(1, description="CPU cores, as a number or a Kubernetes quantity (500m).")
    memory: str = Field("2Gi", description="Memory, as a Kubernetes quantity (512Mi, 2Gi).")
    gpu: int = Field(0, ge=0, le=16, description="GPUs per node (nvidia.com/gpu).")
    spot: bool = Field(
        False,
        description="Schedule on spot/preemptible nodes (Kubernetes backend): adds the spot "
                    "toleration and node affinity; the step checkpoints on SIGTERM within "
                    "training.preemption_grace_seconds and a retry resumes from it.")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: float | str) -> float | str:
        text = str(value)
        if not _QUANTITY.match(text) or float(re.sub(r"[a-zA-Z]+$", "", text)) <= 0:
            raise ValueError(
                f"{value!r} is not a positive Kubernetes quantity; write e.g. 2, 500m, 512Mi, 2Gi"
            )
        return value


class Training(_Section):
    """How to train: a built-in recipe or a custom command, with typed hyperparameters."""

    recipe: Literal["bc", "classifier", "bc_pixels"] | None = Field(
        None, description="Built-in recipe: 'bc' (behaviour cloning), 'classifier' or "
                          "'bc_pixels' (behaviour cloning from camera frames + state).")
    command: CustomCommand | None = Field(None, description="Custom image + command instead of a recipe.")
    hyperparameters: dict[str, Hyperparameter] = Field(
        default_factory=dict, description="Typed hyperparameters; each becomes a trigger-form field.")
    seed: int = Field(0, ge=0, description="Seed of every random number generator.")
    distributed: Distributed = Field(default_factory=Distributed)
    resources: Resources = Field(default_factory=Resources)
    checkpoint_every_steps: int = Field(500, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    timeout_minutes: int = Field(60, ge=1, le=7 * 24 * 60, description="Per-step time limit.")
    preemption_grace_seconds: int = Field(
        30, ge=1, le=3600,
        description="After SIGTERM (preemption, timeout, a killed task) the step has this long to "
                    "checkpoint and exit before it is killed.")
    retries: int = Field(0, ge=0, le=10, description="Airflow retries of each step.")
    freeze_layers: int = Field(
        0, ge=0, le=64,
        description="Fine-tuning (model.base_model): the first N hidden layers of the MLP keep "
                    "the base model's weights; 0 trains every layer.")
    data_loading: Literal["auto", "stream", "memory"] = Field(
        "auto",
        description="Built-in recipes: 'memory' reads the prepared shards whole, 'stream' reads "
                    "them in bounded memory (shuffled by shard and window, exact resume); 'auto' "
                    "streams when the data exceeds a quarter of resources.memory (1 GiB if unset).")

    @field_validator("hyperparameters")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(r"^[a-z][a-z0-9_]*$", name):
                raise ValueError(f"hyperparameter name {name!r} must be lower_snake_case")
            if name in RESERVED_PARAMS:
                raise ValueError(f"hyperparameter name {name!r} is reserved; rename it")
        return value

    @model_validator(mode="after")
    def _recipe_or_command(self) -> "Training":
        if (self.recipe is None) == (self.command is None):
            raise ValueError(
                "set exactly one of 'recipe' (bc, classifier) or 'command' (image + command)"
            )
        if self.recipe is not None:
            unknown = sorted(set(self.hyperparameters) - RECIPE_HYPERPARAMETERS[self.recipe])
            if unknown:
                raise ValueError(
                    f"recipe {self.recipe!r} has no hyperparameter(s) {unknown}; it accepts "
                    f"{sorted(RECIPE_HYPERPARAMETERS[self.recipe])}"
                )
        return self


class Evaluation(_Section):
    """How `arf_evaluate` scores a registered version of this template's model."""

    environment: Literal["reach", "reach_pixels"] = Field(
        description="Simulated task: 'reach' (MuJoCo Reacher-v5, state policies) or "
                    "'reach_pixels' (the same task seen by a camera, for bc_pixels policies).")
    episodes: int = Field(50, ge=1, le=100_000, description="Rollouts per evaluation.")
    seed: int = Field(100_000, ge=0, description="First episode seed; episodes use seed..seed+n-1.")
    success_threshold: float = Field(0.8, ge=0.0, le=1.0,
                                     description="Success rate at or above which a version passes.")
    promotion_margin: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="Promotion gate: move the 'champion' alias to an evaluated version only if "
                    "its success rate beats the champion's on the same seeds by at least this "
                    "much (e.g. 0.02); the first version becomes champion. Unset: no gate.")
    gate: Gate | None = Field(None, description="The promotion gate's alpha, episode budget "
                              "and human approval (arf_training.template_gate).")

    @model_validator(mode="after")
    def _gate(self) -> "Evaluation":
        check_gate(self)
        return self


# -- hyperparameter search (`hpo:`) ------------------------------------------------------------

class FloatSearch(_Section):
    """A real-valued dimension: uniform or log-uniform in [low, high] (Optuna FloatDistribution)."""

    type: Literal["float"]
    low: float = Field(description="Smallest value tried.")
    high: float = Field(description="Largest value tried (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (learning rates); needs low > 0.")
    step: float | None = Field(None, gt=0, description="Discretization step; not with log.")

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
    choices: list[bool | int | float | str] = Field(
        min_length=2, description="The values tried; at least two, all distinct.")

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Any]) -> list[Any]:
        if len({(type(c), c) for c in choices}) != len(choices):
            raise ValueError(f"choices {choices} repeat a value; list each value once")
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


class TrainingTemplate(_Section):
    """A training template: one YAML file, one Airflow DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Literal["arf.dev/v1"] = Field(alias="apiVersion", description="Schema version.")
    kind: Literal["TrainingTemplate"] = Field(description="Always TrainingTemplate.")
    metadata: Metadata
    schedule: str | None = Field(
        None, description="None (manual/API only), a preset such as @daily, or a cron expression.")
    start_date: date = Field(date(2025, 1, 1), description="First logical date for scheduled runs.")
    max_active_runs: int = Field(1, ge=1, le=64, description="Concurrent runs of this DAG.")
    dataset: Dataset
    model: Model
    training: Training
    evaluation: Evaluation | None = Field(None, description="Evaluate each registered version.")
    hpo: Hpo | None = Field(None, description="Search hyperparameters before the final training.")
    nightly: Nightly | None = Field(None, description="Per night: fine-tune or retrain on the "
                                    "aggregate, within a compute budget (nightly_recipe.py).")
    federated: Federated | None = Field(
        None, description="Train across sites whose data stays at each site (Flower).")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is None or value in SCHEDULE_PRESETS:
            return value
        if value.startswith("@"):
            raise ValueError(f"unknown preset {value!r}; use one of {', '.join(SCHEDULE_PRESETS)}")
        from croniter import croniter  # an Airflow dependency; only loaded for cron schedules

        if not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a valid cron expression; write 5 fields, e.g. '0 2 * * *'"
            )
        return value

    @model_validator(mode="after")
    def _fine_tune_fits(self) -> "TrainingTemplate":
        problems = nightly_problems(self)
        queries = [("dataset.query", self.dataset.query)]
        if self.dataset.replay is not None:
            queries.append(("dataset.replay.query", self.dataset.replay.query))
        for where, query in queries:
            if uses_data_interval(query) and self.schedule in (None, "@once"):
                problems.append(
                    f"{where} reads the run's data interval, but schedule is "
                    f"{self.schedule!r}: such runs have no interval to select. Set a schedule, "
                    "e.g. '0 2 * * *' (each run reads the period since the previous one)")
        if self.training.freeze_layers and self.model.base_model is None:
            problems.append(
                f"training.freeze_layers is {self.training.freeze_layers}, but model.base_model "
                "is not set: freezing freshly initialised layers trains nothing useful; set "
                "base_model (e.g. models:/reach_bc_policy@champion) or freeze_layers: 0")
        if self.training.freeze_layers and self.training.recipe is None:
            problems.append("training.freeze_layers needs a built-in training.recipe; a custom "
                            "command decides itself what to train")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def uses_data_interval(self) -> bool:
        """Whether the dataset query (or its replay) reads the run's data interval."""
        replay = self.dataset.replay
        return uses_data_interval(self.dataset.query) or (
            replay is not None and uses_data_interval(replay.query))

    @model_validator(mode="after")
    def _federated_fits(self) -> "TrainingTemplate":
        check_federated(self)
        return self

    @model_validator(mode="after")
    def _hpo_fits_training(self) -> "TrainingTemplate":
        if self.hpo is None:
            return self
        training, problems = self.training, []
        if training.recipe is None:
            problems.append("hpo needs a built-in training.recipe: trials report per-epoch "
                            "metrics and are pruned by arf-trainer; remove hpo or use a recipe")
        hps = training.hyperparameters
        for name, dim in self.hpo.search_space.items():
            where = f"hpo.search_space.{name}"
            hp = hps.get(name)
            if hp is None:
                problems.append(f"{where}: {name!r} is not a hyperparameter of this template; "
                                f"searchable names: {sorted(hps)}")
                continue
            if name == "epochs":
                problems.append(f"{where}: epochs is the per-trial budget (hpo.budget.epochs), "
                                "not a search dimension; remove it from search_space")
                continue
            values = dim.choices if isinstance(dim, CategoricalSearch) else [dim.low, dim.high]
            want = {"integer": IntSearch, "number": FloatSearch}.get(hp.type)
            if not isinstance(dim, CategoricalSearch) and not isinstance(dim, want or ()):
                kind = {"integer": "int", "number": "float"}.get(hp.type, "categorical")
                problems.append(f"{where}: type {dim.type!r} does not fit the {hp.type} "
                                f"hyperparameter {name!r}; use type: {kind}")
                continue
            for value in values:
                problem = _hp_value_problem(hp, value)
                if problem:
                    problems.append(f"{where}: {problem}")
                    break
        if "epochs" not in hps and training.recipe is not None:
            problems.append("hpo.budget.epochs: the template has no 'epochs' hyperparameter for "
                            "the budget to replace; declare it in training.hyperparameters")
        if self.hpo.metric.startswith("val_") and self.dataset.validation_split <= 0:
            problems.append(f"hpo.metric: {self.hpo.metric!r} needs validation data, but "
                            "dataset.validation_split is 0; raise it or use train_loss")
        if self.hpo.metric == "val_accuracy" and training.recipe != "classifier":
            problems.append(f"hpo.metric: 'val_accuracy' is reported by the classifier recipe "
                            f"only (recipe is {training.recipe!r}); use val_loss")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def model_asset_uri(self) -> str:
        return f"arf-model://{self.model.name}"


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


# Params the factory adds next to the hyperparameters; hyperparameters may not take these names.
RESERVED_PARAMS = frozenset({"seed", "dataset_query"})


@dataclass(frozen=True)
class LoadedTemplate:
    """A validated template with where it came from (for lineage and error messages)."""

    template: TrainingTemplate
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.template.name


# Tags of discriminated unions (hyperparameter and search-dimension types): not YAML keys.
_UNION_TAGS = ("integer", "number", "string", "boolean", "float", "int", "categorical")


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed where an unknown key was found (walks the models along loc)."""
    model: Any = TrainingTemplate
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return []
        field = fields.get(str(part)) or next(
            (f for f in fields.values() if f.alias == part), None)
        if field is None:
            # A dict key (hyperparameter name) or union tag: pick the model by the tag.
            tag_model = {"integer": IntegerHyperparameter, "number": NumberHyperparameter,
                         "string": StringHyperparameter, "boolean": BooleanHyperparameter,
                         "float": FloatSearch, "int": IntSearch,
                         "categorical": CategoricalSearch}
            if part in tag_model:
                model = tag_model[part]
            continue
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)]
        if candidates:
            model = candidates[0]
    fields = getattr(model, "model_fields", {})
    return sorted(f.alias or n for n, f in fields.items())


def _issues_from_validation(path: str, root: yaml.Node | None,
                            exc: ValidationError) -> list[TemplateIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # Drop discriminator tags (e.g. 'integer') from the displayed path.
        shown = [str(p) for p in loc if p not in _UNION_TAGS or loc.index(p) == 0]
        field = ".".join(shown)
        node, _ = node_at(root, loc)
        line = node.start_mark.line + 1 if node is not None and node is not root else None
        kind, value = err["type"], err.get("input")
        if kind == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = f"unknown key {loc[-1]!r}" + (f"; allowed keys here: {', '.join(allowed)}"
                                                 if allowed else "") + ". Check the spelling."
        elif kind == "missing":
            msg = "required field is missing; add it"
        else:
            text_msg = err["msg"].removeprefix("Value error, ")
            shown_value = repr(value) if not isinstance(value, (dict, list)) else None
            msg = text_msg + (f" (got {shown_value})" if shown_value and shown_value not in text_msg
                              else "")
        issues.append(TemplateIssue(file=path, field=field, message=msg, line=line))
    return issues


def parse_template(text: str, path: str = "<string>") -> TrainingTemplate:
    """Validate one template's YAML text. Raises `TemplateError` listing every issue."""
    document = read_yaml(text, path)  # syntax errors and duplicate keys, with their lines
    data = document.data
    if not isinstance(data, dict):
        raise TemplateError([TemplateIssue(
            file=path, message=f"expected a mapping with apiVersion, kind, metadata, ...; got "
                               f"{type(data).__name__}")])
    if data.get("apiVersion") not in (None, API_VERSION):
        raise TemplateError([TemplateIssue(
            file=path, field="apiVersion", line=1,
            message=f"unsupported apiVersion {data.get('apiVersion')!r}; this arf-training "
                    f"reads {API_VERSION!r}")])
    try:
        return TrainingTemplate.model_validate(data)
    except ValidationError as exc:
        raise TemplateError(_issues_from_validation(path, document.root, exc)) from exc


# Both DAG files load the same templates; within one process (a DagBag, `airflow dags test`)
# the second load is a dictionary hit. Keyed on content, so an edited file is always re-read.
_CACHE: dict[tuple[str, str], LoadedTemplate | TemplateError] = {}


def load_template(path: Path) -> LoadedTemplate:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    key = (str(path), digest)
    cached = _CACHE.get(key)
    if cached is None:
        try:
            cached = LoadedTemplate(template=parse_template(raw.decode("utf-8", errors="replace"),
                                                            str(path)), path=path, sha256=digest)
        except TemplateError as exc:
            cached = exc
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = cached
    if isinstance(cached, TemplateError):
        raise TemplateError(cached.issues)
    return cached


def template_files(folder: Path) -> list[Path]:
    """The folder's *.yaml/*.yml files, by name. (scandir knows the file type without a stat
    per file, and names sort far faster than Paths: this runs on every DAG parse.)"""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries
                       if os.path.splitext(e.name)[1] in (".yaml", ".yml") and e.is_file())
    return [folder / name for name in names]


def load_folder(paths: list[Path]) -> tuple[list[LoadedTemplate], list[TemplateIssue]]:
    """Load every template; a broken one never hides the others.

    Returns the valid templates (in path order) and the issues of the invalid ones. Templates
    that share a name are all rejected: which one would win depends on file order, so neither
    is built until one is renamed.
    """
    good: list[LoadedTemplate] = []
    issues: list[TemplateIssue] = []
    dupes_early: set[Path] = set()
    for path in paths:
        try:
            good.append(load_template(path))
        except TemplateError as exc:
            issues.extend(exc.issues)
        except OSError as exc:
            issues.append(TemplateIssue(file=str(path), message=f"cannot read file: {exc}"))
    by_name: dict[str, list[LoadedTemplate]] = {}
    for loaded in good:
        by_name.setdefault(loaded.name, []).append(loaded)
    # Model names must be unique too: two DAGs registering one model would interleave versions.
    # Except for fine-tunes of that model (base_model models:/<name>...): they register
    # candidates under the same name on purpose, so that arf_evaluate's promotion gate compares
    # them with the champion. At most one template per name may train it from scratch.
    by_model: dict[str, list[LoadedTemplate]] = {}
    for loaded in good:
        if not fine_tunes_own_model(loaded.template):
            by_model.setdefault(loaded.template.model.name, []).append(loaded)
    for loaded in good:
        if fine_tunes_own_model(loaded.template):
            owners = by_model.get(loaded.template.model.name, [])
            problem = _evaluation_mismatch(loaded, owners)
            if problem:
                issues.append(problem)
                dupes_early.add(loaded.path)
    dupes: set[Path] = set(dupes_early)
    for key, label, groups in (("metadata.name", "name", by_name),
                               ("model.name", "model name", by_model)):
        for value, group in groups.items():
            if len(group) > 1:
                files = ", ".join(str(g.path) for g in group)
                for g in group:
                    dupes.add(g.path)
                    issues.append(TemplateIssue(
                        file=str(g.path), field=key,
                        message=f"duplicate {label} {value!r} (also in: {files}); "
                                "every template needs its own; rename all but one"))
    return [g for g in good if g.path not in dupes], issues


def fine_tunes_own_model(template: TrainingTemplate) -> bool:
    """True when the template starts from a version of the model it registers (a fine-tune)."""
    base = template.model.base_model
    if base is None:
        return False
    name = re.split(r"[/@]", base.removeprefix("models:/"), maxsplit=1)[0]
    return name == template.model.name


def _evaluation_mismatch(loaded: LoadedTemplate,
                         owners: list[LoadedTemplate]) -> TemplateIssue | None:
    """A fine-tune must evaluate its candidates like the template that trains the model from
    scratch: the promotion gate compares versions on the same seeds."""
    mine = loaded.template.evaluation
    for owner in owners:
        theirs = owner.template.evaluation
        if mine is not None and theirs is not None and mine != theirs:
            return TemplateIssue(
                file=str(loaded.path), field="evaluation",
                message=f"differs from the evaluation section of {owner.path} ({owner.name!r}), "
                        f"which registers the same model {loaded.template.model.name!r}: "
                        "arf_evaluate scores every version of a model the same way (the "
                        f"promotion gate pairs them by seed). Copy {owner.name!r}'s evaluation "
                        "section, or remove this one")
    return None


def json_schema() -> dict[str, Any]:
    """JSON Schema of the template file, for editors (yaml-language-server) and CI checks."""
    schema = TrainingTemplate.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ARF training template (arf.dev/v1)"
    return schema
