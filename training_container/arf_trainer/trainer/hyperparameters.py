"""The hyperparameters of the built-in recipes, parsed from the job spec with an error that
names the bad one and how to fix it (the template check on the Airflow side names them first;
this is the check of record)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from arf_trainer.errors import TrainingError

# DrQ shifts 84x84 frames by up to 4 pixels; 32 covers a quarter of a 128-pixel side.
MAX_RANDOM_SHIFT = 32


@dataclass(frozen=True)
class Hyperparameters:
    """The hyperparameters of the built-in recipes (template `training.hyperparameters`)."""

    epochs: int
    batch_size: int
    """Global batch: samples per optimizer step summed over all DDP ranks."""
    lr: float
    hidden_size: int = 64
    num_layers: int = 2
    weight_decay: float = 0.0
    random_shift: int = 0
    """bc_pixels only: shift each training frame by up to this many pixels (`augment`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr")
    INTEGERS: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "hidden_size", "num_layers")
    # Recipe-specific names: {name: the recipes that take it}.
    ONLY: ClassVar[dict[str, tuple[str, ...]]] = {"random_shift": ("bc_pixels",)}

    @classmethod
    def accepted(cls, recipe: str) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if recipe in cls.ONLY.get(f.name, (recipe,)))

    @classmethod
    def parse(cls, recipe: str, raw: Mapping[str, Any]) -> "Hyperparameters":
        accepted = cls.accepted(recipe)
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            only = [f"{n!r} is for recipe {', '.join(cls.ONLY[n])} only" for n in unknown
                    if n in cls.ONLY]
            raise TrainingError(
                f"hyperparameter {', '.join(map(repr, unknown))} is not accepted by the "
                f"built-in recipe {recipe!r}{' (' + '; '.join(only) + ')' if only else ''}; "
                f"accepted names: {', '.join(accepted)}. Remove it from the template's "
                "training.hyperparameters (or the trigger conf), or use a custom "
                "training.command"
            )
        missing = [name for name in cls.REQUIRED if name not in raw]
        if missing:
            raise TrainingError(
                f"hyperparameter {missing[0]!r} is required by the built-in recipe {recipe!r} "
                "but has no value; declare it with a default in training.hyperparameters"
            )
        values: dict[str, Any] = {}
        for name, value in raw.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if name in cls.INTEGERS:
                ok, need = is_number and isinstance(value, int) and value >= 1, "an integer >= 1"
            elif name == "random_shift":
                ok = is_number and isinstance(value, int) and 0 <= value <= MAX_RANDOM_SHIFT
                need = f"a whole number of pixels from 0 (off) to {MAX_RANDOM_SHIFT}"
            elif name == "weight_decay":
                ok, need = is_number and 0 <= value < math.inf, "a finite number >= 0"
            else:  # lr
                ok, need = is_number and 0 < value < math.inf, "a finite number > 0"
            if not ok:
                raise TrainingError(
                    f"hyperparameter {name}={value!r} is invalid for recipe {recipe!r}: it must "
                    f"be {need}; fix the template default or the trigger conf"
                )
            values[name] = value if name in (*cls.INTEGERS, "random_shift") else float(value)
        return cls(**values)

    def per_rank_batch_size(self, world_size: int) -> int:
        """Split the global batch evenly over the ranks, or say how to fix it."""
        if self.batch_size % world_size:
            lower = self.batch_size - self.batch_size % world_size
            raise TrainingError(
                f"hyperparameter batch_size={self.batch_size} is the global batch and must be "
                f"divisible by the world size {world_size} (nodes x procs_per_node); use "
                f"{lower or world_size} or {lower + world_size}, or change training.distributed"
            )
        return self.batch_size // world_size
