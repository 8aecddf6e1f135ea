"""Hyperparameter search: the `hpo:` schema, the DAG shape, and the ask/train/tell loop for real.

Optuna (the session's embedded PostgreSQL), MLflow (sqlite) and the trainer run for real: the
Airflow-side task callables of `arf_training.hpo` get a small fake task context (dag_id and
run_id are all they read), and each trial is the train step of the StepSpec that
`build_step_spec(..., trial=...)` makes, run in this process on prepared digits shards (23 steps
per epoch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from trainer_testkit import fresh_tracking_uri, prepare_digits

from arf_training.errors import TemplateError
from arf_training.templates import LoadedTemplate, load_template, parse_template

REPO = Path(__file__).resolve().parents[2]
DIGITS = (REPO / "config_templates" / "digits_smoke.yaml").read_text()
HPO = """
hpo:
  search_space:
    lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
    hidden_size: {type: categorical, choices: [32, 64]}
  metric: val_accuracy
  direction: maximize
  trials: 4
  parallel: 2
  sampler: random
  pruner: none
  budget: {epochs: 2}
"""
DAG_ID = "hpo_digits"


def hpo_template(hpo: str = HPO, **replace: str) -> LoadedTemplate:
    text = (DIGITS.replace("name: digits_smoke", f"name: {DAG_ID}")
            .replace("procs_per_node: 2", "procs_per_node: 1")
            .replace("checkpoint_every_steps: 50", "checkpoint_every_steps: 20")
            .replace("name: digits_classifier", "name: digits_hpo_classifier")) + hpo
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return LoadedTemplate(parse_template(text, "hpo_digits.yaml"), Path("hpo_digits.yaml"),
                          "0" * 64)


def context(run_id: str) -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id=DAG_ID), "dag_run": SimpleNamespace(run_id=run_id)}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Optuna storage, workspaces and MLflow of their own; one thread (as the local backend)."""
    from arf_training.settings import ArfSettings

    # The session's embedded PostgreSQL (conftest; SQLite with ARF_DB=sqlite), as the backend
    # hands it to the trials; the tests keep their studies apart by run id.
    monkeypatch.setenv("ARF_OPTUNA_STORAGE", ArfSettings.from_env().database_uri("optuna"))
    monkeypatch.setenv("ARF_WORKSPACE_ROOT", str(tmp_path / "workspace"))
    monkeypatch.setenv("ARF_TRACKING_URI", fresh_tracking_uri(tmp_path / "mlflow"))
    monkeypatch.setenv("ARF_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ARF_TEST_CRASH_AT_STEP"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def train_trial(loaded: LoadedTemplate, run_id: str, trial: dict[str, Any] | None,
                try_number: int = 1, conf: dict | None = None) -> dict[str, Any]:
    """The mapped trial task's step (or, with trial None, the final train), in this process."""
    from arf_trainer.spec import JobSpec, StepEnv
    from arf_trainer.trainer.run import run_train
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    settings = ArfSettings.from_env()
    spec = build_step_spec(loaded, "train", RunIdentity(DAG_ID, run_id, "round_1.trials",
                                                        try_number), conf or {}, settings,
                           trial=trial)
    if not (spec.workspace / "prepare").exists():
        prepare_digits(spec.workspace)
    env = StepEnv(workspace=spec.workspace, result_path=spec.result_path,
                  tracking_uri=settings.tracking_uri, artifact_root=settings.artifact_root,
                  datahub=Path(settings.datahub_uri), spec=JobSpec.from_dict(spec.job_spec))
    result = run_train(env)
    assert result is not None
    return result


def study_of(loaded: LoadedTemplate, run_id: str):
    from arf_training import hpo

    return hpo.open_study(loaded.template, DAG_ID, run_id)


# -- the schema --------------------------------------------------------------------------------

BAD = [
    pytest.param("    lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}",
                 "    learning_rate: {type: float, low: 1.0e-3, high: 1.0e-1}",
                 ["hpo.search_space.learning_rate", "not a hyperparameter", "'lr'"],
                 id="not-a-hyperparameter"),
    pytest.param("low: 1.0e-3, high: 1.0e-1, log: true", "low: 0.1, high: 0.1",
                 ["hpo.search_space.lr", "empty range", "low 0.1 must be below high 0.1"],
                 id="empty-range"),
    pytest.param("low: 1.0e-3, high: 1.0e-1, log: true", "low: 0.0, high: 0.1, log: true",
                 ["hpo.search_space.lr", "log: true needs a positive low bound", "got low 0.0"],
                 id="log-non-positive"),
    pytest.param("low: 1.0e-3, high: 1.0e-1, log: true", "low: 1.0e-3, high: 5.0",
                 ["hpo.search_space.lr", "value 5.0 is above the hyperparameter's maximum 1.0"],
                 id="outside-hyperparameter-bounds"),
    pytest.param("choices: [32, 64]", "choices: [32, 48]",
                 ["hpo.search_space.hidden_size", "48 is not one of the hyperparameter's enum"],
                 id="choice-outside-enum"),
    pytest.param("choices: [32, 64]", "choices: [32, 32]",
                 ["hpo.search_space.hidden_size", "repeat a value"], id="repeated-choice"),
    pytest.param("choices: [32, 64]", "choices: [32, 32.0]",
                 ["hpo.search_space.hidden_size", "32.0 and 32 are equal to Optuna",
                  "keep one"], id="choice-equal-to-another-of-another-type"),
    pytest.param("low: 1.0e-3, high: 1.0e-1, log: true", "low: 0.0, high: 0.1, step: 0.03",
                 ["hpo.search_space.lr", "not a multiple of step 0.03", "set high to 0.09"],
                 id="float-step"),
    pytest.param("    hidden_size: {type: categorical, choices: [32, 64]}",
                 "    num_layers: {type: float, low: 1, high: 3}",
                 ["hpo.search_space.num_layers", "does not fit the integer hyperparameter",
                  "use type: int"], id="float-for-integer"),
    pytest.param("    hidden_size: {type: categorical, choices: [32, 64]}",
                 "    num_layers: {type: int, low: 1, high: 4, step: 2}",
                 ["hpo.search_space.num_layers", "not a multiple of step 2", "set high to 3"],
                 id="int-step"),
    pytest.param("    hidden_size: {type: categorical, choices: [32, 64]}",
                 "    epochs: {type: int, low: 1, high: 4}",
                 ["hpo.search_space.epochs", "budget", "remove it"], id="epochs-searched"),
    pytest.param("  trials: 4", "  trials: 5",
                 ["hpo", "trials 5 is not a multiple of parallel 2", "use trials 4 or 6"],
                 id="trials-not-rounds-x-parallel"),
    pytest.param("  sampler: random", "  sampler: cmaes",
                 ["hpo.sampler", "'tpe'", "'random'", "'gp'", "'qmc'"], id="unknown-sampler"),
    pytest.param("  pruner: none", "  pruner: patient",
                 ["hpo.pruner", "'median'", "'hyperband'"], id="unknown-pruner"),
    pytest.param("  budget: {epochs: 2}", "  budget: {epochs: 0}",
                 ["hpo.budget.epochs", "greater than or equal to 1"], id="zero-budget"),
    pytest.param("  budget: {epochs: 2}", "  budgets: {epochs: 2}",
                 ["unknown key 'budgets'", "budget"], id="unknown-key"),
    pytest.param("  search_space:\n    lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}\n"
                 "    hidden_size: {type: categorical, choices: [32, 64]}",
                 "  search_space: {}", ["hpo.search_space", "at least 1 item"],
                 id="empty-search-space"),
]


@pytest.mark.parametrize("old, new, fragments", BAD)
def test_bad_hpo_sections_name_the_field_the_value_and_the_fix(old, new, fragments):
    assert hpo_template().template.hpo is not None  # the unedited section is valid
    assert old in HPO, old
    with pytest.raises(TemplateError) as raised:
        hpo_template(HPO.replace(old, new))
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_metric_must_exist_for_the_recipe():
    with pytest.raises(TemplateError, match="'val_accuracy' is reported by the classifier"):
        hpo_template(**{"recipe: classifier": "recipe: bc"})


def test_hpo_needs_a_recipe():
    with pytest.raises(TemplateError, match="hpo needs a built-in training.recipe"):
        hpo_template(**{"  recipe: classifier":
                        "  command: {image: x, command: [python, train.py]}"})


# -- the DAG ----------------------------------------------------------------------------------

def test_shipped_hpo_template_builds_the_search_dag():
    from airflow.serialization.serialized_objects import DagSerialization

    from arf_training.factory import TRIAL_LABEL, build_training_dag

    loaded = load_template(REPO / "config_templates" / "hpo_reach_bc.yaml")
    hpo = loaded.template.hpo
    dag = build_training_dag(loaded, "local")
    rounds = [f"round_{r}.{t}" for r in range(1, hpo.rounds + 1)
              for t in ("ask", "trials", "tell")]
    assert [t.task_id for t in dag.topological_sort()] == [
        "prepare_data", "create_study", *rounds, "select_best", "train", "register_model"]
    for r in range(1, hpo.rounds + 1):
        trials, tell = dag.get_task(f"round_{r}.trials"), dag.get_task(f"round_{r}.tell")
        assert type(trials).__name__ == "MappedOperator"
        assert trials.map_index_template == TRIAL_LABEL
        assert trials.partial_kwargs["step"] == "train"
        assert tell.trigger_rule == "all_done"  # failed trials do not block the study
        assert dag.get_task(f"round_{r}.ask").downstream_task_ids == {f"round_{r}.trials"}
    assert dag.get_task("select_best").downstream_task_ids == {"train"}
    assert "| search | 8 trials (4 round(s) x 2)" in dag.doc_md
    rebuilt = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert sorted(rebuilt.task_ids) == sorted(dag.task_ids)


def test_trial_step_spec_has_its_own_folder_params_and_budget(home, monkeypatch):
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec, config_hash

    monkeypatch.delenv("ARF_OPTUNA_STORAGE")  # the default: the home's embedded database

    loaded = hpo_template()
    run = RunIdentity(DAG_ID, "manual__1", "round_1.trials")
    trial = {"number": 3, "params": {"lr": 0.02, "hidden_size": 32}, "label": "x"}
    spec = build_step_spec(loaded, "train", run, {"epochs": 9}, ArfSettings.from_env(),
                           trial=trial)
    assert spec.job_spec["hyperparameters"]["lr"] == 0.02
    assert spec.job_spec["hyperparameters"]["epochs"] == 2  # the budget, not the conf
    assert spec.job_spec["inputs"]["hpo"] == {"study": f"{DAG_ID}/manual__1", "trial_number": 3,
                                              "train_dir": "trials/trial-0003"}
    assert spec.result_path == spec.workspace / "trials/trial-0003/result.json"
    assert spec.env["ARF_CHECKPOINT_DIR"].endswith("trials/trial-0003/checkpoints")
    assert spec.env["ARF_OPTUNA_STORAGE"] == ArfSettings.from_env().database_uri("optuna")
    other = build_step_spec(loaded, "train", run, {"epochs": 9}, ArfSettings.from_env(),
                            trial={**trial, "number": 4, "params": {**trial["params"], "lr": .03}})
    assert config_hash(other.job_spec) != config_hash(spec.job_spec)
    final = build_step_spec(loaded, "train", run, {}, ArfSettings.from_env())
    assert final.job_spec["inputs"]["hpo"] == {"study": f"{DAG_ID}/manual__1", "select": "best"}
    assert final.result_path == final.workspace / "train" / "result.json"


# -- ask / train / tell, for real ----------------------------------------------------------------

def test_retried_ask_adds_no_trials_and_rounds_reseed(home):
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__ask"
    hpo.create_study(loaded, context(run_id))
    first = hpo.ask(loaded, 0, context(run_id))
    again = hpo.ask(loaded, 0, context(run_id))  # Airflow retried the ask task
    assert [t["number"] for t in first] == [0, 1] and again == first
    assert len(study_of(loaded, run_id).trials) == 2
    second = hpo.ask(loaded, 1, context(run_id))
    assert [t["number"] for t in second] == [2, 3]
    # Seeded with seed + round: round 2 does not replay round 1's random proposals.
    assert [t["params"] for t in second] != [t["params"] for t in first]
    assert first[0]["label"].startswith("trial 0: hidden_size=")


def test_retry_of_a_trial_task_resumes_the_same_trial(home, monkeypatch):
    from optuna.trial import TrialState

    from arf_trainer.errors import TrainingError
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__retry"
    hpo.create_study(loaded, context(run_id))
    trial, other = hpo.ask(loaded, 0, context(run_id))
    # First try: the worker fails after step 30 (epoch 1 of 2 reported, checkpoint step-20).
    monkeypatch.setenv("ARF_TEST_CRASH_AT_STEP", "30")
    monkeypatch.setenv("ARF_TEST_CRASH_RANK", "0")
    with pytest.raises(TrainingError, match="injected failure"):
        train_trial(loaded, run_id, trial)
    monkeypatch.delenv("ARF_TEST_CRASH_AT_STEP")
    frozen = study_of(loaded, run_id).trials[trial["number"]]
    assert frozen.state == TrialState.RUNNING and list(frozen.intermediate_values) == [1]
    # Airflow's retry: the same mapped argument, try 2.
    result = train_trial(loaded, run_id, trial, try_number=2)
    assert result["hpo"]["state"] == "complete" and result["steps"] == 46
    train_trial(loaded, run_id, other)
    told = hpo.tell(loaded, 0, context(run_id))
    assert told == {"complete": [0, 1], "pruned": [], "fail": []}
    study = study_of(loaded, run_id)
    assert len(study.trials) == 2  # no duplicate trial
    assert study.trials[0].value == pytest.approx(result["metrics"]["val_accuracy"])
    # One MLflow run for the trial, resumed by the retry, nested under the study's parent.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["ARF_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name(DAG_ID).experiment_id],
        filter_string=f"tags.`arf.dag_run` = '{DAG_ID}/{run_id}/trial-0'")
    assert len(runs) == 1
    data = runs[0].data
    assert data.params["lr"] == str(trial["params"]["lr"]) and data.params["seed"] == "0"
    assert data.tags["arf.hpo.trial_number"] == "0" and data.tags["arf.hpo.state"] == "complete"
    parent = client.get_run(data.tags["mlflow.parentRunId"])
    assert parent.data.tags["arf.dag_run"] == f"{DAG_ID}/{run_id}/study"


