"""The `prepare` step: run the dataset query and write train/val Parquet shards + a manifest.

Layout, under the run workspace (shared by every step of one DAG run)::

    prepare/
      manifest.json
      train/shard-00000.parquet ...
      val/shard-00000.parquet ...

`manifest.json` (all paths relative to `prepare/`)::

    {"query": the SQL that ran (the template's, or the trigger's `dataset_query` override),
     "rows", "train_rows", "val_rows": row counts,
     "columns": [{"name", "type"}] of every shard (Arrow type names),
     "features", "targets": column names, the template's globs resolved in result-column order,
     "tables": {table: {"version": int, "uri": str}} for every table the query read,
     "fingerprint": sha256 over the lines "<path> <shard sha256>\\n", train shards then val,
     "shards": {"train": [{"path", "rows", "sha256"}], "val": [...]} (a split with no rows
               has no shards),
     "validation_split", "seed", "created_with": {"duckdb", "pyarrow"},
     "new_rows": rows of dataset.query, "replay": null or {"query", "ratio", "rows_available",
               "rows_requested", "rows", "tables"} (see below),
     "parameters": {name: ISO time} bound to the queries ($data_interval_start, ...)}

The query (template's or trigger's), its data-interval parameters and its memory limits:
`arf_trainer.datahub.dataset_query`.

Skip: with `dataset.skip_if_empty`, a query that returns no rows raises `NothingToDo` (exit 99):
the backends skip this task and the later ones; the run is not failed. Without it, no rows is an
error as before.

Replay: with `dataset.replay: {query, ratio}`, `round(ratio x new rows)` rows of the replay
query's result (all of them if it has fewer) are sampled without replacement with a generator
seeded from the spec's seed, and appended to the new rows before the train/val split. Both
queries' tables are in "tables"; the fingerprint covers the shards of the union.

Reproducibility: the query returns rows in canonical order (see `arf_trainer.datahub.query`),
the split is a permutation drawn from the job spec's seed, and shards are written with fixed
Parquet options, so the same tables at the same versions give the same fingerprint (for the
same duckdb/pyarrow versions, which the manifest records).

Complete-or-absent: everything is built in a temporary folder inside the workspace and renamed
to `prepare/` at the end. A retried task that finds `prepare/manifest.json` checks the shards
against their hashes and reuses them without querying again.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arf_trainer.datahub.dataset_query import (
    hub_path,
    parameters_for,
    query_parameters,
    resolve_query,
    run_dataset_query,
)
from arf_trainer.datahub.tables import table_path
from arf_trainer.errors import DataHubError, NothingToDo, QueryError, SpecError
from arf_trainer.spec import StepEnv, read_json, write_json_atomic

log = logging.getLogger(__name__)

PREPARE_DIR = "prepare"
MANIFEST_NAME = "manifest.json"
_TMP_PREFIX = ".prepare-tmp-"
SHARD_ROWS = 262_144
# Fixed writer options: shard bytes (and so the fingerprint) must not depend on defaults that
# could change between runs. `created_by` still carries the pyarrow version, recorded too.
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "row_group_size": SHARD_ROWS,
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
}
_HASH_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(shards: dict[str, list[dict[str, Any]]]) -> str:
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for shard in shards[split]:
            digest.update(f"{shard['path']} {shard['sha256']}\n".encode())
    return digest.hexdigest()


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


def _split_indices(rows: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) row indices: a seeded permutation, each part kept in row order
    so that shards follow the canonical query order (trainers shuffle per epoch anyway)."""
    val_rows = int(rows * validation_split)
    order = np.random.default_rng(seed).permutation(rows)
    return np.sort(order[val_rows:]), np.sort(order[:val_rows])


def _write_split(root: Path, split: str, table: pa.Table) -> list[dict[str, Any]]:
    (root / split).mkdir(parents=True)
    shards = []
    for number, start in enumerate(range(0, table.num_rows, SHARD_ROWS)):
        relative = f"{split}/shard-{number:05d}.parquet"
        part = table.slice(start, SHARD_ROWS)
        pq.write_table(part, root / relative, **_PARQUET_OPTIONS)
        shards.append({"path": relative, "rows": part.num_rows,
                       "sha256": _sha256_file(root / relative)})
    return shards


