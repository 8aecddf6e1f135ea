"""The DAG factory: one Airflow DAG per valid training template, plus `arf_evaluate`.

    prepare_data -> train -> register_model --(Asset arf-model://<model name>)--> arf_evaluate

A template with a `nightly:` section starts with `choose_recipe` (fine-tune or retrain tonight;
the later steps read the conf it returns, `arf_training.runtime.trigger_conf`).

A template with an `hpo:` section searches first (see `arf_training.hpo`)::

    prepare_data -> create_study -> [round_r.ask -> round_r.trials (mapped) -> round_r.tell]
                 x rounds -> select_best -> train -> register_model

Called from the thin file in `dags/`. Reads YAML and builds operators only: no I/O besides the
template files, no Airflow Variables, no heavy imports.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from arf_training.approval import add_approval, approval_required, approval_timeout
from arf_training.backends import get_backend
from arf_training.errors import TemplateError, TemplateIssue
from arf_training.params import build_params
from arf_training.runtime import CHOOSE_TASK
from arf_training.settings import backend_name, templates_dir
from arf_training.templates import LoadedTemplate, load_folder, template_files

log = logging.getLogger(__name__)

EVALUATE_DAG_ID = "arf_evaluate"
TASKS = (("prepare_data", "prepare"), ("train", "train"), ("register_model", "register"))


def _doc(loaded: LoadedTemplate, backend: str) -> str:
    t = loaded.template
    how = f"recipe `{t.training.recipe}`" if t.training.recipe else \
        f"custom command `{' '.join(t.training.command.command)}` in `{t.training.command.image}`"
    return (
        f"{t.metadata.description.strip()}\n\n"
        f"| | |\n|---|---|\n"
        f"| template | `{loaded.path.name}` (sha256 `{loaded.sha256[:12]}`) |\n"
        f"| training | {how}, {t.training.distributed.nodes} node(s) x "
        f"{t.training.distributed.procs_per_node} process(es) |\n"
        f"| registers | `{t.model.name}` (Asset `{t.model_asset_uri}`) |\n"
        + (f"| search | {t.hpo.trials} trials ({t.hpo.rounds} round(s) x {t.hpo.parallel}), "
           f"{t.hpo.sampler} sampler, {t.hpo.pruner} pruner, {t.hpo.direction} "
           f"`{t.hpo.metric}`, {t.hpo.budget.epochs} epoch(s) per trial |\n" if t.hpo else "")
        + (_nightly_row(t.nightly) if t.nightly else "")
        + f"| backend | `{backend}` |\n\n"
        "Trigger with config to change hyperparameters; unknown or out-of-range values are "
        "rejected before any step runs."
    )


def _nightly_row(n: Any) -> str:
    """The DAG page's line for a `nightly:` section (arf_trainer/nightly/policy.py decides)."""
    rules = [f"retrain while the champion is below {n.retrain_below:.0%}"
             if n.retrain_below is not None else "",
             f"at least every {n.retrain_every} nights" if n.retrain_every else ""]
    rule = ", ".join(r for r in rules if r) if n.mode == "adaptive" else ""
    return (f"| nightly | `{CHOOSE_TASK}`: {rule or 'fine-tune every night'}, within "
            f"{n.compute_budget:.0%} of a from-scratch retrain; trigger with `nightly_recipe` "
            "to force one |\n")


def _schedule(t: Any) -> Any:
    """The template's schedule; a data-interval timetable when its query reads the interval.

    Airflow 3 turns a cron string into a CronTriggerTimetable, whose runs have an empty data
    interval (start == end == the fire time). A query selecting `[data_interval_start,
    data_interval_end)` needs contiguous intervals instead: each run covers the time since the
    previous fire time (CronDataIntervalTimetable, UTC), so no row is read twice or missed.
    """
    if t.schedule is None or not t.uses_data_interval:
        return t.schedule
    from airflow.sdk import CronDataIntervalTimetable

    return CronDataIntervalTimetable(t.schedule, timezone="UTC")