def test_a_failing_trial_is_told_fail_and_the_study_goes_on(home, monkeypatch):
    from optuna.trial import TrialState

    from arf_trainer.errors import TrainingError
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__fail"
    hpo.create_study(loaded, context(run_id))
    good, bad = hpo.ask(loaded, 0, context(run_id))
    train_trial(loaded, run_id, good)
    monkeypatch.setenv("ARF_TEST_CRASH_AT_STEP", "3")
    monkeypatch.setenv("ARF_TEST_CRASH_RANK", "0")
    with pytest.raises(TrainingError):
        train_trial(loaded, run_id, bad)  # the mapped task fails (after its retries)
    assert hpo.tell(loaded, 0, context(run_id)) == {"complete": [0], "pruned": [], "fail": [1]}
    failed = study_of(loaded, run_id).trials[1]
    assert failed.state == TrialState.FAIL
    assert "no outcome recorded" in failed.user_attrs["arf.fail_reason"]
    # The next round is asked and the best trial is the one that completed.
    assert [t["number"] for t in hpo.ask(loaded, 1, context(run_id))] == [2, 3]
    best = hpo.select_best(loaded, context(run_id))
    assert best["number"] == 0 and best["counts"]["fail"] == 1


def test_an_epoch_report_reads_nothing_back_from_the_storage(home):
    """A report is the write of the epoch's value: the trial's reported epochs are known since
    `open` (reading the whole trial back each epoch cost a round trip that pruning never saves,
    on both sides of bench/hpo_pruning.py)."""
    import sqlalchemy

    from arf_trainer.hpo import TrialReporter
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__report"
    hpo.create_study(loaded, context(run_id))
    first, second = hpo.ask(loaded, 0, context(run_id))
    section = loaded.template.model_dump(mode="json")["hpo"]
    reporter = TrialReporter.open(section, {"study": f"{DAG_ID}/{run_id}",
                                            "trial_number": first["number"]})
    storage = reporter.study._storage
    engine = getattr(storage, "_backend", storage).engine  # under Optuna's _CachedStorage
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    sqlalchemy.event.listen(engine, "before_cursor_execute", record)
    try:
        other = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(f"{DAG_ID}/{run_id}"), second["number"])
        statements.clear()
        storage.set_trial_intermediate_value(other, 1, 0.5)  # the write alone
        write = len(statements)
        statements.clear()
        assert reporter.report(1, {"val_accuracy": 0.5}, ask_pruner=False) is False
        assert len(statements) == write, statements
        statements.clear()
        storage.get_trial(reporter.trial_id)  # what each report did before: reads
        assert statements, "reading the trial back costs statements"
        statements.clear()
        reporter.report(1, {"val_accuracy": 0.6}, ask_pruner=False)  # a replayed epoch
        assert statements == []
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", record)
    reopened = TrialReporter.open(section, {"study": f"{DAG_ID}/{run_id}",
                                            "trial_number": first["number"]})
    assert reopened.reported == {1}  # a resumed trial replays no report


