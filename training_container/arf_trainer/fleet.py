"""`arf-trainer fleet`: the robots in the field, simulated. Roll a registered model out on
seeds of its own and record the failed episodes in the data hub's `failures` table.

In the platform, deployed robots upload the episodes that went wrong; this command plays that
part for the embedded default and the failure-loop benchmark. Every episode, successful or
not, also goes to `field_episodes`, for corrections of all visited states (`--states all`).
Its seeds must not overlap the template's evaluation seeds: corrections made from evaluation
failures would teach the model the very episodes the promotion gate measures it on (test-set
leakage). Field seeds that overlap the `arf.eval.seeds` any version of the model recorded are
refused before any rollout (`evaluator_checks.check_field_seeds`); the benchmark draws field
seeds from a range of their own and corrects only those (`datahub correct --seeds`).

Rows are recorded with `eval_run_id = "fleet:<label>"`, the resolved model version (an alias
such as `@champion` is resolved once, at the start), and `recorded_at`.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from arf_trainer.errors import SpecError

log = logging.getLogger(__name__)


def run_fleet(*, tracking_uri: str, model_uri: str, hub: Path, first_seed: int, episodes: int,
              recorded_at: dt.datetime, label: str) -> dict[str, Any]:
    """Roll `model_uri` out on seeds first_seed .. first_seed+episodes-1; record failures."""
    import mlflow
    from mlflow import MlflowClient

    from arf_trainer.datahub.failures import FIELD_TABLE, record_failures
    from arf_trainer.evaluator import load_policy, rollouts
    from arf_trainer.evaluator_checks import check_field_seeds, seed_range
    from arf_trainer.registry import resolve

    if episodes < 1:
        raise SpecError(f"--episodes {episodes} must be at least 1")
    if first_seed < 0:
        raise SpecError(f"--first-seed {first_seed} must be 0 or more")
    seeds = seed_range(first_seed, episodes, "--first-seed")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = resolve(client, model_uri, tracking_uri, field="--model")
    name, version = found.name, str(found.version)
    check_field_seeds(client, name, seeds)
    done = rollouts(load_policy(name, version), episodes, first_seed)
    recorded = record_failures(hub, model_name=name, model_version=int(version),
                               eval_run_id=f"fleet:{label}", episodes=done,
                               recorded_at=recorded_at)
    # Every episode, successes too, for `datahub correct --states all` (DAgger relabels all).
    record_failures(hub, model_name=name, model_version=int(version),
                    eval_run_id=f"fleet:{label}", episodes=done, recorded_at=recorded_at,
                    table=FIELD_TABLE)
    successes = sum(r.success for _, r in done)
    log.info("fleet: models:/%s/%s succeeded on %d of %d field episodes (seeds %d-%d); "
             "%d new failure(s) recorded", name, version, successes, episodes, first_seed,
             first_seed + episodes - 1, recorded["episodes"])
    return {"model_name": name, "model_version": version, "episodes": episodes,
            "first_seed": first_seed, "successes": successes,
            "success_rate": successes / episodes, "failures_recorded": recorded["episodes"],
            "failures_table_version": recorded["version"]}
