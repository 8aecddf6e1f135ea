"""Demo data for the embedded data hub: `seed_demo(hub, episodes, seed, force)`.

Two tables:

* `reach_demos`: one row per step of scripted-expert episodes on the reaching task
  (episode INT64, step INT32, obs_0..obs_9 FLOAT32, act_0..act_1 FLOAT32, success BOOL,
  seed INT64, collected_at TIMESTAMP(us, UTC)). The executed action carries a little Gaussian
  exploration noise, while the recorded action is the expert's clean action for the state
  actually visited (DAgger-style): behaviour cloning then also learns how to recover from
  small drifts instead of only the expert's own narrow state distribution. `success` is the
  outcome of the whole (noisy) episode, so `WHERE success` keeps good demonstrations.
* `corrections`: created empty (the schema `arf_trainer.datahub.failures` appends to), so
  the nightly fine-tune finds no corrections and skips until the first ones are uploaded.
* `digits`: scikit-learn's 8x8 digits (shipped with scikit-learn, no download) as
  pixel_0..pixel_63 FLOAT32 in [0, 1] and label INT64.

Every column is a function of `seed` and `episodes`: `collected_at` too, a fixed synthetic
instant (`SEEDED_AT`) unless the caller gives one. With the wall-clock time there, two machines
seeding the same demo got different rows, so `SELECT *` prepared a different dataset
fingerprint and `arf training reproduce` could not tell the data was the same. Seeding is idempotent: tables that exist are left alone unless `force`,
which writes a new version (reach_demos: appends new episodes, numbered after the existing
ones; digits: overwrites with the same rows, since the data set is fixed).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arf_trainer.datahub.failures import CORRECTIONS_TABLE, create_corrections_table
from arf_trainer.datahub.tables import list_tables, make_hub, open_table, write_table
from arf_trainer.errors import DataHubError
from arf_trainer.spec import uri_to_path

log = logging.getLogger(__name__)

REACH_TABLE = "reach_demos"
DIGITS_TABLE = "digits"
SEEDED_AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
"""`collected_at` of the synthetic demonstrations when the caller gives none."""
# Std of the Gaussian noise on executed actions (actions live in [-1, 1]). Enough to visit
# off-expert states (a 3x256 MLP clone trained on 200 episodes reached the target on 96% of
# 100 evaluation episodes with 0.2, 93% with 0.1; 74-85% with a slower expert), small enough
# that ~94% of episodes still succeed and so pass the reach_bc query's `WHERE success`.
EXPLORATION_NOISE = 0.2


def _reach_rows(episodes: int, seed: int, first_episode: int,
                collected_at: dt.datetime) -> pa.Table:
    from arf_trainer.sim import reach

    # Separate, reproducible streams for the episode initial states and the action noise.
    env_stream, noise_stream = np.random.SeedSequence(seed).spawn(2)
    episode_seeds = env_stream.generate_state(episodes, dtype=np.uint32)
    noise_rng = np.random.default_rng(noise_stream)
    steps = reach.EPISODE_STEPS
    obs = np.empty((episodes * steps, reach.OBS_DIM), dtype=np.float32)
    act = np.empty((episodes * steps, reach.ACT_DIM), dtype=np.float32)
    success = np.empty(episodes * steps, dtype=bool)
    env = reach.make_env()
    try:
        for i, episode_seed in enumerate(episode_seeds):
            result = reach.rollout(reach.expert_policy, int(episode_seed), env=env,
                                   action_noise=EXPLORATION_NOISE, noise_rng=noise_rng)
            rows = slice(i * steps, (i + 1) * steps)
            obs[rows], act[rows] = result.observations, result.actions
            success[rows] = result.success
    finally:
        env.close()
    n = episodes * steps
    columns: dict[str, pa.Array] = {
        "episode": pa.array(np.repeat(np.arange(first_episode, first_episode + episodes,
                                                dtype=np.int64), steps)),
        "step": pa.array(np.tile(np.arange(steps, dtype=np.int32), episodes)),
    }
    columns.update({f"obs_{j}": pa.array(obs[:, j]) for j in range(reach.OBS_DIM)})
    columns.update({f"act_{j}": pa.array(act[:, j]) for j in range(reach.ACT_DIM)})
    columns["success"] = pa.array(success)
    columns["seed"] = pa.array(np.full(n, seed, dtype=np.int64))
    columns["collected_at"] = pa.array([collected_at] * n, type=pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


def _digits_rows() -> pa.Table:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)  # raw values are 0..16
    columns = {f"pixel_{j}": pa.array(pixels[:, j]) for j in range(pixels.shape[1])}
    columns["label"] = pa.array(digits.target.astype(np.int64))
    return pa.table(columns)


def check_collected_at(collected_at: dt.datetime | None) -> dt.datetime:
    """`collected_at`, or `SEEDED_AT` for None; a naive time is refused (whose zone?)."""
    if collected_at is None:
        return SEEDED_AT
    if not isinstance(collected_at, dt.datetime) or collected_at.tzinfo is None:
        raise DataHubError(f"collected_at={collected_at!r} must be a datetime with a time zone, "
                           "e.g. 2026-11-26T01:00:00+00:00")
    return collected_at


def _next_episode(hub: Path) -> int:
    snapshot = open_table(hub, REACH_TABLE)
    latest = pc.max(snapshot.dataset.to_table(columns=["episode"])["episode"]).as_py()
    return 0 if latest is None else int(latest) + 1


def _row_count(hub: Path, name: str) -> tuple[int, int]:
    snapshot = open_table(hub, name)
    return snapshot.dataset.count_rows(), snapshot.version


def seed_demo(hub: Path, episodes: int = 200, seed: int = 0, force: bool = False,
              pixels: bool = False, frame_size: int = 64,
              collected_at: dt.datetime | None = None) -> dict[str, Any]:
    """Create (or with `force`, add a version of) the demo tables; return a JSON-able summary.

    With `pixels`, also `reach_pixels`: the same episodes rendered as `frame_size` square RGB
    frames (`arf_trainer.datahub.seed_pixels`; slow, so only on request). `collected_at`: the
    time recorded in the rows (timezone-aware; default `SEEDED_AT`).

    Summary: {table: {"rows": rows in the table's latest version, "version": that version,
    "action": "created" | "appended" | "overwritten" | "unchanged" | "converted" (reach_pixels
    frames rewritten from arrays to PNG)}}.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise DataHubError(f"episodes={episodes!r} must be a positive integer "
                           "(e.g. --episodes 200)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataHubError(f"seed={seed!r} must be a non-negative integer (e.g. --seed 0)")
    collected_at = check_collected_at(collected_at)
    hub = uri_to_path(str(hub))  # accept a file:// URI too, as ARF_DATAHUB_URI may be one
    # Every argument is checked before the first table is written: a bad --frame-size (even
    # without --pixels, where it would otherwise be ignored unseen) must not leave reach_demos
    # seeded and the pixels not.
    from arf_trainer.datahub.seed_pixels import check_pixels

    check_pixels(hub, frame_size, force and pixels)
    make_hub(hub)
    existing = set(list_tables(hub))
    summary: dict[str, Any] = {}

    if REACH_TABLE not in existing or force:
        first = _next_episode(hub) if REACH_TABLE in existing else 0
        data = _reach_rows(episodes, seed, first, collected_at)
        write_table(hub, REACH_TABLE, data, mode="append")
        action = "appended" if REACH_TABLE in existing else "created"
        rate = float(np.mean(data["success"].to_numpy(zero_copy_only=False)))
        log.info("%s %d expert episodes (seed %d, %.0f%% successful) to %s",
                 action, episodes, seed, 100 * rate, REACH_TABLE)
    else:
        action = "unchanged"
    rows, version = _row_count(hub, REACH_TABLE)
    summary[REACH_TABLE] = {"rows": rows, "version": version, "action": action}

    if DIGITS_TABLE not in existing or force:
        write_table(hub, DIGITS_TABLE, _digits_rows(), mode="overwrite")
        action = "overwritten" if DIGITS_TABLE in existing else "created"
    else:
        action = "unchanged"
    rows, version = _row_count(hub, DIGITS_TABLE)
    summary[DIGITS_TABLE] = {"rows": rows, "version": version, "action": action}

    if pixels:
        from arf_trainer.datahub.seed_pixels import PIXELS_TABLE, seed_pixels

        summary[PIXELS_TABLE] = seed_pixels(hub, episodes, seed, force, frame_size,
                                             collected_at)

    created = create_corrections_table(hub)
    rows, version = _row_count(hub, CORRECTIONS_TABLE)
    summary[CORRECTIONS_TABLE] = {"rows": rows, "version": version,
                                  "action": "unchanged" if created is None else "created"}

    if all(entry["action"] == "unchanged" for entry in summary.values()):
        log.info("data hub %s is already seeded (%s); pass --force to add a new version",
                 hub, ", ".join(f"{n} v{e['version']}" for n, e in summary.items()))
    return summary