def test_a_dead_worker_leaves_a_running_trial_that_tell_fails(home):
    """The worker was killed mid-trial (OOM, node lost): the trial stays RUNNING in the storage
    with its intermediate values and no outcome; the round's tell fails it, once."""
    from optuna.trial import TrialState

    from arf_trainer.hpo import TrialReporter
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__crash"
    hpo.create_study(loaded, context(run_id))
    trials = hpo.ask(loaded, 0, context(run_id))
    section = loaded.template.model_dump(mode="json")["hpo"]
    reporter = TrialReporter.open(section, {"study": f"{DAG_ID}/{run_id}",
                                            "trial_number": trials[0]["number"]})
    assert reporter.report(1, {"val_accuracy": 0.5}) is False  # pruner none
    del reporter  # ... and the process is gone
    first = hpo.tell(loaded, 0, context(run_id))
    assert first == {"complete": [], "pruned": [], "fail": [0, 1]}
    assert hpo.tell(loaded, 0, context(run_id)) == first  # a retried tell changes nothing
    states = [t.state for t in study_of(loaded, run_id).trials]
    assert states == [TrialState.FAIL, TrialState.FAIL]
    # A late retry of the dead trial's task cannot train a trial that was told already.
    with pytest.raises(Exception, match="is FAIL, not RUNNING"):
        TrialReporter.open(section, {"study": f"{DAG_ID}/{run_id}", "trial_number": 0})


