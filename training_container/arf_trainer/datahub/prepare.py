"""The `prepare` step: run the dataset query and write train/val Parquet shards + a manifest.

Layout, under the run workspace (shared by every step of one DAG run)::

    prepare/
      manifest.json
      train/shard-00000.parquet ...
      val/shard-00000.parquet ...

`manifest.json` (all paths relative to `prepare/`)::

    {"query": the SQL that ran (the template's, or the trigger's `dataset_query` override),
     "rows", "train_rows", "val_rows": row counts,
     "columns": [{"name", "type", "dtype", "shape"}] of every shard, in shard order: "type" is
               Arrow's type text; "dtype" the NumPy dtype of a number/bool column's elements
               (null otherwise); "shape" [] for a scalar, e.g. [7] for FLOAT[7] or [64, 64, 3]
               for UTINYINT[64][64][3] (Arrow fixed_size_list, nested, stored as such in the
               shards), null for a column without a fixed shape. Features and targets always
               have one. E.g. {"name": "image", "type": "fixed_size_list<...>[64]",
               "dtype": "uint8", "shape": [64, 64, 3]} (`arf_trainer.datahub.shards`),
     "features", "targets": column names, the template's globs resolved in result-column order,
     "tables": {table: {"version": int, "uri": str}} for every table the query read,
     "fingerprint": sha256 over the lines "<path> <shard sha256>\\n", train shards then val,
     "shards": {"train": [{"path", "rows", "sha256"}], "val": [...]} (a split with no rows
               has no shards),
     "validation_split", "split_by" (a column or null), "order_by" (columns or null), "seed",
     "created_with": {"duckdb", "pyarrow"} (and "pillow" when decoding, "simplejpeg" for
               JPEG), "decode": null or {column: {"format", "shape"}} (`dataset.decode`),
     "new_rows": rows of dataset.query, "replay": null or {"query", "ratio", "rows_available",
               "rows_requested", "rows", "tables"} (see below),
     "parameters": {name: ISO time} bound to the queries ($data_interval_start, ...)}

The query (template's or trigger's), its data-interval parameters and its memory limits:
`arf_trainer.datahub.dataset_query`.

Skip: with `dataset.skip_if_empty`, a query that returns no rows raises `NothingToDo` (exit 99):
the backends skip this task and the later ones; the run is not failed. Without it, no rows is an
error as before.

Bounded memory: the result is never held whole. DuckDB sorts it into its canonical order
(spilling into a folder of the workspace, `arf_trainer.datahub.stream`), the rows stream out in
batches, each row goes to train or val as it passes (`arf_trainer.datahub.split`) and into
that split's Parquet writer, which holds one row group (`arf_trainer.datahub.shards`); each
shard is hashed when it is closed. DuckDB gets an eighth of `resources.memory` (dataset_query).

Split: with `dataset.split_by: <column>` (e.g. episode), whole groups go to train or val by a
seeded hash of the group's value, stable when rows are appended (about validation_split of the
groups). Without it, exactly int(rows x validation_split) rows, chosen uniformly from the
spec's seed (a count query gives the total first).

Order: by `dataset.order_by` (a unique key, e.g. [episode, step]; a repeated key is an error),
else by every column (`ORDER BY ALL`, slower on wide results).

Decode: each `dataset.decode` column (encoded image bytes) is decoded batch by batch as the
rows of either query stream, before the shards (`arf_trainer.datahub.decode`).

Replay: with `dataset.replay: {query, ratio}`, `round(ratio x new rows)` rows of the replay
query's result (all of them if it has fewer) are sampled without replacement with a generator
seeded from the spec's seed, and appended to the new rows before the train/val split. Both
queries' tables are in "tables"; the fingerprint covers the shards of the union.

Reproducibility: rows come in canonical order, the split and samples depend only on the seed
and the rows (never on how DuckDB batches them), and shards are written with fixed row-group
sizes and Parquet options, so the same tables at the same versions and the same dataset
section give the same fingerprint (for the same duckdb/pyarrow versions, which the manifest
records).

Complete-or-absent: everything is built in a temporary folder inside the workspace and renamed
to `prepare/` at the end. A retried task that finds `prepare/manifest.json` checks the shards
against their hashes and reuses them without querying again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from arf_trainer.datahub.arrow_types import unsliced_batch
from arf_trainer.datahub.columns import as_main, check_replay_columns, check_result
from arf_trainer.datahub.dataset_query import (
    hub_path,
    open_dataset_query,
    parameters_for,
    query_parameters,
    resolve_query,
)
from arf_trainer.datahub.decode import Decoders
from arf_trainer.datahub.prepare_result import REQUEST_KEY, request_sha256, step_result
from arf_trainer.datahub.shards import ShardWriter, describe_column, layout, sha256_file
from arf_trainer.datahub.split import ExactSample, GroupSplit
from arf_trainer.datahub.stream import QuerySource
from arf_trainer.datahub.tables import table_path
from arf_trainer.errors import DataHubError, NothingToDo, QueryError, SpecError
from arf_trainer.spec import StepEnv, read_json, write_json_atomic

log = logging.getLogger(__name__)

PREPARE_DIR = "prepare"
MANIFEST_NAME = "manifest.json"
_TMP_PREFIX = ".prepare-tmp-"


def _fingerprint(shards: dict[str, list[dict[str, Any]]]) -> str:
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for shard in shards[split]:
            digest.update(f"{shard['path']} {shard['sha256']}\n".encode())
    return digest.hexdigest()


def _verify(prepared: Path, manifest: dict[str, Any]) -> None:
    for split in ("train", "val"):
        for shard in manifest["shards"][split]:
            path = prepared / shard["path"]
            if not path.is_file() or sha256_file(path) != shard["sha256"]:
                raise DataHubError(
                    f"prepared shard {path} is missing or does not match its sha256 in "
                    f"{prepared / MANIFEST_NAME}; the workspace was modified after prepare "
                    f"finished. Delete {prepared} and retry the prepare task to rebuild it"
                )


def _set_aside(prepared: Path, request: str) -> None:
    """Move a prepared folder that answers another request out of the way, kept (its rows may
    be what an earlier model trained on) but never reused."""
    aside = prepared.with_name(f"{PREPARE_DIR}.request-{request[:12]}")
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:8]}")
    os.rename(prepared, aside)
    log.warning("%s was prepared for another request (the dataset section, query, seed, data "
                "interval or site differ: the template changed, or this run id was used by an "
                "earlier DagRun); it is kept as %s and the data is prepared again. Delete %s "
                "once nothing needs it", prepared, aside, aside)


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


def _replay_source(env: StepEnv, replay: dict[str, Any], schema: pa.Schema, pins: dict[str, int],
                   values: dict[str, dt.datetime | None], spill: Path) -> QuerySource:
    """The replay query, checked to return dataset.query's columns (in any order) and types."""
    ratio = float(replay["ratio"])
    if not ratio > 0:
        raise SpecError(f"dataset.replay.ratio={ratio!r} must be above 0, e.g. 1.0")
    old = open_dataset_query(env, "dataset.replay.query", replay["query"], pins, values, spill)
    check_replay_columns(schema, old.schema())
    return old