def build_training_dag(loaded: LoadedTemplate, backend_id: str | None = None):
    """The DAG of one template: prepare_data -> train -> register_model."""
    from airflow.sdk import DAG, Asset

    t = loaded.template
    backend = get_backend(backend_id or backend_name())
    dag = DAG(
        dag_id=t.name,
        description=(t.metadata.description.strip().splitlines() or [""])[0][:200],
        doc_md=_doc(loaded, backend.name),
        schedule=_schedule(t),
        start_date=datetime.combine(t.start_date, datetime.min.time(), tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=t.max_active_runs,
        tags=sorted({"arf", *t.metadata.tags}),
        # Registered by the DAG file's globals only: a DAG whose build fails half-way (after
        # its `with` block) must not be picked up by Airflow's auto-registration.
        auto_register=False,
        default_args={
            "owner": t.metadata.owner,
            "retries": t.training.retries,
            "retry_delay": timedelta(seconds=30),
            "execution_timeout": timedelta(minutes=t.training.timeout_minutes),
        },
    )
    with dag:
        previous = None
        if t.nightly is not None:  # fine-tune or retrain tonight (arf_trainer.nightly)
            previous = backend.step_task(task_id=CHOOSE_TASK, loaded=loaded, step="choose")
        if t.federated is not None:  # prepare per site -> federate -> register (federation.py)
            previous = backend.site_task(task_id="prepare_data", loaded=loaded)
            federate = backend.federate_task(task_id="federate", loaded=loaded)
            previous >> federate
            previous = federate
        for task_id, step in TASKS:
            if t.federated is not None and step != "register":
                continue
            extra: dict[str, Any] = {}
            if step == "register":
                extra["outlets"] = [Asset(t.model_asset_uri, extra={"template": t.name})]
            task = backend.step_task(task_id=task_id, loaded=loaded, step=step, **extra)
            if previous is not None:
                if step == "train" and t.hpo is not None:
                    previous = _search(loaded, backend, previous)
                previous >> task
            previous = task
    # The trigger form's Params are set once the tasks exist. Every operator class in a task's
    # hierarchy deep-copies the DAG's params into the task (Airflow's apply_defaults), which
    # was half of a DAG's build time, and no task needs its own copy: at run time the task's
    # params are the DAG's, merged with the run's conf (`process_params`).
    dag.params = build_params(t)
    return dag


# The mapped trial instances' label in the grid: "trial 3: hidden_size=64, lr=0.00123".
TRIAL_LABEL = "{{ task.trial['label'] }}"


def _hpo_call(name: str, loaded: LoadedTemplate, *args: Any):
    """A task callable that runs `arf_training.hpo.<name>` (Optuna is imported at run time).

    An `HpoError` (no trial completed, no such study) fails the task without retries.
    """
    def call(**context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException

        from arf_training import hpo
        try:
            return getattr(hpo, name)(loaded, *args, context)
        except hpo.HpoError as exc:
            raise AirflowFailException(str(exc)) from exc

    call.__name__ = name
    return call


def _search(loaded: LoadedTemplate, backend: Any, upstream: Any) -> Any:
    """create_study -> [ask -> trials.expand -> tell] x rounds -> select_best, after `upstream`.

    tell runs when every trial instance is done, failed ones included (trigger rule all_done):
    it tells them FAIL and the study goes on; select_best fails the run if none completed.
    """
    from airflow.sdk import TaskGroup, task

    hpo = loaded.template.hpo
    previous = task(task_id="create_study")(_hpo_call("create_study", loaded))()
    upstream >> previous
    for round_index in range(hpo.rounds):
        with TaskGroup(group_id=f"round_{round_index + 1}",
                       tooltip=f"ask {hpo.parallel} trial(s), train them, tell the study"):
            asked = task(task_id="ask")(_hpo_call("ask", loaded, round_index))()
            trials = backend.trial_task(task_id="trials", loaded=loaded, trials=asked,
                                        map_index_template=TRIAL_LABEL)
            told = task(task_id="tell", trigger_rule="all_done")(
                _hpo_call("tell", loaded, round_index))()
            trials >> told
        previous >> asked
        previous = told
    best = task(task_id="select_best")(_hpo_call("select_best", loaded))()
    previous >> best
    return best


def build_evaluate_dag(templates: list[LoadedTemplate], backend_id: str | None = None):
    """`arf_evaluate`: scheduled on the model Assets of every template with an evaluation."""
    from airflow.sdk import DAG, Asset, Param

    backend = get_backend(backend_id or backend_name())
    evaluable = backend.evaluable(templates)
    assets = [Asset(t.template.model_asset_uri) for t in evaluable.values()]
    schedule = None
    if assets:
        schedule = assets[0]
        for asset in assets[1:]:
            schedule = schedule | asset  # any one model's new version triggers a run
    dag = DAG(
        dag_id=EVALUATE_DAG_ID,
        description="Evaluates every newly registered model version in simulation.",
        doc_md=("Runs when a training DAG registers a model (Asset `arf-model://<name>`), or by "
                "hand with `model_name` and `model_version`. Records success rate and mean final "
                "distance on the MLflow model version (tags `arf.eval.*`).\n\nEvaluable models: "
                + (", ".join(f"`{m}`" for m in sorted(evaluable)) or "none")),
        schedule=schedule,
        start_date=datetime(2025, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=4,
        tags=["arf", "evaluation"],
        auto_register=False,
        params={
            "model_name": Param(None, type=["null", "string"], enum=[None, *sorted(evaluable)],
                                description="Model to evaluate on a manual run."),
            "model_version": Param(None, type=["null", "string"],
                                   description="Its registry version, e.g. '3'."),
        },
        default_args={"owner": "arf", "retries": 1, "retry_delay": timedelta(seconds=30)},
    )
    with dag:
        evaluate = backend.evaluate_task(task_id="evaluate", templates=evaluable)
        if approval_required(evaluable):  # evaluation.gate.approval: required
            add_approval(evaluate, approval_timeout(evaluable))
    return dag


def build_dags(folder: Path | None = None) -> dict[str, Any]:
    """Every DAG the templates in `folder` define, keyed by dag_id (for the DAG file's globals).

    Invalid templates are skipped here and reported by `template_issues` (the second DAG file
    raises them so they show as import errors in the UI without hiding these DAGs).
    """
    with _gc_paused():
        loaded, _issues = load_folder(template_files(folder or templates_dir()))
        loaded, _unrunnable = _runnable(loaded)
        dags: dict[str, Any] = {}
        for t in loaded:
            # The schema refuses what Airflow would (template_issues reports it without
            # building: a second build of every DAG would cost a third of the parse). This is
            # the net under it: one template whose DAG still fails must not take every DAG of
            # this file with it.
            try:
                dags[t.name] = build_training_dag(t)
            except Exception:  # noqa: BLE001 - logged, and the template left out
                log.exception("template %s (%s): its DAG cannot be built and is left out; the "
                              "schema let this through, please report it", t.name, t.path)
        dags[EVALUATE_DAG_ID] = build_evaluate_dag([t for t in loaded if t.name in dags])
    return dags


def template_issues(folder: Path | None = None) -> list[TemplateIssue]:
    with _gc_paused():
        loaded, issues = load_folder(template_files(folder or templates_dir()))
    return issues + _runnable(loaded)[1]


def _runnable(loaded: list[LoadedTemplate]) -> tuple[list[LoadedTemplate], list[TemplateIssue]]:
    """The templates this backend can run, and an issue for each it cannot (a `federated:`
    template needs a backend with `site_task`/`federate_task`; the local one has them)."""
    backend = get_backend(backend_name())
    if hasattr(backend, "federate_task"):
        return loaded, []
    bad = [t for t in loaded if t.template.federated is not None]
    return [t for t in loaded if t not in bad], [TemplateIssue(
        file=str(t.path), message=f"template {t.name!r} has a 'federated' section, which the "
        f"{backend.name!r} backend cannot run yet (ARF_BACKEND=local runs it); its DAG is not "
        "built") for t in bad]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the templates are read and the DAGs built.

    Both allocate some 100,000 objects and free few: the collector would run dozens of times
    over them for nothing, and once over every object of the process (Airflow's included), a
    full collection that cost a fifth of a 100-template parse. Nothing is lost: reference
    counting frees as usual, and the collector resumes (and catches up) when this ends.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def raise_template_issues(folder: Path | None = None) -> None:
    """Raise every template problem as one error: Airflow shows it as this file's import error."""
    issues = template_issues(folder)
    if issues:
        count = len({i.file for i in issues})
        header = TemplateIssue(
            file=str(folder or templates_dir()),
            message=f"{count} invalid template(s); their DAGs are not built (the other templates' "
                    "DAGs are). Fix them (`arf templates lint`) and save to reload:")
        raise TemplateError([header, *issues])
