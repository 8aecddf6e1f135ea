"""The dataset's features, targets and split column, checked against the query's result columns.

Names or fnmatch globs (`dataset.features: ['obs_*']`) resolve in result-column order; every
feature and target must be a scalar or a fixed-shape array (`arf_trainer.datahub.shards`). The
prepare step checks them once the query's schema is known, before any row is read (with
`dataset.decode` columns already given their decoded type).
"""

from __future__ import annotations

import fnmatch
from typing import Any

import pyarrow as pa

from arf_trainer.datahub.shards import check_fixed_shape
from arf_trainer.errors import SpecError


def resolve_columns(field: str, patterns: list[str], columns: list[str]) -> list[str]:
    """Names matching `patterns` (names or fnmatch globs): patterns in order, each one's matches
    in result-column order, without repeats. A pattern that matches nothing is an error."""
    if not isinstance(patterns, list) or not patterns:
        raise SpecError(f"{field} must be a non-empty list of column names or globs, "
                        f"got {patterns!r}")
    resolved: list[str] = []
    for pattern in patterns:
        matches = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
        if not matches:
            raise SpecError(
                f"{field} entry {pattern!r} matches no column of the query result; columns: "
                f"{', '.join(columns)}. Fix the name or glob (case-sensitive; e.g. 'obs_*'), "
                "or select the column in dataset.query"
            )
        resolved.extend(c for c in matches if c not in resolved)
    return resolved


def check_columns(dataset: dict[str, Any], schema: pa.Schema) -> tuple[list[str], list[str]]:
    """The resolved (features, targets); split_by and every such column checked against `schema`."""
    columns = schema.names
    features = resolve_columns("dataset.features", dataset["features"], columns)
    targets = resolve_columns("dataset.targets", dataset["targets"], columns)
    both = [c for c in features if c in targets]
    if both:
        raise SpecError(
            f"column(s) {', '.join(both)} are both in dataset.features and dataset.targets; "
            "a model must not be given its own target as input: narrow one of the patterns"
        )
    split_by = dataset.get("split_by")
    if split_by is not None and split_by not in columns:
        raise SpecError(
            f"dataset.split_by is {split_by!r}, not a column of the query result; columns: "
            f"{', '.join(columns)}. Select the group column (e.g. episode) in dataset.query, "
            "or fix the name (case-sensitive)")
    check_fixed_shape(schema, "dataset.features", features)
    check_fixed_shape(schema, "dataset.targets", targets)
    return features, targets
