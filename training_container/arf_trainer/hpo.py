"""Hyperparameter search inside the container: one trial's reports, and the best trial's summary.

The study lives in Optuna's RDB storage (``ARF_OPTUNA_STORAGE``); the job spec's
``inputs.hpo`` names it (``study``) and either the trial this step trains (``trial_number``,
asked centrally by the Airflow side) or ``select: best`` for the final training.

* `TrialReporter` (rank 0 of a trial): reconstructs the trial from its number, reports the
  metric after each epoch and asks `should_prune()`; the caller broadcasts the answer so that
  every DDP rank stops after the same epoch. At the end it records the outcome on the trial
  (user attrs ``arf.outcome`` = complete | pruned, ``arf.value``) and leaves telling to the
  Airflow side's tell task (trials are told centrally).
* `best_trial` / `summarize_study` (rank 0 of the final training): the best completed trial's
  params, and the study's summary on the parent MLflow run (best params and value, the
  hyperparameter importances from Optuna's evaluator, the optimization-history plot).

`build_sampler`, `build_pruner` and `distributions` are the single definition of how an `hpo`
section (the template's, as a plain dict) becomes Optuna objects: the Airflow side imports them
at task run time, so the pruner - which the storage does not keep - is built identically on both
sides. Optuna is imported inside the functions: this module is imported by both sides.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arf_trainer.errors import SpecError, TrainingError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

STORAGE_ENV = "ARF_OPTUNA_STORAGE"
OUTCOME_ATTR = "arf.outcome"
VALUE_ATTR = "arf.value"
STEPS_ATTR = "arf.steps"
RUN_ATTR = "arf.mlflow_run_id"


def trial_dir(number: int) -> str:
    """A trial's folder in the run workspace (the Airflow side names the same one)."""
    return f"trials/trial-{int(number):04d}"


def distributions(space: dict[str, dict[str, Any]]
                  ) -> dict[str, "optuna.distributions.BaseDistribution"]:
    """The fixed distributions of a search space (`hpo.search_space`, validated by the schema)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for name, dim in sorted(space.items()):
        kind = dim["type"]
        if kind == "float":
            out[name] = FloatDistribution(dim["low"], dim["high"], log=bool(dim.get("log")),
                                          step=dim.get("step"))
        elif kind == "int":
            out[name] = IntDistribution(dim["low"], dim["high"], log=bool(dim.get("log")),
                                        step=int(dim.get("step") or 1))
        elif kind == "categorical":
            out[name] = CategoricalDistribution(list(dim["choices"]))
        else:
            raise SpecError(f"hpo.search_space.{name}: unknown type {kind!r}")
    return out


def build_sampler(hpo: dict[str, Any], round_index: int = 0) -> "optuna.samplers.BaseSampler":
    """The sampler of round `round_index`, seeded with hpo.seed + round_index.

    A new sampler object is built for every ask; with the same seed each round, the random
    start-up proposals of TPE/GP/random would repeat round after round. TPE and GP start
    modelling after the first round (n_startup_trials = parallel).
    """
    import optuna

    seed, kind = int(hpo.get("seed", 0)) + round_index, hpo.get("sampler", "tpe")
    startup = max(1, int(hpo.get("parallel", 1)))
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if kind == "qmc":
        # The sequence's position is kept in the study, so one seed serves every round.
        return optuna.samplers.QMCSampler(seed=int(hpo.get("seed", 0)), scramble=True,
                                          warn_asynchronous_seeding=False)
    raise SpecError(f"hpo.sampler={kind!r} is not a sampler; use tpe, random, gp or qmc")


def build_pruner(hpo: dict[str, Any]) -> "optuna.pruners.BasePruner":
    """The pruner (not stored in the study): the same on the Airflow side and in trials.

    Resources are epochs: a trial reports once per epoch, up to hpo.budget.epochs.
    """
    import optuna

    kind, epochs = hpo.get("pruner", "median"), int(hpo["budget"]["epochs"])
    if kind == "median":
        # Compare from the first epoch on, once one round (`parallel` trials) has completed.
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, int(hpo.get("parallel", 1))),
                                           n_warmup_steps=0)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs,
                                              reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise SpecError(f"hpo.pruner={kind!r} is not a pruner; use median, successive_halving, "
                    "hyperband or none")


_opened: dict[str, Any] = {}


def storage_from_env() -> "optuna.storages.BaseStorage":
    """The storage named by ARF_OPTUNA_STORAGE, opened once per process: each RDBStorage has its
    own engine and connection pool, and a storage per call ran a long process (the pruning
    benchmark, a test session) out of PostgreSQL's connection slots."""
    import optuna

    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise SpecError(f"{STORAGE_ENV} is not set; the train step of an hpo template is started "
                        "by arf-training with the study's storage URL")
    if url not in _opened:
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        _opened[url] = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    return _opened[url]


def load_study(hpo: dict[str, Any], study_name: str) -> "optuna.Study":
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage_from_env(),
                                 pruner=build_pruner(hpo))
    except KeyError as exc:
        raise TrainingError(f"study {study_name!r} is not in the Optuna storage "
                            f"({STORAGE_ENV}); its create_study task must run first") from exc


