"""The sections of a training template (one pydantic model each, `extra="forbid"`, frozen):
metadata, hyperparameters, dataset, model, training, resources, evaluation and the HPO search.
`templates.TrainingTemplate` puts them together and checks how they fit each other.

Only pydantic here: it runs on every DAG parse.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arf_training.template_dataset import DatasetLayout
from arf_training.template_gate import Gate, check_gate
from arf_training.template_query import _check_query_size, _check_single_select

# Hyperparameters each built-in recipe understands (the container side checks them again).
RECIPE_HYPERPARAMETERS: dict[str, frozenset[str]] = {
    "bc": frozenset({"epochs", "batch_size", "lr", "hidden_size", "num_layers", "weight_decay"}),
    "classifier": frozenset({"epochs", "batch_size", "lr", "hidden_size", "num_layers", "weight_decay"}),
    "bc_pixels": frozenset({"epochs", "batch_size", "lr", "hidden_size", "num_layers", "weight_decay",
                            "random_shift"}),
}
# What each built-in recipe cannot run without (arf_trainer's Hyperparameters.REQUIRED): found
# when the template is read, not by the train step after prepare has run.
RECIPE_REQUIRED = ("epochs", "batch_size", "lr")
# Kubernetes resource quantities (the subset people write): 500m, 2, 1.5, 512Mi, 2Gi, 1G.
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Section):
    """Who owns the template and how it shows in the Airflow UI."""

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,62}$",
        description="Template name; also the DAG id. Lower-case letters, digits and '_'.",
    )
    description: str = Field("", description="Markdown shown as the DAG's documentation.")
    # Airflow stores a DAG's owners in a 2000-character column: a longer one fails the whole
    # DAG file's write to its database.
    owner: str = Field("arf", min_length=1, max_length=200,
                       description="Owning team, shown in the DAG list (200 characters at most).")
    # Airflow refuses a tag over 100 characters (TAG_MAX_LEN) when the DAG is built.
    tags: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, description="DAG tags for filtering in the UI (100 characters each).")

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


# NaN passes every bound check (`nan < x` is false) and the JSON of the trigger form cannot hold
# NaN or infinities; a NaN default also fails the Param's own check when the DAG is built.
_Finite = Annotated[float, Field(allow_inf_nan=False)]


class NumberHyperparameter(_HyperparameterBase):
    """A real-valued hyperparameter (finite: YAML's .nan and .inf are refused)."""

    type: Literal["number"]
    default: _Finite = Field(description="Value used when the trigger conf does not set it.")
    minimum: _Finite | None = Field(None, description="Smallest accepted value.")
    maximum: _Finite | None = Field(None, description="Largest accepted value.")
    enum: list[_Finite] | None = Field(None, description="If set, the only accepted values.")

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


# Options of the built-in recipes' own training loop: a custom command and the federated sites'
# loop do not read them, so a template that sets them there is refused.
LOOP_OPTIONS = ("precision", "compile", "deterministic", "async_checkpoint")


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
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Built-in recipes: 'bf16' runs the forward pass and loss under "
                    "torch.autocast(dtype=bfloat16) on the run's device (GPU or CPU); weights and "
                    "optimizer stay float32. The run's record says whether it is bitwise "
                    "reproducible.")
    compile: bool = Field(
        False, strict=True,
        description="Built-in recipes: train the model through torch.compile (slower start, "
                    "faster steps on a GPU). The run's record says whether it is bitwise "
                    "reproducible.")
    deterministic: bool = Field(
        True, strict=True,
        description="Built-in recipes: true (the default) enforces deterministic kernels "
                    "(torch.use_deterministic_algorithms, a fixed cuBLAS workspace), so a rerun "
                    "gives the same weights bit for bit. false trades that for speed on a GPU "
                    "(fastest kernels, cuDNN autotuning); the run is then recorded as not "
                    "bitwise reproducible.")
    async_checkpoint: bool = Field(
        False, strict=True,
        description="Built-in recipes: write the periodic checkpoints in a background thread "
                    "(the loop only copies the state to CPU memory and trains on), like "
                    "torchtitan's async checkpointing; each is still complete-or-absent, and the "
                    "final one is written before the step ends. Same weights either way.")

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
                "set exactly one of 'recipe' (bc, classifier, bc_pixels) or 'command' (image + "
                "command)"
            )
        if self.recipe is not None:
            unknown = sorted(set(self.hyperparameters) - RECIPE_HYPERPARAMETERS[self.recipe])
            if unknown:
                raise ValueError(
                    f"recipe {self.recipe!r} has no hyperparameter(s) {unknown}; it accepts "
                    f"{sorted(RECIPE_HYPERPARAMETERS[self.recipe])}"
                )
            missing = [n for n in RECIPE_REQUIRED if n not in self.hyperparameters]
            if missing:
                raise ValueError(
                    f"recipe {self.recipe!r} needs hyperparameter(s) {missing} declared in "
                    "training.hyperparameters (each with a default, or given by every trigger), "
                    "e.g. epochs: {type: integer, default: 30}, batch_size: {type: integer, "
                    "default: 64}, lr: {type: number, default: 0.001}"
                )
        elif changed := self.loop_options_set():
            raise ValueError(
                f"training.{', '.join(changed)} apply to the built-in recipes only; a custom "
                "command sets its own precision, compilation, determinism and checkpointing: "
                "remove them from 'training'"
            )
        return self

    @property
    def max_seed(self) -> int:
        """Largest seed (template or trigger conf): the trainer seeds numpy with seed + rank,
        which must stay below 2**32 (arf_trainer.trainer.config checks it again)."""
        return 2**32 - 1 - self.distributed.world_size

    @model_validator(mode="after")
    def _seed_range(self) -> "Training":
        if self.seed > self.max_seed:
            raise ValueError(f"training.seed={self.seed} is above {self.max_seed} (2**32 - 1 - "
                             "world size: numpy's seed range, with one seed per process); pick "
                             "a smaller seed, e.g. 0")
        return self

    def loop_options_set(self) -> list[str]:
        """`name: value` of each LOOP_OPTIONS field set to other than its default."""
        fields = type(self).model_fields
        return [f"{name}: {str(getattr(self, name)).lower()}" for name in LOOP_OPTIONS
                if getattr(self, name) != fields[name].default]


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


# Params the factory adds next to the hyperparameters; hyperparameters may not take these names
# (a step takes `nightly_recipe` out of the values it passes on as hyperparameters).
RESERVED_PARAMS = frozenset({"seed", "dataset_query", "nightly_recipe"})
