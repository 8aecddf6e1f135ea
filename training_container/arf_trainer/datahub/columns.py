"""The dataset section (features, targets, split_by, decode, order_by, replay) checked against
the query's result columns.

Names or fnmatch globs (`dataset.features: ['obs_*']`) resolve in result-column order; every
feature and target must be a scalar or a fixed-shape array (`arf_trainer.datahub.shards`). The
prepare step checks them once the query's schema is known, before any row is read (with
`dataset.decode` columns already given their decoded type: `check_result`), the `order_by`
columns when it sorts, and the replay query's columns against the main query's.

One implementation for both sides: `arf templates lint --hub` runs these same functions on the
queries' zero-row results (`arf_training.cli_templates`), so a template that lints clean does
not fail prepare on a column, and the messages are the same.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
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


def check_result(dataset: dict[str, Any], schema: pa.Schema,
                 decoders: Any) -> tuple[list[str], list[str]]:
    """What prepare checks on dataset.query's result `schema` before any row is read: each
    `dataset.decode` column's type (`decoders`, the run's `arf_trainer.datahub.decode.Decoders`),
    then `check_columns` over the columns as decoded; the resolved (features, targets).

    `arf templates lint --hub` calls this too, on the query's zero-row result, so that lint
    and prepare cannot disagree about a template's columns."""
    return check_columns(dataset, decoders.schema(schema))


def check_order_by(order_by: list[str], columns: list[str], what: str) -> None:
    """Every `dataset.order_by` column is a column of `what`'s result (before the sort)."""
    missing = [c for c in order_by if c not in columns]
    if missing:
        raise SpecError(
            f"dataset.order_by names {', '.join(missing)}, not a column of the "
            f"result of {what}; columns: {', '.join(columns)}. "
            "Fix the name (case-sensitive) or select the column in the query")


def check_scalar_keys(order_by: list[str], schema: pa.Schema) -> None:
    """The `dataset.order_by` columns of `schema` are scalars: the sorted stream compares each
    row's key with the row before it to refuse a repeated key (`arf_trainer.datahub.stream`)."""
    nested = [c for c in order_by if pa.types.is_nested(schema.field(c).type)]
    if nested:
        raise SpecError(f"dataset.order_by column(s) {', '.join(nested)} hold arrays or "
                        "structs; order by scalar columns (e.g. [episode, step])")


def check_replay_columns(schema: pa.Schema, replay_schema: pa.Schema) -> None:
    """dataset.replay.query's result (`replay_schema`) has dataset.query's columns (`schema`),
    in any order, of types that convert to theirs: the two results are stacked."""
    missing = [c for c in schema.names if c not in replay_schema.names]
    extra = [c for c in replay_schema.names if c not in schema.names]
    if missing or extra:
        raise SpecError(
            "dataset.replay.query must return the same columns as dataset.query (the rows are "
            f"stacked); missing: {missing or 'none'}, extra: {extra or 'none'}. Select the same "
            "columns in both queries (e.g. list them explicitly instead of *)")
    list(as_main([pa.RecordBatch.from_pylist([], schema=replay_schema)], schema))  # convert?


def as_main(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Replay batches in dataset.query's column order and types (`schema`)."""
    try:
        for batch in batches:
            yield pa.RecordBatch.from_arrays(
                [batch.column(field.name).cast(field.type) for field in schema], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise SpecError(f"dataset.replay.query's columns do not convert to dataset.query's "
                        f"types ({exc}); CAST them in the replay query") from exc
