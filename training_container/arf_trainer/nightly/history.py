"""What the nightly choice reads from MLflow: the champion and its evaluation, the from-scratch
run its line started from (which sizes the budget), and this DAG's nights since then.

The nights counted are this DAG's finished training runs since the from-scratch run at the
root of the champion's lineage (each fine-tune or retrain names its base's training run in
`arf.base_model_run_id`): a new from-scratch champion starts a new count and a new budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from arf_trainer import tracking
from arf_trainer.errors import RegistryError
from arf_trainer.nightly.policy import CONF_KEY, FINETUNE, RETRAIN
from arf_trainer.registry import resolve

BASE_RUN_TAG = "arf.base_model_run_id"
SAMPLES_TAG = "arf.samples"  # epochs x train rows, set by the train step (trainer/finish.py)
RATE_TAG = "arf.eval.success_rate"  # set by arf_evaluate on the version
MAX_LINEAGE = 10_000  # fine-tunes between a champion and its from-scratch root


@dataclass(frozen=True)
class Root:
    """The from-scratch training run at the root of the champion's lineage."""

    run_id: str
    start_time: int  # ms since the epoch, MLflow's
    epochs: int | None


@dataclass(frozen=True)
class History:
    champion_version: str
    champion_rate: float | None
    root: Root
    recipes: list[str] = field(default_factory=list)  # per night since the root, oldest first
    spent: int = 0  # samples trained by the nights before
    unknown: int = 0  # nights whose run has no arf.samples (a custom command, an older run)

    @property
    def last_retrain_night(self) -> int | None:
        nights = [i + 1 for i, r in enumerate(self.recipes) if r == RETRAIN]
        return nights[-1] if nights else None


def read_history(tracking_uri: str, base_model: str, experiment: str, dag_id: str,
                 this_run_id: str) -> History:
    """The champion (`base_model` resolved), its root and this DAG's nights since that root
    (the DAG run `this_run_id` excluded: a cleared and re-run night is not its own past)."""
    client = tracking.configure(tracking_uri)
    with tracking.mlflow_errors(tracking_uri, "read the champion and the nights before"):
        version = resolve(client, base_model, tracking_uri)
        rate = _rate(version, base_model)
        if not version.run_id:
            raise RegistryError(f"{base_model} (version {version.version}) names no training "
                                "run, so the from-scratch run at the root of its lineage, which "
                                "sizes the budget, cannot be found; register a trained version")
        root = _root(client, version.run_id)
        nights = _nights(client, experiment, dag_id, this_run_id, root.start_time)
    recipes, spent, unknown = [], 0, 0
    for run in nights:
        recipes.append(_recipe(run.data.tags))
        given = run.data.tags.get(SAMPLES_TAG)
        samples = _int(given)
        if given is None:
            unknown += 1
        elif samples is None or samples < 0 or samples != _float(given):
            raise RegistryError(f"run {run.info.run_id} (a night of {dag_id}) has {SAMPLES_TAG}"
                                f"={given!r}, not a whole number of samples >= 0; fix or delete "
                                "the tag (the nightly budget sums it)")
        else:
            spent += samples
    return History(champion_version=str(version.version), champion_rate=rate, root=root,
                   recipes=recipes, spent=spent, unknown=unknown)


def _rate(version: Any, base_model: str) -> float | None:
    """The champion's recorded success rate (arf.eval.success_rate), None if not evaluated."""
    given = version.tags.get(RATE_TAG)
    if given is None:
        return None
    rate = _float(given)
    if rate is None or not 0.0 <= rate <= 1.0:
        raise RegistryError(f"{base_model} (version {version.version}) has {RATE_TAG}="
                            f"{given!r}, not a success rate in [0, 1]; fix the tag or "
                            "evaluate the version again (arf_evaluate records it)")
    return rate


def _root(client: Any, run_id: str) -> Root:
    seen: set[str] = set()
    while True:
        if run_id in seen or len(seen) > MAX_LINEAGE:
            raise RegistryError(f"the champion's lineage loops or is longer than {MAX_LINEAGE} "
                                f"runs at run {run_id} ({BASE_RUN_TAG} tags)")
        seen.add(run_id)
        run = client.get_run(run_id)
        parent = run.data.tags.get(BASE_RUN_TAG)
        if not parent:
            params = run.data.params
            return Root(run_id=run_id, start_time=int(run.info.start_time or 0),
                        epochs=_int(params.get("epochs")))
        run_id = parent


def _nights(client: Any, experiment: str, dag_id: str, this_run_id: str,
            since_ms: int) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    if found is None:  # no run of this template yet
        return []
    if "'" in dag_id:
        raise RegistryError(f"dag id {dag_id!r} contains a quote, which MLflow search filters "
                            "cannot match")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=(f"tags.`arf.dag_id` = '{dag_id}' and attributes.status = 'FINISHED' "
                       f"and attributes.start_time >= {since_ms}"),
        order_by=["attributes.start_time ASC"], max_results=50_000)
    return [r for r in runs if r.data.tags.get("arf.dag_run_id") != this_run_id
            and r.data.tags.get(tracking.PARENT_RUN_TAG) is None]


def _recipe(tags: dict[str, str]) -> str:
    try:
        conf = json.loads(tags.get("arf.conf") or "{}")
    except json.JSONDecodeError:
        conf = {}
    return RETRAIN if conf.get(CONF_KEY) == RETRAIN else FINETUNE


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None else int(number)


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
