"""The nightly failure fine-tune end to end through real Airflow (`airflow dags test`), MLflow,
the Delta data hub and MuJoCo: reach_bc registers a version, it becomes champion, corrections
of failed episodes are collected inside one night's data interval, and the fine-tune DAG run for
that night registers a candidate of the same model that names its base version and the
corrections table version; its first task, choose_recipe, chose a fine-tune (the champion has no
recorded evaluation). The next night, with the champion recorded at 50 %, choose_recipe chooses
a retrain on the aggregate by itself, and the run trains on the aggregate query's rows and
records the recipe. A night without corrections is skipped, not failed."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from airflow_runs import latest_run, task_states
from arf_training.settings import ArfSettings
from arf_training.stepspec import workspace_for

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
DAG = "reach_bc_failure_finetune"
# dags test with this logical date runs the interval [2026-11-25 02:00, 2026-11-26 02:00) UTC.
NIGHT = "2026-11-26T02:00:00+00:00"
INSIDE = dt.datetime(2026, 11, 25, 13, tzinfo=dt.UTC)
BEFORE = dt.datetime(2026, 11, 24, 13, tzinfo=dt.UTC)  # the previous night's corrections
SOURCE = "e2e_do_nothing_policy"  # whose failures the corrections relabel


def dags_test(env, dag_id: str, conf: dict, logical_date: str | None = None):
    command = [str(BIN / "airflow"), "dags", "test", dag_id]
    if logical_date:
        command.append(logical_date)
    return subprocess.run(command + ["-c", json.dumps(conf)], env=env, capture_output=True,
                          text=True, timeout=900)


def _failures(hub: Path, seeds: range, when: dt.datetime) -> None:
    """Failed episodes of a do-nothing policy -> `failures`."""
    from arf_trainer.datahub.failures import record_failures
    from arf_trainer.sim import reach

    sim = reach.make_env()
    try:
        episodes = [(s, reach.rollout(lambda obs: np.zeros(2, dtype=np.float32), s, env=sim))
                    for s in seeds]
    finally:
        sim.close()
    assert not any(r.success for _, r in episodes)
    # A model name of its own: evaluations earlier in the session left failures of
    # reach_bc_policy in the hub, which are not this test's to correct.
    record_failures(hub, model_name=SOURCE, model_version=0, eval_run_id="e2e",
                    episodes=episodes, recorded_at=when)


def _corrections(hub: Path) -> dict[str, int]:
    """Corrections of one failure collected the night before, and of two inside the night
    under test."""
    from arf_trainer.datahub.failures import correct_failures

    _failures(hub, range(900_000, 900_003), BEFORE)
    before = correct_failures(hub, collected_at=BEFORE, model_name=SOURCE, limit=1)
    inside = correct_failures(hub, collected_at=INSIDE, model_name=SOURCE)
    assert before["episodes"] == 1 and inside["episodes"] == 2
    return {"rows_inside": inside["rows"], "version": inside["version"]}


def test_nightly_finetune_registers_a_candidate_of_the_champion(embedded):
    from mlflow.tracking import MlflowClient

    # 12 epochs: the from-scratch run's epochs size the nights' budget (a quarter of them on
    # the aggregate), which the second night's one-epoch retrain must fit.
    proc = dags_test(embedded, "reach_bc", {"epochs": 12})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    base_run = latest_run("reach_bc")
    ws = workspace_for(ArfSettings.from_env(), "reach_bc", base_run.run_id)
    base_version = json.loads((ws / "register" / "result.json").read_text())["model_version"]
    client = MlflowClient(tracking_uri=embedded["ARF_TRACKING_URI"],
                          registry_uri=embedded["ARF_TRACKING_URI"])
    client.set_registered_model_alias("reach_bc_policy", "champion", base_version)

    corrections = _corrections(_hub(embedded))

    proc = dags_test(embedded, DAG, {"epochs": 2}, NIGHT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run(DAG)
    assert str(run.state) == "success"
    assert task_states(DAG, run.run_id) == {
        "choose_recipe": "success", "prepare_data": "success", "train": "success",
        "register_model": "success"}

    ws = workspace_for(ArfSettings.from_env(), DAG, run.run_id)
    chosen = json.loads((ws / "choose" / "result.json").read_text())
    # Its retrain (2 epochs on the aggregate and its replay) would cost more than the budget.
    assert chosen["recipe"] == "fine-tune" and "would take the nightly total" in \
        chosen["reason"], chosen
    manifest = json.loads((ws / "prepare" / "manifest.json").read_text())
    # Only the corrections collected inside the night; twice as many replayed rows, drawn from
    # the demonstrations and the corrections of earlier nights (not tonight's).
    assert manifest["new_rows"] == corrections["rows_inside"]
    assert manifest["replay"]["rows"] == 2 * corrections["rows_inside"]
    assert set(manifest["replay"]["tables"]) == {"reach_demos", "corrections"}
    assert manifest["parameters"]["data_interval_start"] == "2026-11-25T02:00:00+00:00"
    assert manifest["parameters"]["data_interval_end"] == "2026-11-26T02:00:00+00:00"

    register = json.loads((ws / "register" / "result.json").read_text())
    assert register["model_name"] == "reach_bc_policy"
    assert int(register["model_version"]) > int(base_version)
    tags = client.get_model_version("reach_bc_policy", register["model_version"]).tags
    assert tags["arf.base_model"] == "models:/reach_bc_policy@champion"
    assert tags["arf.base_model_version"] == base_version
    tables = json.loads(tags["arf.data_tables"])
    assert tables["corrections"] == corrections["version"] and "reach_demos" in tables
    assert tags["arf.template"] == DAG
    night_one = client.get_run(tags["arf.training_run_id"]).data.tags
    assert json.loads(night_one["arf.conf"])["nightly_recipe"] == "fine-tune"
    samples_one = int(night_one["arf.samples"])

    _retrain_night(embedded, client, base_version, samples_one)


def _retrain_night(embedded, client, champion: str, samples_before: int) -> None:
    """The champion evaluated at 50 % (< retrain_below 80 %): the next night retrains on the
    aggregate. One epoch keeps the retrain (the aggregate and its replay, ~1.8x the aggregate's
    train split) within the budget: a quarter of reach_bc's 12 epochs on the aggregate (~2.7x),
    less the first night's samples."""
    from arf_trainer.datahub.failures import correct_failures
    from arf_trainer.datahub.query import run_query

    hub = _hub(embedded)
    _failures(hub, range(900_003, 900_005), INSIDE)
    tonight = correct_failures(hub, collected_at=INSIDE + dt.timedelta(days=1),
                               model_name=SOURCE)
    assert tonight["episodes"] == 2
    client.set_model_version_tag("reach_bc_policy", champion, "arf.eval.success_rate", "0.5")
    proc = dags_test(embedded, DAG, {"epochs": 1}, "2026-11-27T02:00:00+00:00")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run(DAG)
    assert task_states(DAG, run.run_id) == {
        "choose_recipe": "success", "prepare_data": "success", "train": "success",
        "register_model": "success"}
    ws = workspace_for(ArfSettings.from_env(), DAG, run.run_id)
    chosen = json.loads((ws / "choose" / "result.json").read_text())
    assert chosen["recipe"] == "retrain", chosen
    assert "champion 50% < retrain_below 80%" in chosen["reason"]
    estimate = chosen["estimate"]
    assert estimate["spent_samples"] == samples_before and estimate["nights_before"] == 1
    assert samples_before + estimate["retrain_samples"] <= estimate["reference_samples"] / 4
    # Trained on the aggregate: every successful demonstration and every correction.
    aggregate = run_query(hub, "SELECT (SELECT count(*) FROM reach_demos WHERE success) + "
                          "(SELECT count(*) FROM corrections) AS n")[0].column("n")[0].as_py()
    manifest = json.loads((ws / "prepare" / "manifest.json").read_text())
    assert manifest["new_rows"] == estimate["aggregate_rows"] == aggregate
    register = json.loads((ws / "register" / "result.json").read_text())
    tags = client.get_model_version("reach_bc_policy", register["model_version"]).tags
    conf = json.loads(client.get_run(tags["arf.training_run_id"]).data.tags["arf.conf"])
    assert conf["nightly_recipe"] == "retrain" and "FROM reach_demos" in conf["dataset_query"]


def _hub(embedded) -> Path:
    from arf_trainer.spec import uri_to_path

    return uri_to_path(embedded["ARF_DATAHUB_URI"])


def test_a_night_without_corrections_is_skipped_not_failed(embedded):
    from arf_trainer.datahub.tables import list_tables

    if "corrections" not in list_tables(_hub(embedded)):  # this test run on its own
        _corrections(_hub(embedded))
    proc = dags_test(embedded, DAG, {"epochs": 2}, "2027-03-02T02:00:00+00:00")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = latest_run(DAG)
    assert str(run.state) == "success"
    assert task_states(DAG, run.run_id) == {"choose_recipe": "success",
        "prepare_data": "skipped", "train": "skipped", "register_model": "skipped"}
    assert "no new rows between 2027-03-01T02:00:00+00:00 and 2027-03-02T02:00:00+00:00" in \
        proc.stdout + proc.stderr
