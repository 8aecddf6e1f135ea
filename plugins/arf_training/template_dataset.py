"""The dataset section's layout fields: how prepare splits and orders the query result.

`templates.Dataset` inherits them (kept here so that the shared schema module stays small). Only
pydantic is imported: this runs on every DAG parse. Whether the named columns exist is known
only once the query runs, so the prepare step checks that and names the columns it found.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DatasetLayout(BaseModel):
    """`dataset.split_by` and `dataset.order_by`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split_by: str | None = Field(
        None, min_length=1, max_length=255,
        description="Split train/validation by this column's groups instead of by rows, e.g. "
                    "episode: every row of a group goes to the same side, chosen by a seeded "
                    "hash of the group's value (stable when rows are appended; about "
                    "validation_split of the groups go to validation). Without it, rows are "
                    "split one by one (tabular data).")
    order_by: list[str] | None = Field(
        None, min_length=1,
        description="Columns that order the result uniquely, e.g. [episode, step]: prepare sorts "
                    "by them (spilling to disk, never the whole result in memory) so that shards "
                    "and their fingerprint are reproducible. Without it the result is sorted by "
                    "all its columns, which is slower on wide or large results.")

    @field_validator("order_by")
    @classmethod
    def _distinct_names(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        blank = [n for n in names if not n.strip()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if blank or repeated:
            raise ValueError(
                f"dataset.order_by={names!r} must list distinct column names "
                f"({'an empty name' if blank else 'repeated: ' + ', '.join(repeated)}); "
                "write each column once, e.g. [episode, step]")
        return names