def _summary(manifest: dict[str, Any], manifest_path: Path, reused: bool) -> dict[str, Any]:
    return {
        "rows": manifest["rows"],
        "train_rows": manifest["train_rows"],
        "val_rows": manifest["val_rows"],
        "tables": manifest["tables"],
        "fingerprint": manifest["fingerprint"],
        "manifest": str(manifest_path),
        "reused": reused,
    }


def _verify(prepared: Path, manifest: dict[str, Any]) -> None:
    for split in ("train", "val"):
        for shard in manifest["shards"][split]:
            path = prepared / shard["path"]
            if not path.is_file() or _sha256_file(path) != shard["sha256"]:
                raise DataHubError(
                    f"prepared shard {path} is missing or does not match its sha256 in "
                    f"{prepared / MANIFEST_NAME}; the workspace was modified after prepare "
                    f"finished. Delete {prepared} and retry the prepare task to rebuild it"
                )


def _tables_text(versions: dict[str, int]) -> str:
    return ", ".join(f"{n}@v{v}" for n, v in versions.items()) or "none"


def _empty(env: StepEnv, versions: dict[str, int], bound: dict[str, dt.datetime]) -> Exception:
    """The error (or, with dataset.skip_if_empty, the skip) for a query with no rows."""
    if not env.spec.dataset.get("skip_if_empty"):
        return QueryError(
            f"the dataset query returned 0 rows (tables read: {_tables_text(versions)}); there "
            "is nothing to train on. Check the WHERE clause and the pinned table versions, or "
            "set dataset.skip_if_empty: true to skip such runs instead of failing them")
    start, end = bound.get("data_interval_start"), bound.get("data_interval_end")
    when = (f"between {start.isoformat()} and {end.isoformat()} (the run's data interval, "
            "end excluded)" if start is not None and end is not None else "for this run")
    return NothingToDo(
        f"no new rows {when} in {_tables_text(versions)}: dataset.query returned 0 rows and "
        "dataset.skip_if_empty is set, so this run is skipped (nothing new to train on)")


