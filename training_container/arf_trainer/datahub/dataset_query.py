"""How the prepare step runs its queries: which query, with which parameters, under which limits.

Data interval: a query may use `$data_interval_start`, `$data_interval_end` and `$logical_date`
(the template's `{{ data_interval_start }}` macros, rewritten by arf_training.templates). Their
values come from the job spec's `run` (the Airflow run's data interval) and are bound by DuckDB
as TIMESTAMP WITH TIME ZONE, never pasted into the SQL. A run without a data interval (a manual
run without a logical date) cannot run such a query: that is bad input (exit 2) with a message
saying how to trigger it, not an empty result.

Memory: the step runs under the template's `training.resources.memory` (the pod's limit on
Kubernetes, a per-process limit under the local backend). DuckDB's own limit is an eighth of
it (half of a small one, up to 128 MiB; its sort spills to the workspace beyond that): DuckDB's
sort holds far more than its own limit in resident memory (an 18.5 M-row episode table sorted
by (episode, step) under resources.memory 1Gi: 1048 MiB peak with a 256 MiB DuckDB limit, 875
MiB with 128 MiB, the same shards), so half of the ceiling was not enough. A query that still
runs out of memory (values DuckDB allocates outside its buffer manager, e.g.
`repeat('x', 10**8)`) fails with a message naming that setting.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path

import duckdb

from arf_trainer.datahub.sqlcheck import check_length
from arf_trainer.datahub.stream import QuerySource
from arf_trainer.errors import SpecError
from arf_trainer.spec import StepEnv, memory_bytes

log = logging.getLogger(__name__)

# Limits of the dataset query inside the prepare step (see QuerySource).
QUERY_TIMEOUT_S = 600.0
QUERY_MEMORY_LIMIT = "2GB"
DUCKDB_SHARE = 8  # DuckDB's memory_limit is resources.memory / DUCKDB_SHARE (see the docstring)
# Run values a dataset query may read as named parameters (the template's data-interval macros).
INTERVAL_PARAMETERS = ("data_interval_start", "data_interval_end", "logical_date")


def _prefix(text: str, limit: int = 80) -> str:
    """At most `limit` characters of a value for a message (trigger confs can be huge)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def resolve_query(env: StepEnv) -> str:
    """The template's query, or the trigger conf's `dataset_query` where the template allows it."""
    dataset = env.spec.dataset
    query: str = dataset["query"]
    override = env.spec.conf.get("dataset_query")
    # The trigger form may send the default (the template's own query) or an empty field;
    # neither is an override.
    if override is None or (isinstance(override, str) and override.strip() in ("", query.strip())):
        return query
    if not isinstance(override, str):
        raise SpecError(
            f"conf.dataset_query must be an SQL string, got {type(override).__name__} "
            f"{_prefix(repr(override))}; pass the query text or leave the field out"
        )
    if not dataset.get("allow_query_override", False):
        raise SpecError(
            f"conf.dataset_query is set, but template {env.spec.name!r} has "
            "dataset.allow_query_override: false; remove dataset_query from the trigger conf, "
            "or set allow_query_override: true in the template's dataset section"
        )
    log.info("using the trigger's dataset_query instead of the template's query")
    return override


def hub_path(env: StepEnv) -> Path:
    name = env.spec.dataset.get("hub", "default")
    if name != "default":
        raise SpecError(
            f"dataset.hub is {name!r}, but this arf-trainer reads only the 'default' hub "
            f"(ARF_DATAHUB_URI={env.datahub}); set dataset.hub: default"
        )
    return env.datahub


def query_parameters(env: StepEnv) -> dict[str, dt.datetime | None]:
    """The run's data interval and logical date from the job spec (None where the run has none)."""
    run = env.spec.raw.get("run") or {}
    values: dict[str, dt.datetime | None] = {}
    for name in INTERVAL_PARAMETERS:
        text = run.get(name)
        if text is None:
            values[name] = None
            continue
        try:
            when = dt.datetime.fromisoformat(str(text))
        except ValueError:
            raise SpecError(f"job spec run.{name}={text!r} is not an ISO 8601 time; the "
                            "arf-training operator writes the Airflow run's value there") from None
        if when.tzinfo is None:
            raise SpecError(f"job spec run.{name}={text!r} has no time zone; write e.g. "
                            f"{text}+00:00")
        values[name] = when.astimezone(dt.UTC)
    return values


