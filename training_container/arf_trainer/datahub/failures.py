"""Failure learning in the data hub: failed evaluation episodes in, expert corrections out.

Three tables, one row per time step (the same step layout as `reach_demos`, so a fine-tune
query can `UNION ALL` them with the original demonstrations):

* `failures`: written by the evaluate step for each episode that missed the target. Columns
  model_name, model_version, eval_run_id, seed (the episode's evaluation seed), step,
  obs_0..obs_9, act_0..act_1 (what the model did), final_distance, success (false),
  recorded_at. Keyed by (model_name, model_version, seed): rollouts are deterministic, so a
  retried evaluation finds its episodes there and writes nothing twice.
* `field_episodes`: every field episode (`arf-trainer fleet`), successful ones too, in the
  `failures` layout with the real `success`. DAgger relabels every state the learner visits,
  not only those of failed episodes: `correct_failures(states="all")` reads this table, while
  `failures` stays the record of what failed. Evaluation episodes never land here, so a
  correction of all states cannot leak the gate's seeds into training.
* `corrections`: what the teleoperation module uploads for failure cases. Here
  `correct_failures` plays that role with the DAgger recipe: the states the model visited in
  its failed episodes, relabelled with the scripted expert's action for each state. Columns
  episode (a negative id, so it never collides with demonstration episodes), step,
  obs_0..obs_9, act_0..act_1 (the expert's), success (true: the label is the expert's),
  seed, collected_at, source_model_name, source_model_version. Each failure episode is
  corrected once; `collected_at` is the upload time the nightly fine-tune's data interval
  selects on. `episode` identifies the corrected episode (all its steps share it), so an
  episode-aware split keeps a corrected episode wholly in training or wholly in validation.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arf_trainer.datahub.maintenance import compact_if_fragmented
from arf_trainer.datahub.tables import list_tables, open_table, table_lock, write_table
from arf_trainer.errors import DataHubError

if TYPE_CHECKING:
    from arf_trainer.sim.reach import Rollout

log = logging.getLogger(__name__)

FAILURES_TABLE = "failures"
FIELD_TABLE = "field_episodes"
STATES = {"failed": FAILURES_TABLE, "all": FIELD_TABLE}  # correct --states -> source table
CORRECTIONS_TABLE = "corrections"
_KEY = ("model_name", "model_version", "seed")
OBS_DIM, ACT_DIM = 10, 2  # the reach task's (arf_trainer.sim.reach), without importing MuJoCo
# Fixed, so that the empty table the demo seeds and every upload append to the same schema.
CORRECTIONS_SCHEMA = pa.schema(
    [("episode", pa.int64()), ("step", pa.int32())]
    + [(f"obs_{j}", pa.float32()) for j in range(OBS_DIM)]
    + [(f"act_{j}", pa.float32()) for j in range(ACT_DIM)]
    + [("success", pa.bool_()), ("seed", pa.int64()),
       ("collected_at", pa.timestamp("us", tz="UTC")),
       ("source_model_name", pa.string()), ("source_model_version", pa.int64())])


def create_corrections_table(hub: Path) -> int | None:
    """Create the empty `corrections` table if the hub has none (the nightly fine-tune then finds
    no new rows and skips, instead of failing on a missing table); return its new version."""
    if CORRECTIONS_TABLE in list_tables(hub):
        return None
    return write_table(hub, CORRECTIONS_TABLE, CORRECTIONS_SCHEMA.empty_table())


def _utc(when: dt.datetime) -> dt.datetime:
    if when.tzinfo is None:
        raise DataHubError(f"timestamp {when.isoformat()} has no time zone; pass an aware "
                           "datetime (e.g. 2026-11-26T02:00:00+00:00)")
    return when.astimezone(dt.UTC)


def _step_columns(observations: np.ndarray, actions: np.ndarray) -> dict[str, pa.Array]:
    columns = {f"obs_{j}": pa.array(observations[:, j].astype(np.float32))
               for j in range(observations.shape[1])}
    columns.update({f"act_{j}": pa.array(actions[:, j].astype(np.float32))
                    for j in range(actions.shape[1])})
    return columns


def _keys(hub: Path, table: str, columns: tuple[str, ...]) -> set[tuple[Any, ...]]:
    if table not in list_tables(hub):
        return set()
    rows = open_table(hub, table).dataset.to_table(columns=list(columns))
    return set(zip(*(rows[c].to_pylist() for c in columns), strict=True))


def record_failures(hub: Path, *, model_name: str, model_version: int, eval_run_id: str,
                    episodes: list[tuple[int, Rollout]], recorded_at: dt.datetime,
                    table: str = FAILURES_TABLE) -> dict[str, Any]:
    """Append the failed ones of `episodes` ((seed, rollout) pairs) to `failures` (every one
    of them to `table=FIELD_TABLE`), skipping seeds already recorded for this model version.
    Returns {"episodes", "rows", "version"}."""
    recorded_at = _utc(recorded_at)
    with table_lock(hub, table):  # two evaluations of one version must not both append a seed
        return _record_new(hub, table, model_name, int(model_version), eval_run_id, episodes,
                           recorded_at)


def _record_new(hub: Path, table: str, model_name: str, model_version: int, eval_run_id: str,
                episodes: list[tuple[int, Rollout]], recorded_at: dt.datetime) -> dict[str, Any]:
    known = _keys(hub, table, _KEY)
    new = [(seed, r) for seed, r in episodes
           if (table == FIELD_TABLE or not r.success)
           and (model_name, int(model_version), int(seed)) not in known]
    if not new:
        return {"episodes": 0, "rows": 0, "version": None, "compacted_version": None}
    steps = len(new[0][1].observations)
    n = len(new) * steps
    columns: dict[str, pa.Array] = {
        "model_name": pa.array([model_name] * n, type=pa.string()),
        "model_version": pa.array(np.full(n, int(model_version), dtype=np.int64)),
        "eval_run_id": pa.array([eval_run_id] * n, type=pa.string()),
        "seed": pa.array(np.repeat(np.array([s for s, _ in new], dtype=np.int64), steps)),
        "step": pa.array(np.tile(np.arange(steps, dtype=np.int32), len(new))),
    }
    columns.update(_step_columns(np.concatenate([r.observations for _, r in new]),
                                 np.concatenate([r.actions for _, r in new])))
    columns["final_distance"] = pa.array(
        np.repeat(np.array([r.final_distance for _, r in new], dtype=np.float32), steps))
    columns["success"] = pa.array(np.repeat(np.array([r.success for _, r in new]), steps))
    columns["recorded_at"] = pa.array([recorded_at] * n, type=pa.timestamp("us", tz="UTC"))
    version = write_table(hub, table, pa.table(columns))
    log.info("recorded %d episode(s) of %s v%s in %s (version %d)", len(new), model_name,
             model_version, table, version)
    return {"episodes": len(new), "rows": n, "version": version,
            "compacted_version": compact_if_fragmented(hub, table)}


def correct_failures(hub: Path, *, collected_at: dt.datetime, model_name: str | None = None,
                     limit: int | None = None, seeds: tuple[int, int] | None = None,
                     states: str = "failed") -> dict[str, Any]:
    """Relabel not-yet-corrected failure episodes with the scripted expert's actions and append
    them to `corrections` with `collected_at`. Returns {"episodes", "rows", "version"}.

    `states="all"` relabels every visited state of the field episodes (`field_episodes`,
    successful ones too: DAgger's aggregate) instead of the failed episodes only.

    `model_name` restricts to one model's failures; `seeds=(start, stop)` to episodes with
    start <= seed < stop (e.g. the field's, never the evaluation seeds, which the promotion gate
    measures on: correcting those would leak the test set into training); `limit` takes at
    most that many episodes (oldest first, then by seed), e.g. an operator's nightly capacity.
    """
    collected_at = _utc(collected_at)
    if limit is not None and limit < 1:
        raise DataHubError(f"limit={limit} must be at least 1 (or omitted for all)")
    if seeds is not None and not 0 <= seeds[0] < seeds[1]:
        raise DataHubError(f"seeds={seeds[0]}:{seeds[1]} must be START:STOP with "
                           "0 <= START < STOP (STOP excluded), e.g. 200000:200100")
    if states not in STATES:
        raise DataHubError(f"--states {states!r} is not one of {', '.join(STATES)}: 'failed' "
                           "relabels the failed episodes, 'all' every field episode")
    if STATES[states] not in list_tables(hub):
        return {"episodes": 0, "rows": 0, "version": None, "compacted_version": None}
    # Two corrections at once would both relabel every open episode, under the same ids.
    with table_lock(hub, CORRECTIONS_TABLE):
        return _correct_open(hub, collected_at, model_name, limit, seeds, STATES[states])


def _correct_open(hub: Path, collected_at: dt.datetime, model_name: str | None,
                  limit: int | None, seeds: tuple[int, int] | None,
                  source: str) -> dict[str, Any]:
    from arf_trainer.sim.reach import expert_action

    failures = open_table(hub, source).dataset.to_table()
    if model_name is not None:
        failures = failures.filter(pc.equal(failures["model_name"], model_name))
    if seeds is not None:
        failures = failures.filter(pc.and_(pc.greater_equal(failures["seed"], seeds[0]),
                                           pc.less(failures["seed"], seeds[1])))
    done = _keys(hub, CORRECTIONS_TABLE,
                 ("source_model_name", "source_model_version", "seed"))
    episodes: dict[tuple[Any, ...], dt.datetime] = {}
    for name, version, seed, at in zip(*(failures[c].to_pylist() for c in
                                         (*_KEY, "recorded_at")), strict=True):
        if (name, version, seed) not in done:
            episodes.setdefault((name, version, seed), at)
    chosen = sorted(episodes, key=lambda k: (episodes[k], k))[:limit]
    if not chosen:
        return {"episodes": 0, "rows": 0, "version": None, "compacted_version": None}
    keys = pa.table({"model_name": [k[0] for k in chosen],
                     "model_version": pa.array([k[1] for k in chosen], type=pa.int64()),
                     "seed": pa.array([k[2] for k in chosen], type=pa.int64()),
                     "order": pa.array(range(len(chosen)), type=pa.int64())})
    rows = failures.join(keys, list(_KEY), join_type="inner").sort_by(
        [("order", "ascending"), ("step", "ascending")])
    obs_names = sorted((c for c in rows.column_names if c.startswith("obs_")),
                       key=lambda c: int(c[4:]))
    observations = np.stack([rows[c].to_numpy() for c in obs_names], axis=1)
    n = rows.num_rows
    first = _next_correction_episode(hub)
    columns: dict[str, pa.Array] = {
        "episode": pa.array(first - rows["order"].to_numpy()),
        "step": rows["step"],
    }
    columns.update(_step_columns(observations, expert_action(observations)))
    columns["success"] = pa.array(np.ones(n, dtype=bool))
    columns["seed"] = rows["seed"]
    columns["collected_at"] = pa.array([collected_at] * n, type=pa.timestamp("us", tz="UTC"))
    columns["source_model_name"] = rows["model_name"]
    columns["source_model_version"] = rows["model_version"]
    version = write_table(hub, CORRECTIONS_TABLE, pa.table(columns, schema=CORRECTIONS_SCHEMA))
    log.info("corrected %d failure episode(s) (%d states) into %s version %d, collected at %s",
             len(chosen), n, CORRECTIONS_TABLE, version, collected_at.isoformat())
    return {"episodes": len(chosen), "rows": n, "version": version,
            "compacted_version": compact_if_fragmented(hub, CORRECTIONS_TABLE)}


def _next_correction_episode(hub: Path) -> int:
    """Correction episodes count down from -1, so they never collide with demonstrations."""
    if CORRECTIONS_TABLE not in list_tables(hub):
        return -1
    table = open_table(hub, CORRECTIONS_TABLE).dataset.to_table(columns=["episode"])
    lowest = pc.min(table["episode"]).as_py()
    return -1 if lowest is None else int(lowest) - 1