def _with_replay(env: StepEnv, replay: dict[str, Any], new: pa.Table, pins: dict[str, int],
                 values: dict[str, dt.datetime | None],
                 seed: int) -> tuple[pa.Table, dict[str, Any], dict[str, int]]:
    """`new` followed by round(ratio x new rows) seeded samples of the replay query's rows."""
    query, ratio = replay["query"], float(replay["ratio"])
    if not ratio > 0:
        raise SpecError(f"dataset.replay.ratio={ratio!r} must be above 0, e.g. 1.0")
    old, versions = run_dataset_query(env, "dataset.replay.query", query, pins, values)
    missing = [c for c in new.column_names if c not in old.column_names]
    extra = [c for c in old.column_names if c not in new.column_names]
    if missing or extra:
        raise SpecError(
            "dataset.replay.query must return the same columns as dataset.query (the rows are "
            f"stacked); missing: {missing or 'none'}, extra: {extra or 'none'}. Select the same "
            "columns in both queries (e.g. list them explicitly instead of *)")
    try:
        old = old.select(new.column_names).cast(new.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise SpecError(f"dataset.replay.query's columns do not convert to dataset.query's "
                        f"types ({exc}); CAST them in the replay query") from exc
    wanted = round(ratio * new.num_rows)
    take = min(wanted, old.num_rows)
    if take < wanted:
        log.warning("dataset.replay asks for %d rows (ratio %g x %d new rows) but its query "
                    "returned %d; replaying all of them", wanted, ratio, new.num_rows, old.num_rows)
    # Its own stream (seed, 1): the train/val split keeps drawing from default_rng(seed).
    picked = np.sort(np.random.default_rng([seed, 1]).choice(old.num_rows, size=take,
                                                             replace=False))
    combined = pa.concat_tables([new, old.take(pa.array(picked, type=pa.int64()))])
    info = {"query": query, "ratio": ratio, "rows_available": old.num_rows,
            "rows_requested": wanted, "rows": take,
            "tables": {n: v for n, v in versions.items()}}
    log.info("replay: %d of %d rows from %s added to %d new rows", take, old.num_rows,
             _tables_text(versions), new.num_rows)
    return combined, info, versions


def _build(env: StepEnv, root: Path) -> dict[str, Any]:
    """Query, split, write shards + manifest into `root` (a fresh folder); return the manifest."""
    dataset = env.spec.dataset
    hub = hub_path(env)
    query = resolve_query(env)
    pins = dict(dataset.get("tables") or {})
    values = query_parameters(env)
    result, versions = run_dataset_query(env, "dataset.query", query, pins, values)
    if result.num_rows == 0:
        raise _empty(env, versions, parameters_for("dataset.query", query, values))
    new_rows, replay_info = result.num_rows, None
    if dataset.get("replay"):
        result, replay_info, replay_versions = _with_replay(env, dataset["replay"], result, pins,
                                                            values, env.spec.seed)
        versions = {**replay_versions, **versions}
    columns = result.column_names
    features = resolve_columns("dataset.features", dataset["features"], columns)
    targets = resolve_columns("dataset.targets", dataset["targets"], columns)
    both = [c for c in features if c in targets]
    if both:
        raise SpecError(
            f"column(s) {', '.join(both)} are both in dataset.features and dataset.targets; "
            "a model must not be given its own target as input: narrow one of the patterns"
        )
    split = float(dataset.get("validation_split", 0.0))
    if not 0.0 <= split < 1.0:
        raise SpecError(f"dataset.validation_split={split!r} must be in [0, 1), e.g. 0.1")
    train_idx, val_idx = _split_indices(result.num_rows, split, env.spec.seed)
    shards = {
        "train": _write_split(root, "train", result.take(pa.array(train_idx))),
        "val": _write_split(root, "val", result.take(pa.array(val_idx))),
    }
    manifest = {
        "query": query,
        "rows": result.num_rows,
        "train_rows": len(train_idx),
        "val_rows": len(val_idx),
        "columns": [{"name": f.name, "type": str(f.type)} for f in result.schema],
        "features": features,
        "targets": targets,
        "tables": {name: {"version": version, "uri": table_path(hub, name).resolve().as_uri()}
                   for name, version in versions.items()},
        "fingerprint": _fingerprint(shards),
        "shards": shards,
        "validation_split": split,
        "seed": env.spec.seed,
        "created_with": {"duckdb": duckdb.__version__, "pyarrow": pa.__version__},
        "new_rows": new_rows,
        "replay": replay_info,
        "parameters": {name: value.isoformat() for name, value in values.items()
                       if value is not None},
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def run_prepare(env: StepEnv) -> dict[str, Any]:
    """Run the prepare step for `env`; return the manifest summary (also the step result)."""
    prepared = env.workspace / PREPARE_DIR
    manifest_path = prepared / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        _verify(prepared, manifest)
        log.info("reusing %s from an earlier try: %d rows, fingerprint %s", manifest_path,
                 manifest["rows"], manifest["fingerprint"][:12])
        return _summary(manifest, manifest_path, reused=True)

    env.workspace.mkdir(parents=True, exist_ok=True)
    # Leftovers of tries that died mid-build; only ever complete folders are named `prepare/`.
    for stale in env.workspace.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if prepared.exists():  # a `prepare/` without a manifest was not written by this step
        shutil.rmtree(prepared)
    tmp = env.workspace / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _build(env, tmp)
        try:
            os.rename(tmp, prepared)
        except OSError:
            if not manifest_path.is_file():
                raise
            # Another try of this task finished first; its result is equivalent.
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = read_json(manifest_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tables = ", ".join(f"{n}@v{t['version']}" for n, t in manifest["tables"].items())
    log.info("prepared %d rows (%d train / %d val) from %s; %d features -> %d targets; "
             "fingerprint %s", manifest["rows"], manifest["train_rows"], manifest["val_rows"],
             tables or "no tables", len(manifest["features"]), len(manifest["targets"]),
             manifest["fingerprint"][:12])
    return _summary(manifest, manifest_path, reused=False)