def test_no_completed_trial_fails_the_run_with_a_clear_message(home):
    from airflow.sdk.exceptions import AirflowFailException

    from arf_training import hpo
    from arf_training.factory import _hpo_call

    loaded, run_id = hpo_template(), "manual__allfail"
    _hpo_call("create_study", loaded)(**context(run_id))
    for round_index in range(loaded.template.hpo.rounds):
        hpo.ask(loaded, round_index, context(run_id))
        hpo.tell(loaded, round_index, context(run_id))  # no trial recorded an outcome
    with pytest.raises(AirflowFailException) as raised:  # not retried: nothing would change
        _hpo_call("select_best", loaded)(**context(run_id))
    message = str(raised.value)
    assert "no trial of study 'hpo_digits/manual__allfail' completed" in message
    assert "4 trial(s): 4 failed, 0 pruned" in message and "round_*.trials" in message


def test_tell_without_an_ask_fails(home):
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__noask"
    hpo.create_study(loaded, context(run_id))
    with pytest.raises(hpo.HpoError, match="round 1 of study .* has no trials"):
        hpo.tell(loaded, 0, context(run_id))


def test_final_training_retrains_the_best_params_when_the_budget_differs(home):
    """Final epochs 3 vs the trials' budget of 2: the best trial's params are trained again
    (its weights cannot be reused); the run records the params it trained and its trial."""
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__final"
    hpo.create_study(loaded, context(run_id))
    for trial in hpo.ask(loaded, 0, context(run_id)):
        train_trial(loaded, run_id, trial)
    hpo.tell(loaded, 0, context(run_id))
    best = hpo.select_best(loaded, context(run_id))
    result = train_trial(loaded, run_id, None, conf={"epochs": 3})
    assert "reused_trial" not in result and result["steps"] == 3 * 23
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["ARF_TRACKING_URI"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["lr"] == str(best["params"]["lr"])
    assert run.data.tags["arf.hpo.best_trial"] == str(best["number"])
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["arf.hpo.best_trial"] == str(best["number"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "hpo")} == {
        "hpo/optimization_history.png", "hpo/param_importances.json", "hpo/summary.json"}


def test_final_training_reuses_the_best_trial_when_the_budget_matches(home):
    from arf_training import hpo

    loaded, run_id = hpo_template(), "manual__reuse"
    hpo.create_study(loaded, context(run_id))
    trials = hpo.ask(loaded, 0, context(run_id))
    results = {t["number"]: train_trial(loaded, run_id, t) for t in trials}
    hpo.tell(loaded, 0, context(run_id))
    best = hpo.select_best(loaded, context(run_id))
    final = train_trial(loaded, run_id, None, conf={"epochs": 2})
    assert final["reused_trial"] == best["number"] and final["steps"] == 0
    assert final["weights_sha256"] == results[best["number"]]["weights_sha256"]
    assert final["mlflow_run_id"] == results[best["number"]]["mlflow_run_id"]


def test_kubernetes_trials_are_mapped_pods_with_one_name_per_trial(monkeypatch):
    """The same mapped trial task on the Kubernetes backend: a Pod per trial, named apart."""
    import kubernetes_validate
    from test_kubernetes_backend import NAMESPACE, context as k8s_context

    from arf_training.backends.kubernetes import KubernetesBackend, StepPodOperator
    from arf_training.factory import build_training_dag

    monkeypatch.setenv("ARF_K8S_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("ARF_OPTUNA_STORAGE", PROD_STORAGE)
    loaded = load_template(REPO / "config_templates" / "hpo_reach_bc.yaml")
    dag = build_training_dag(loaded, "kubernetes")
    mapped = dag.get_task("round_1.trials")
    assert mapped.operator_class is StepPodOperator or \
        mapped.operator_class.__name__ == "StepPodOperator"
    assert isinstance(KubernetesBackend().trial_task(
        task_id="t", loaded=loaded, trials=[]).partial_kwargs["loaded"], LoadedTemplate)
    names = set()
    for number in (0, 1):
        trial = {"number": number, "params": {"lr": 0.01, "hidden_size": 64, "num_layers": 2},
                 "label": f"trial {number}"}
        task = StepPodOperator(task_id="round_1.trials", loaded=loaded, step="train",
                               trial=trial, namespace=NAMESPACE)
        pod = task.render_pod(k8s_context(dag, "round_1.trials"))
        for version in ("1.30", "1.33"):
            assert kubernetes_validate.validate(pod, version, strict=True) == version
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]
               if "value" in e}
        job_spec = json.loads(env["ARF_JOB_SPEC_JSON"])
        assert job_spec["inputs"]["hpo"]["trial_number"] == number
        assert job_spec["hyperparameters"]["lr"] == 0.01
        assert env["ARF_CHECKPOINT_DIR"].endswith(f"trials/trial-{number:04d}/checkpoints")
        assert env["ARF_OPTUNA_STORAGE"] == PROD_STORAGE
        names.add(pod["metadata"]["name"])
    assert len(names) == 2  # mapped instances of one task must not share a pod name