@dataclass
class TrialReporter:
    """Rank 0's handle on the trial it trains (see the module docstring)."""

    study: Any
    trial: Any
    trial_id: int
    metric: str
    reported: set[int] = field(default_factory=set)  # epochs already in the storage

    @classmethod
    def open(cls, hpo: dict[str, Any], inputs: dict[str, Any]) -> "TrialReporter":
        from optuna.trial import Trial, TrialState

        study = load_study(hpo, inputs["study"])
        storage = study._storage  # noqa: SLF001 - the BaseStorage API below is public
        number = int(inputs["trial_number"])
        try:
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study.study_name), number)
        except KeyError as exc:
            raise TrainingError(f"study {study.study_name!r} has no trial {number}") from exc
        frozen = storage.get_trial(trial_id)
        state = frozen.state
        if state != TrialState.RUNNING:
            raise TrainingError(f"trial {number} of study {study.study_name!r} is {state.name}, "
                                "not RUNNING: it was told already; it cannot be trained again")
        return cls(study=study, trial=Trial(study, trial_id), trial_id=trial_id,
                   metric=hpo["metric"], reported=set(frozen.intermediate_values))

    def report(self, epoch: int, metrics: dict[str, float], ask_pruner: bool = True) -> bool:
        """Report the epoch's metric; True if the pruner says to stop (asked if `ask_pruner`)."""
        if self.metric not in metrics:
            raise TrainingError(f"hpo.metric {self.metric!r} was not computed this epoch "
                                f"(metrics: {sorted(metrics)})")
        step = int(epoch)
        # A resumed trial replays no report. Known from `open` on: reading the trial back
        # every epoch was a database round trip per epoch that pruning does not save.
        if step not in self.reported:
            self.trial.report(float(metrics[self.metric]), step)
            self.reported.add(step)
        return ask_pruner and bool(self.trial.should_prune())

    def finish(self, pruned: bool, metrics: dict[str, float], steps: int,
               mlflow_run_id: str | None) -> dict[str, Any]:
        value = float(metrics[self.metric]) if self.metric in metrics else None
        outcome = "pruned" if pruned else "complete"
        for key, attr in ((OUTCOME_ATTR, outcome), (VALUE_ATTR, value), (STEPS_ATTR, steps),
                          (RUN_ATTR, mlflow_run_id)):
            self.trial.set_user_attr(key, attr)
        return {"trial_number": self.trial.number, "state": outcome, "value": value,
                "metric": self.metric}


def best_trial(hpo: dict[str, Any], study_name: str) -> "optuna.trial.FrozenTrial":
    """The study's best completed trial (the final training trains its params)."""
    from optuna.trial import TrialState

    study = load_study(hpo, study_name)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TrainingError(f"study {study_name!r} has no completed trial; select_best should "
                            "have stopped the DAG run before this step")
    return best_of(study)


def best_of(study: "optuna.Study") -> "optuna.trial.FrozenTrial":
    """The best completed trial, a tie to the lowest trial number. Optuna's `best_trial` orders
    by value alone, so on PostgreSQL two queries (the Airflow side's select_best, this final
    training) could pick different trials of the same value. The Airflow side's
    `arf_training.hpo.best_of` is the same rule (it may not import this package)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
    return min(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
               key=lambda trial: (sign * trial.value, trial.number))


def summarize_study(hpo: dict[str, Any], study_name: str, client: Any,
                    parent_run_id: str) -> dict[str, Any]:
    """Record the study on its parent MLflow run: best params/value, importances, plot."""
    import json

    import optuna
    from optuna.trial import TrialState

    study = load_study(hpo, study_name)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    best = best_of(study)
    summary: dict[str, Any] = {"study": study_name, "best_trial": best.number,
                               "best_value": best.value, "best_params": best.params,
                               "metric": hpo["metric"], "direction": hpo["direction"],
                               "counts": counts,
                               "steps": sum(int(t.user_attrs.get(STEPS_ATTR) or 0)
                                            for t in trials)}
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client.log_batch(
        parent_run_id,
        metrics=[Metric(f"best_{hpo['metric']}", float(best.value), now, 0),
                 *[Metric(f"trials_{k}", float(v), now, 0) for k, v in counts.items()],
                 Metric("trial_steps_total", float(summary["steps"]), now, 0)],
        params=[Param(f"best.{k}", str(v)) for k, v in sorted(best.params.items())],
        tags=[RunTag("arf.hpo.best_trial", str(best.number)),
              RunTag("arf.hpo.best_value", repr(best.value))])
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # e.g. fewer than 2 completed trials
        importances = {}
        summary["importance_error"] = str(exc)
    summary["importances"] = importances
    client.log_dict(parent_run_id, {"evaluator": "optuna default (fANOVA)",
                                    "importances": importances}, "hpo/param_importances.json")
    client.log_dict(parent_run_id, json.loads(json.dumps(summary, default=str)),
                    "hpo/summary.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warnings of optuna's matplotlib plots
        axes = plot_optimization_history(study)
    figure = axes.figure
    try:
        client.log_figure(parent_run_id, figure, "hpo/optimization_history.png")
    finally:
        plt.close(figure)
    return summary
