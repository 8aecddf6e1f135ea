"""Hyperparameter search on the Airflow side: the study's ask/tell loop around mapped trials.

A template with an `hpo:` section becomes (see `arf_training.factory`)::

    prepare_data -> create_study -> [round_r.ask -> round_r.trials.expand(trial) -> round_r.tell]
                 x rounds -> select_best -> train -> register_model

One Optuna study per DAG run, named ``<dag_id>/<run_id>``, in the RDB storage named by
``ARF_OPTUNA_STORAGE`` (default: the embedded PostgreSQL's ``optuna`` database, see
`arf_training.postgres`; SQLite ``<ARF home>/optuna.db`` with ARF_DB=sqlite).

Where things happen, and why:

* **ask** (here, centrally): `study.ask` with the template's fixed distributions, `parallel`
  trials per round, each tagged with its round (user attr ``arf.round``). Idempotent: a retried
  ask returns the round's trials already asked and asks only the missing ones, so a retry never
  adds trials. The sampler is seeded with ``hpo.seed + round``: a fresh sampler each round
  would otherwise repeat the previous round's random start-up proposals.
* **trials** (mapped `train` steps through the backend, one per trial): the container
  reconstructs the trial from its number, reports the metric after every epoch and stops when
  `should_prune()` says so (rank 0 asks; the decision is broadcast to every rank). It records
  its outcome on the trial (user attrs ``arf.outcome``, ``arf.value``) and leaves the trial
  RUNNING. A retried trial task is the same trial (the mapped argument carries its number) and
  resumes from its own checkpoints in ``trials/trial-<n>/``.
* **tell** (here, centrally, trigger rule ``all_done``): tells every trial of the round what
  its container recorded (COMPLETE with its value, or PRUNED); a trial without an outcome -
  the task failed, timed out, or its worker died and left it RUNNING - is told FAIL with the
  reason, and the study goes on. Telling is idempotent (`skip_if_finished`).
* **select_best** fails the DAG run, with the counts, only when no trial completed.

The pruner is not stored in the database: both sides build it with
`arf_trainer.hpo.build_pruner` from the same `hpo` section. Optuna (and that module) are
imported when a task runs, never when the DAG file is parsed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

from arf_training.errors import ArfError
from arf_training.settings import ArfSettings

if TYPE_CHECKING:
    import optuna

    from arf_training.stepspec import RunIdentity
    from arf_training.templates import LoadedTemplate, TrainingTemplate

log = logging.getLogger(__name__)

STORAGE_ENV = "ARF_OPTUNA_STORAGE"
ROUND_ATTR = "arf.round"
OUTCOME_ATTR = "arf.outcome"
VALUE_ATTR = "arf.value"
FAIL_REASON_ATTR = "arf.fail_reason"


class HpoError(ArfError):
    """The search cannot go on (no trial completed, storage unusable, ...)."""


# -- pure helpers (also used by build_step_spec) --------------------------------------------

def storage_url(settings: ArfSettings) -> str:
    """The Optuna RDB storage: ARF_OPTUNA_STORAGE, else the ARF home's embedded database
    (PostgreSQL; SQLite with ARF_DB=sqlite)."""
    return os.environ.get(STORAGE_ENV) or settings.database_uri("optuna")


def study_name(dag_id: str, run_id: str) -> str:
    """One study per DAG run."""
    return f"{dag_id}/{run_id}"


def trial_dir(number: int) -> str:
    """A trial's folder in the run workspace (checkpoints, weights, result, tracking spool);
    one definition for both sides (the container finds the best trial's weights there)."""
    from arf_trainer.hpo import trial_dir as container_trial_dir  # no heavy imports

    return container_trial_dir(number)


def trial_label(number: int, params: dict[str, Any]) -> str:
    """The mapped task's label in the Airflow grid: the trial number and its params."""
    def show(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return f"trial {number}: " + ", ".join(f"{k}={show(v)}" for k, v in sorted(params.items()))


def step_inputs(template: "TrainingTemplate", run: "RunIdentity",
                trial: dict[str, Any] | None) -> dict[str, Any]:
    """`inputs.hpo` of a train step's job spec: which study, and which trial (or the best)."""
    inputs: dict[str, Any] = {"study": study_name(run.dag_id, run.run_id)}
    if trial is None:
        inputs["select"] = "best"
        return inputs
    try:
        number = int(trial["number"])
        params = dict(trial["params"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HpoError(f"trial {trial!r} is not a trial the ask task returned (need 'number' "
                       "and 'params')") from exc
    unknown = sorted(set(params) - set(template.hpo.search_space))
    if unknown:
        raise HpoError(f"trial {number} has params {unknown} outside hpo.search_space "
                       f"{sorted(template.hpo.search_space)}: the study was made from another "
                       "version of the template; start a new DAG run")
    inputs.update({"trial_number": number, "train_dir": trial_dir(number)})
    return inputs


def trial_hyperparameters(template: "TrainingTemplate", values: dict[str, Any],
                          trial: dict[str, Any]) -> dict[str, Any]:
    """The trial's hyperparameters: the run's values, the trial's params, the budget's epochs."""
    return {**values, **dict(trial["params"]), "epochs": template.hpo.budget.epochs}


# -- run time: the study ---------------------------------------------------------------------

OPEN_ATTEMPTS = 5
_opened: dict[str, "optuna.storages.BaseStorage"] = {}


def _storage(url: str) -> "optuna.storages.BaseStorage":
    """The storage of `url`, opened once per process: each RDBStorage has its own engine, whose
    pooled connections stay open until garbage collection, so a storage per call made a long
    process (the pruning benchmark, a test session) run out of PostgreSQL's connection slots."""
    if url not in _opened:
        _opened[url] = _open_storage(url)
    return _opened[url]


def _open_storage(url: str) -> "optuna.storages.BaseStorage":
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    race: Exception | None = None
    for attempt in range(OPEN_ATTEMPTS):
        time.sleep(0.3 * attempt)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Several create_study tasks on a fresh database (simultaneous triggers): Optuna
            # creates its tables without a lock, and on PostgreSQL all creators but one fail
            # on the catalog's unique index. Once the winner is done the tables exist.
            race = exc
        except Exception as exc:
            raise _storage_error(url, exc) from exc
    raise _storage_error(url, race) from race


def _storage_error(url: str, exc: Exception) -> HpoError:
    shown = url.split("@")[-1]  # never log credentials
    return HpoError(f"cannot open the Optuna storage ...@{shown} ({STORAGE_ENV}): {exc}; "
                    "check the URL and that the database is reachable")


def open_study(template: "TrainingTemplate", dag_id: str, run_id: str, *,
               round_index: int = 0, create: bool = False) -> "optuna.Study":
    import optuna

    from arf_trainer.hpo import build_pruner, build_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hpo = template.model_dump(mode="json")["hpo"]
    storage = _storage(storage_url(ArfSettings.from_env()))
    name = study_name(dag_id, run_id)
    kwargs = {"study_name": name, "storage": storage, "sampler": build_sampler(hpo, round_index),
              "pruner": build_pruner(hpo)}
    if create:
        return optuna.create_study(direction=template.hpo.direction, load_if_exists=True,
                                   **kwargs)
    try:
        return optuna.load_study(**kwargs)
    except KeyError as exc:
        raise HpoError(f"study {name!r} does not exist in the Optuna storage; the create_study "
                       "task of this DAG run must run first") from exc


def _ids(context: Any) -> tuple[str, str]:
    return context["ti"].dag_id, context["dag_run"].run_id


RUN_AFTER_ATTR = "arf.dag_run_after"


def create_study(loaded: "LoadedTemplate", context: Any) -> dict[str, Any]:
    """Create (or, on a retry, find) this DAG run's study."""
    dag_id, run_id = _ids(context)
    study = open_study(loaded.template, dag_id, run_id, create=True)
    run_after = getattr(context["dag_run"], "run_after", None)
    if run_after is not None:
        study = _own_study(loaded.template, study, (dag_id, run_id), run_after.isoformat())
    hpo = loaded.template.hpo
    study.set_user_attr("arf.template", loaded.name)
    study.set_user_attr("arf.template_sha256", loaded.sha256)
    study.set_user_attr("arf.metric", hpo.metric)
    log.info("study %r: %d trials in %d round(s) of %d, %s sampler, %s pruner, metric %s (%s)",
             study.study_name, hpo.trials, hpo.rounds, hpo.parallel, hpo.sampler, hpo.pruner,
             hpo.metric, hpo.direction)
    return {"study": study.study_name, "trials": hpo.trials, "rounds": hpo.rounds}


def _own_study(template: "TrainingTemplate", study: "optuna.Study", ids: tuple[str, str],
               run_after: str) -> "optuna.Study":
    """`study`, unless another DagRun of the run id (deleted, then triggered again) made it:
    then that one is kept as ``<name> (DagRun <its run_after>)`` and this run gets a new one
    (its trials would count towards this run's budget). One without the attribute predates it
    and is adopted (arf_trainer.dag_run_dir has the why)."""
    import optuna

    theirs = study.user_attrs.get(RUN_AFTER_ATTR)
    if theirs is None:
        study.set_user_attr(RUN_AFTER_ATTR, run_after)
        return study
    if theirs == run_after:
        return study
    name, storage = study.study_name, _storage(storage_url(ArfSettings.from_env()))
    kept = f"{name} (DagRun {theirs})"
    optuna.copy_study(from_study_name=name, from_storage=storage, to_storage=storage,
                      to_study_name=kept)
    optuna.delete_study(study_name=name, storage=storage)
    log.warning("study %r belonged to another DagRun of this run id (run_after %s; this one's "
                "is %s): kept as %r, and this run starts a new study", name, theirs, run_after,
                kept)
    fresh = open_study(template, *ids, create=True)
    fresh.set_user_attr(RUN_AFTER_ATTR, run_after)
    return fresh


def _round_trials(study: "optuna.Study", round_index: int) -> list["optuna.trial.FrozenTrial"]:
    return sorted((t for t in study.get_trials(deepcopy=False)
                   if t.user_attrs.get(ROUND_ATTR) == round_index), key=lambda t: t.number)


def ask(loaded: "LoadedTemplate", round_index: int, context: Any) -> list[dict[str, Any]]:
    """Ask this round's trials (only those not asked yet: a retry adds none)."""
    from arf_trainer.hpo import distributions

    dag_id, run_id = _ids(context)
    template = loaded.template
    study = open_study(template, dag_id, run_id, round_index=round_index)
    fixed = distributions(template.model_dump(mode="json")["hpo"]["search_space"])
    existing = _round_trials(study, round_index)
    # A trial an earlier try asked but died before tagging: every earlier round's tell failed
    # its own, so an untagged running trial is this round's (its next draw). Adopt it. Not a
    # WAITING one: that was enqueued (study.enqueue_trial) and is what `study.ask` hands out next.
    from optuna.trial import TrialState

    for t in sorted((t for t in study.get_trials(deepcopy=False)
                     if ROUND_ATTR not in t.user_attrs and t.state == TrialState.RUNNING),
                    key=lambda t: t.number)[:max(0, template.hpo.parallel - len(existing))]:
        _set_trial_attr(study, t.number, ROUND_ATTR, round_index)
        existing.append(t)
    if existing:
        log.info("round %d already has trial(s) %s (a retried ask): asking only %d more",
                 round_index + 1, sorted(t.number for t in existing),
                 max(0, template.hpo.parallel - len(existing)))
        _replay(study, fixed, len(existing))
    for _ in range(template.hpo.parallel - len(existing)):
        trial = study.ask(fixed_distributions=fixed)
        trial.set_user_attr(ROUND_ATTR, round_index)
    trials = [{"number": t.number, "params": dict(t.params),
               "label": trial_label(t.number, t.params)}
              for t in _round_trials(study, round_index)]
    for t in trials:
        log.info("round %d: %s", round_index + 1, t["label"])
    return trials


def _replay(study: "optuna.Study", fixed: dict[str, Any], count: int) -> None:
    """Advance the study's (fresh, round-seeded) sampler past the `count` proposals an earlier
    try of this ask made, so the trials asked now get the draws an uninterrupted ask would
    have given (same seed, same trials), not a repeat of the first ones. Replayed by a copy of
    the sampler on an in-memory copy of the finished trials (the samplers ignore running ones;
    a sampler's search-space cache is bound to one study), whose random states the study's
    sampler then takes over."""
    import copy

    import optuna

    if isinstance(study.sampler, optuna.samplers.QMCSampler):
        return  # its position in the sequence is kept in the study
    replayer = copy.deepcopy(study.sampler)
    ghost = optuna.create_study(direction=study.direction, sampler=replayer)
    ghost.add_trials([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    for _ in range(count):
        ghost.ask(fixed_distributions=fixed)
    _take_random_states(replayer, study.sampler)


def _take_random_states(source: Any, target: Any) -> None:
    """Copy every numpy RandomState of sampler `source` (its own, lazily made ones, those of
    the samplers it holds) onto the same place in `target`, built alike."""
    import numpy as np
    import optuna

    for name, value in vars(source).items():
        if isinstance(value, np.random.RandomState):
            getattr(target, name).set_state(value.get_state())
        elif isinstance(getattr(value, "rng", None), np.random.RandomState):
            getattr(target, name).rng.set_state(value.rng.get_state())
        elif isinstance(value, optuna.samplers.BaseSampler):
            _take_random_states(value, getattr(target, name))


def tell(loaded: "LoadedTemplate", round_index: int, context: Any) -> dict[str, list[int]]:
    """Tell the study how each trial of the round ended; FAIL for those with no outcome."""
    from optuna.trial import TrialState

    dag_id, run_id = _ids(context)
    study = open_study(loaded.template, dag_id, run_id, round_index=round_index)
    trials = _round_trials(study, round_index)
    if not trials:
        raise HpoError(f"round {round_index + 1} of study {study.study_name!r} has no trials: its "
                       "ask task did not run or failed; see that task's log")
    # A trial asked by an ask task that died before tagging it with its round: never trained.
    trials += [t for t in study.get_trials(deepcopy=False)
               if ROUND_ATTR not in t.user_attrs and not t.state.is_finished()]
    told: dict[str, list[int]] = {"complete": [], "pruned": [], "fail": []}
    for t in trials:
        if t.state.is_finished():  # told by an earlier try of this task
            key = {TrialState.COMPLETE: "complete",
                   TrialState.PRUNED: "pruned"}.get(t.state, "fail")
            told[key].append(t.number)
            continue
        outcome, value = t.user_attrs.get(OUTCOME_ATTR), t.user_attrs.get(VALUE_ATTR)
        finite = value is not None and math.isfinite(float(value))
        if outcome == "complete" and finite:
            study.tell(t.number, float(value), skip_if_finished=True)
            told["complete"].append(t.number)
        elif outcome == "pruned":
            study.tell(t.number, state=TrialState.PRUNED, skip_if_finished=True)
            told["pruned"].append(t.number)
        else:
            reason = ("no outcome recorded: the trial task failed, timed out, or its worker died "
                      "and left the trial RUNNING; see the trial task's log"
                      if outcome != "complete" else
                      f"its {loaded.template.hpo.metric} is {value!r}, not a finite value (the "
                      "training diverged)")
            _set_trial_attr(study, t.number, FAIL_REASON_ATTR, reason)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("trial %d: %s; told FAIL, the study goes on", t.number, reason)
            told["fail"].append(t.number)
    log.info("round %d told: %s", round_index + 1, told)
    return told


def _set_trial_attr(study: "optuna.Study", number: int, key: str, value: Any) -> None:
    """A user attr on a RUNNING trial known by its number (the public storage API)."""
    storage = study._storage  # noqa: SLF001 - Optuna has no public accessor; BaseStorage API
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number)
    storage.set_trial_user_attr(trial_id, key, value)


def select_best(loaded: "LoadedTemplate", context: Any) -> dict[str, Any]:
    """The best completed trial; fails (clearly) when none completed."""
    from optuna.trial import TrialState

    dag_id, run_id = _ids(context)
    study = open_study(loaded.template, dag_id, run_id)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                            TrialState.RUNNING)}
    if not counts["complete"]:
        raise HpoError(
            f"no trial of study {study.study_name!r} completed ({len(trials)} trial(s): "
            f"{counts['fail']} failed, {counts['pruned']} pruned, {counts['running']} running), "
            "so there is no model to train and register. Read the failed trial tasks' logs "
            "(round_*.trials), fix the cause (search space, data, budget) and trigger a new run")
    best = best_of(study)
    log.info("best of %d trial(s) (%s): trial %d, %s = %g, params %s", len(trials), counts,
             best.number, loaded.template.hpo.metric, best.value, best.params)
    return {"study": study.study_name, "number": best.number, "value": best.value,
            "params": dict(best.params), "counts": counts}


def best_of(study: Any) -> Any:
    """The best completed trial, a tie to the lowest trial number: the container side's
    `arf_trainer.hpo.best_of` (the final training trains the same trial; Optuna's own
    `best_trial` orders by value alone, so on PostgreSQL it may pick either of two ties)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
    return min(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
               key=lambda trial: (sign * trial.value, trial.number))