def _drain(batches: Iterator[pa.RecordBatch], writers: dict[str, ShardWriter], side: Any,
           decode: Any, pick: ExactSample | None = None) -> int:
    """Write `batches` (only the `pick`ed rows, if given; `decode`d: (batch, each row's position
    in the stream) -> batch) into train/val; return rows written."""
    rows = seen = 0
    for batch in batches:
        batch = unsliced_batch(batch)  # filter misreads sliced nested arrays (arrow_types)
        positions = np.arange(seen, seen + batch.num_rows)
        seen += batch.num_rows
        if pick is not None:
            keep = pick.mask(batch.num_rows)
            batch, positions = batch.filter(pa.array(keep)), positions[keep]
        batch = decode(batch, positions)
        val = side(batch)
        writers["val"].write(batch.filter(pa.array(val)))
        writers["train"].write(batch.filter(pa.array(~val)))
        rows += batch.num_rows
    return rows


def _streams(env: StepEnv, root: Path, spill: Path, query: str) -> dict[str, Any]:
    """Stream dataset.query (and its replay) into train/val shards; the manifest's data part."""
    dataset = env.spec.dataset
    split = float(dataset.get("validation_split", 0.0))
    if not 0.0 <= split < 1.0:
        raise SpecError(f"dataset.validation_split={split!r} must be in [0, 1), e.g. 0.1")
    # Format video holds videos open between batches: closed however the stream ends.
    decoders = Decoders(dataset.get("decode"), dataset.get("order_by") or None, env.datahub)
    try:
        return _streamed(env, root, spill, query, decoders)
    finally:
        decoders.close()