PROD_STORAGE = "postgresql+psycopg://optuna@postgres.arf.svc:5432/optuna"


def test_kubernetes_trials_without_a_storage_url_fail_naming_the_variable(monkeypatch):
    """A pod cannot reach the embedded PostgreSQL (a socket on the Airflow machine)."""
    from test_kubernetes_backend import NAMESPACE, context as k8s_context

    from arf_training.backends.kubernetes import StepPodOperator
    from arf_training.factory import build_training_dag
    from arf_training.kubernetes.config import KubernetesConfigError

    monkeypatch.setenv("ARF_K8S_NAMESPACE", NAMESPACE)
    monkeypatch.delenv("ARF_OPTUNA_STORAGE", raising=False)
    loaded = load_template(REPO / "config_templates" / "hpo_reach_bc.yaml")
    dag = build_training_dag(loaded, "kubernetes")
    trial = {"number": 0, "params": {"lr": 0.01, "hidden_size": 64, "num_layers": 2},
             "label": "trial 0"}
    task = StepPodOperator(task_id="round_1.trials", loaded=loaded, step="train", trial=trial,
                           namespace=NAMESPACE)
    with pytest.raises(KubernetesConfigError, match="set ARF_OPTUNA_STORAGE"):
        task.render_pod(k8s_context(dag, "round_1.trials"))