def parameters_for(field: str, query: str,
                    values: dict[str, dt.datetime | None]) -> dict[str, dt.datetime]:
    """The run values `query` uses; a used one that this run lacks is bad input (exit 2)."""
    check_length(query, field)  # before DuckDB parses it: parse cost grows with the text
    try:
        statements = duckdb.extract_statements(query)
        used = set(statements[0].named_parameters) if len(statements) == 1 else set()
    except duckdb.Error:
        used = set()  # run_query reports the syntax error itself
    missing = sorted(name for name in used if name in values and values[name] is None)
    if missing:
        raise SpecError(
            f"{field} uses {', '.join('$' + m for m in missing)} (the template's "
            f"{{{{ {missing[0]} }}}}), but this run has no data interval (a manual run without a "
            "logical date). Let the scheduler run it, or trigger it with a logical date, e.g. "
            "`airflow dags test <dag_id> 2026-11-26T02:00:00+00:00` (the run then reads the "
            "schedule's interval ending at or before that time)")
    return {name: value for name, value in values.items() if value is not None}


def _memory_limits(env: StepEnv) -> tuple[str, str | None]:
    """(DuckDB's memory_limit, the step's ceiling as the template states it, if any).

    The step runs under `training.resources.memory` (the pod limit on Kubernetes, a process
    limit under the local backend). DuckDB's buffer manager gets an eighth of it (at most
    QUERY_MEMORY_LIMIT): what DuckDB holds beyond its own limit (scan buffers, sort runs), the
    batches being split and the Parquet writers' row groups (`arf_trainer.datahub.shards`) take
    the rest, so DuckDB spills its sort to disk before the process reaches its ceiling."""
    memory = (env.spec.training.get("resources") or {}).get("memory")
    if memory is None:
        return QUERY_MEMORY_LIMIT, None
    ceiling = f"resources.memory: {memory}"
    size = memory_bytes(memory)
    if size is None:
        return QUERY_MEMORY_LIMIT, ceiling  # the template check names bad quantities
    # Small ceilings: DuckDB's sort needs a working set per thread (a 32 MiB limit could not
    # pin its blocks where 64 MiB sorted fine), so it keeps up to half of them, at most 128 MiB.
    share = max(int(size) // DUCKDB_SHARE, min(int(size) // 2, 128 * 2**20), 2**20)
    return f"{min(share, 2 * 10**9) // 2**20}MiB", ceiling


def cpu_threads(env: StepEnv) -> int | None:
    """The step's `training.resources.cpu` as a thread count (rounded up, at least 1), or None
    when it is not stated. DuckDB and Arrow otherwise start a thread per core of the machine,
    beyond what the step was given (a pod's CPU limit throttles them, and each thread holds its
    own scan and sort buffers: ~90 MiB more peak RSS for 2 threads than 1 in a sorted scan)."""
    raw = (env.spec.training.get("resources") or {}).get("cpu")
    if raw is None:
        return None
    text = str(raw).strip()
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None  # the template check names bad quantities
    return max(1, math.ceil(cores))


def open_dataset_query(env: StepEnv, what: str, query: str, pins: dict[str, int],
                       values: dict[str, dt.datetime | None], spill_dir: Path) -> QuerySource:
    """`query` checked and its tables opened, ready to count and stream (spilling to spill_dir)."""
    memory_limit, ceiling = _memory_limits(env)
    return QuerySource(hub_path(env), query, pins, parameters=parameters_for(what, query, values),
                       what=what, memory_limit=memory_limit, timeout_s=QUERY_TIMEOUT_S,
                       spill_dir=spill_dir, memory_ceiling=ceiling, threads=cpu_threads(env))