def _streamed(env: StepEnv, root: Path, spill: Path, query: str,
              decoders: Decoders) -> dict[str, Any]:
    dataset, seed = env.spec.dataset, env.spec.seed
    pins, values = dict(dataset.get("tables") or {}), query_parameters(env)
    split = float(dataset.get("validation_split", 0.0))
    order_by, split_by = dataset.get("order_by") or None, dataset.get("split_by")
    replay = dataset.get("replay")
    new = open_dataset_query(env, "dataset.query", query, pins, values, spill)
    schema = new.schema()
    features, targets = check_result(dataset, schema, decoders)

    def empty() -> Exception:
        return _empty(env, new.versions, parameters_for("dataset.query", query, values))

    old, available, side = None, 0, None
    if split_by is None:  # the exact row split needs the total before the first row
        counted = new.count()
        if counted == 0:
            raise empty()
        if replay:
            old = _replay_source(env, replay, schema, pins, values, spill)
            available = old.count()
        total = counted + (min(round(float(replay["ratio"]) * counted), available) if old else 0)
        sample = ExactSample(total, int(total * split), seed, "dataset.query")
        side = lambda batch: sample.mask(batch.num_rows)  # noqa: E731
    else:
        side = GroupSplit(split_by, split, seed).mask
    # The row's width as decoded (before a downscale): what a batch holds while it decodes.
    batch_rows = min(65_536, layout(decoders.schema(schema, stored=False))[0])
    with new.stream(order_by, batch_rows) as (schema, batches):
        shard_schema = decoders.schema(schema)
        writers = {name: ShardWriter(root, name, shard_schema) for name in ("train", "val")}
        new_rows = _drain(batches, writers, side,
                          partial(decoders.batch, schema=shard_schema, what="dataset.query"))
    if new_rows == 0:
        raise empty()
    versions, replay_info = new.versions, None
    if replay:
        if old is None:
            old = _replay_source(env, replay, schema, pins, values, spill)
            available = old.count()
        decode_old = partial(decoders.batch, schema=shard_schema, what="dataset.replay.query")
        replay_info = _replay(old, replay, new_rows, available, seed, order_by, batch_rows,
                              schema, writers, side, decode_old)
        versions = {**old.versions, **versions}
    shards = {name: writer.close() for name, writer in writers.items()}
    return {"versions": versions, "schema": shard_schema, "decoders": decoders,
            "features": features, "targets": targets, "shards": shards, "new_rows": new_rows,
            "replay": replay_info, "split": split, "values": values}


def _replay(old: QuerySource, replay: dict[str, Any], new_rows: int, available: int, seed: int,
            order_by: list[str] | None, batch_rows: int, schema: pa.Schema,
            writers: dict[str, ShardWriter], side: Any, decode: Any) -> dict[str, Any]:
    """round(ratio x new rows) seeded samples of the replay rows, appended to the new rows."""
    ratio = float(replay["ratio"])
    wanted = round(ratio * new_rows)
    take = min(wanted, available)
    if take < wanted:
        log.warning("dataset.replay asks for %d rows (ratio %g x %d new rows) but its query "
                    "returned %d; replaying all of them", wanted, ratio, new_rows, available)
    # Its own stream (seed, 1): the row split draws from default_rng(seed).
    pick = ExactSample(available, take, [seed, 1], "dataset.replay.query")
    with old.stream(order_by, batch_rows) as (_, batches):
        rows = _drain(as_main(batches, schema), writers, side, decode, pick)
    log.info("replay: %d of %d rows from %s added to %d new rows", rows, available,
             _tables_text(old.versions), new_rows)
    return {"query": replay["query"], "ratio": ratio, "rows_available": available,
            "rows_requested": wanted, "rows": rows, "tables": old.versions}


