"""Hyperparameter search end to end through real Airflow (`airflow dags test`), Optuna, MLflow.

`hpo_reach_bc` as shipped: 8 trials in 4 rounds of 2 mapped tasks, 6 epochs each, median
pruning; the best trial's weights are the final model (budget = final epochs), registered with
its lineage. About 3 minutes on 2 busy cores. A second, tiny search (one round of 2 trials on
the digits table) whose every trial fails shows the DAG run failing with the study's counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_airflow_e2e import dags_test, latest_run, mlflow_client

from arf_training.settings import ArfSettings
from arf_training.stepspec import workspace_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~3 min of 8-trial searches
REPO = Path(__file__).resolve().parents[2]


def task_instances(dag_id: str, run_id: str) -> list[tuple[str, int, str, str | None]]:
    """(task_id, map_index, state, rendered map index) of every task instance of the run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id,
                                                         TaskInstance.run_id == run_id)).all()
        return sorted((ti.task_id, ti.map_index, str(ti.state), ti.rendered_map_index)
                      for ti in tis)


def study(dag_id: str, run_id: str):
    import optuna

    from arf_training.hpo import storage_url

    return optuna.load_study(study_name=f"{dag_id}/{run_id}",
                             storage=storage_url(ArfSettings.from_env()))


def test_hpo_reach_bc_searches_prunes_and_registers_the_best(embedded):
    from optuna.trial import TrialState

    proc = dags_test(embedded, "hpo_reach_bc", {})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run("hpo_reach_bc")
    assert str(run.state) == "success"

    tis = task_instances("hpo_reach_bc", run.run_id)
    trials_tis = [ti for ti in tis if ti[0].endswith(".trials")]
    assert len(trials_tis) == 8 and all(state == "success" for _, _, state, _ in trials_tis)
    # The grid's label of each mapped instance: the trial number and its params.
    labels = sorted(label for *_, label in trials_tis)
    assert labels[0].startswith("trial 0: hidden_size=") and "lr=" in labels[0], labels

    s = study("hpo_reach_bc", run.run_id)
    states = [t.state for t in s.trials]
    assert len(states) == 8, states  # the configured number, no duplicates
    assert states.count(TrialState.PRUNED) >= 1, states
    assert states.count(TrialState.COMPLETE) >= 2 and TrialState.RUNNING not in states
    best = s.best_trial

    ws = workspace_for(ArfSettings.from_env(), "hpo_reach_bc", run.run_id)
    train = json.loads((ws / "train" / "result.json").read_text())
    register = json.loads((ws / "register" / "result.json").read_text())
    assert train["reused_trial"] == best.number  # budget == final epochs: no retraining
    client = mlflow_client(embedded)
    version = client.get_model_version("reach_bc_policy_hpo", register["model_version"])
    assert version.run_id == best.user_attrs["arf.mlflow_run_id"]
    assert version.tags["arf.weights_sha256"] == train["weights_sha256"]

    # The parent run of the study with a nested run per trial, and the study's summary.
    trial_run = client.get_run(version.run_id)
    assert trial_run.data.params["lr"] == str(best.params["lr"])
    assert trial_run.data.params["seed"] == "0" and trial_run.data.params["epochs"] == "6"
    assert trial_run.data.metrics["val_loss"] == pytest.approx(best.value)
    parent_id = trial_run.data.tags["mlflow.parentRunId"]
    children = client.search_runs([trial_run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 8
    parent = client.get_run(parent_id)
    assert parent.data.params["best.lr"] == str(best.params["lr"])
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.value)
    assert parent.data.metrics["trials_pruned"] == states.count(TrialState.PRUNED)
    artifacts = {a.path for a in client.list_artifacts(parent_id, "hpo")}
    assert artifacts == {"hpo/optimization_history.png", "hpo/param_importances.json",
                         "hpo/summary.json"}
    importances = json.loads(Path(client.download_artifacts(
        parent_id, "hpo/param_importances.json")).read_text())["importances"]
    assert set(importances) == set(best.params)


TINY = (REPO / "config_templates" / "digits_smoke.yaml").read_text() \
    .replace("name: digits_smoke", "name: hpo_all_fail") \
    .replace("name: digits_classifier", "name: hpo_all_fail_model") \
    .replace("procs_per_node: 2", "procs_per_node: 1") + """
hpo:
  search_space:
    lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
  metric: val_loss
  trials: 2
  parallel: 2
  budget: {epochs: 1}
"""


def test_a_search_whose_trials_all_fail_fails_the_run_clearly(embedded, tmp_path):
    (tmp_path / "hpo_all_fail.yaml").write_text(TINY)
    # Every trial crashes in its container (the trainer's test hook, any trial). Until the
    # seed Param got the trainer's bound, a seed the Params accepted but the trainer refused
    # did this.
    env = {**embedded, "ARF_TEMPLATES_DIR": str(tmp_path), "ARF_TEST_CRASH_AT_STEP": "1",
           "ARF_TEST_CRASH_RANK": "0"}
    proc = dags_test(env, "hpo_all_fail", {})
    output = proc.stdout + proc.stderr
    run = latest_run("hpo_all_fail")
    assert str(run.state) == "failed"
    states = {(task, index): state for task, index, state, _ in
              task_instances("hpo_all_fail", run.run_id)}
    assert states[("round_1.trials", 0)] == "failed" == states[("round_1.trials", 1)]
    assert states[("round_1.tell", -1)] == "success"  # all_done: the failures were told
    assert states[("select_best", -1)] == "failed"
    assert states[("train", -1)] == "upstream_failed"
    assert "no trial of study 'hpo_all_fail/" in output and "2 failed, 0 pruned" in output, \
        output[-4000:]
    from optuna.trial import TrialState

    assert [t.state for t in study("hpo_all_fail", run.run_id).trials] == [TrialState.FAIL] * 2


def test_a_failed_trial_is_told_fail_and_the_search_goes_on(embedded, tmp_path):
    """One of two trials crashes in its container: it is told FAIL, the other completes, and
    the run succeeds with the surviving trial's model registered."""
    template = TINY.replace("hpo_all_fail", "hpo_one_fails")
    (tmp_path / "hpo_one_fails.yaml").write_text(template)
    env = {**embedded, "ARF_TEMPLATES_DIR": str(tmp_path), "ARF_TEST_CRASH_AT_STEP": "1",
           "ARF_TEST_CRASH_RANK": "0", "ARF_TEST_CRASH_TRIAL": "0"}
    proc = dags_test(env, "hpo_one_fails", {})
    output = proc.stdout + proc.stderr
    run = latest_run("hpo_one_fails")
    assert str(run.state) == "success", output[-4000:]
    states = {(task, index): state for task, index, state, _ in
              task_instances("hpo_one_fails", run.run_id)}
    assert states[("round_1.trials", 0)] == "failed"
    assert states[("round_1.trials", 1)] == "success"
    assert states[("register_model", -1)] == "success"
    from optuna.trial import TrialState

    trials = study("hpo_one_fails", run.run_id).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    # The final training (5 epochs, not the 1-epoch budget) used the surviving trial's params.
    ws = workspace_for(ArfSettings.from_env(), "hpo_one_fails", run.run_id)
    train = json.loads((ws / "train" / "result.json").read_text())
    training_run = mlflow_client(embedded).get_run(train["mlflow_run_id"])
    assert training_run.data.tags["arf.hpo.best_trial"] == "1"
    assert training_run.data.params["lr"] == str(trials[1].params["lr"])