def _build(env: StepEnv, root: Path, spill: Path, query: str, request: str) -> dict[str, Any]:
    """Query, split, write shards + manifest into `root` (a fresh folder); return the manifest."""
    data = _streams(env, root, spill, query)
    shards = data["shards"]
    train_rows = sum(s["rows"] for s in shards["train"])
    val_rows = sum(s["rows"] for s in shards["val"])
    dataset = env.spec.dataset
    if train_rows == 0:  # whole groups: a few large ones may all land on the validation side
        raise DataHubError(
            f"the split left no training rows: all {val_rows} rows went to validation "
            f"(dataset.validation_split {data['split']}, split_by "
            f"{dataset.get('split_by') or 'none'}); lower dataset.validation_split, or query "
            "more episodes (groups), so that some go to training")
    manifest = {
        REQUEST_KEY: request,
        "query": query,
        "rows": train_rows + val_rows,
        "train_rows": train_rows,
        "val_rows": val_rows,
        "columns": [describe_column(field) for field in data["schema"]],
        "features": data["features"],
        "targets": data["targets"],
        "tables": {name: {"version": version,
                          "uri": table_path(hub_path(env), name).resolve().as_uri()}
                   for name, version in data["versions"].items()},
        "fingerprint": _fingerprint(shards),
        "shards": shards,
        "validation_split": data["split"],
        "split_by": dataset.get("split_by"),
        "order_by": dataset.get("order_by") or None,
        "seed": env.spec.seed,
        "created_with": {"duckdb": duckdb.__version__, "pyarrow": pa.__version__,
                         **data["decoders"].versions()},
        "decode": data["decoders"].manifest(),
        "new_rows": data["new_rows"],
        "replay": data["replay"],
        "parameters": {name: value.isoformat() for name, value in data["values"].items()
                       if value is not None},
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def run_prepare(env: StepEnv) -> dict[str, Any]:
    """Run the prepare step for `env`; return the manifest summary (also the step result),
    with the manifest's metadata (`prepare_result`) when `env` is a federated site's prepare."""
    prepared = env.workspace / PREPARE_DIR
    manifest_path = prepared / MANIFEST_NAME
    site = env.spec.inputs.get("site")  # set by the Airflow side's federation.site_spec
    query = resolve_query(env)
    request = request_sha256(env.spec, query)
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get(REQUEST_KEY, request) == request:  # absent: an older prepare's
            _verify(prepared, manifest)
            log.info("reusing %s from an earlier try: %d rows, fingerprint %s", manifest_path,
                     manifest["rows"], manifest["fingerprint"][:12])
            return step_result(manifest, manifest_path, reused=True, site=site)
        _set_aside(prepared, manifest[REQUEST_KEY])

    env.workspace.mkdir(parents=True, exist_ok=True)
    # Leftovers of tries that died mid-build; only ever complete folders are named `prepare/`.
    for stale in env.workspace.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if prepared.exists():  # a `prepare/` without a manifest was not written by this step
        shutil.rmtree(prepared)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = env.workspace / f"{_TMP_PREFIX}{token}"
    # DuckDB's spill files: inside the workspace (its volume, not the container's disk), beside
    # the output rather than in it, and removed whatever happens.
    spill = env.workspace / f"{_TMP_PREFIX}spill-{token}"
    tmp.mkdir()
    spill.mkdir()
    try:
        manifest = _build(env, tmp, spill, query, request)
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
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    tables = ", ".join(f"{n}@v{t['version']}" for n, t in manifest["tables"].items())
    log.info("prepared %d rows (%d train / %d val) from %s; %d features -> %d targets; "
             "fingerprint %s", manifest["rows"], manifest["train_rows"], manifest["val_rows"],
             tables or "no tables", len(manifest["features"]), len(manifest["targets"]),
             manifest["fingerprint"][:12])
    return step_result(manifest, manifest_path, reused=False, site=site)
