"""`arf-trainer choose`, the nightly choice, on a real Delta hub and a real MLflow store: the
shipped fine-tune template's job spec as the Airflow side builds it (`build_step_spec`), the
champion and the nights before as the train and evaluate steps record them (the same tags,
written here directly: training real models would only slow this down)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from trainer_testkit import REPO, fresh_tracking_uri

from arf_trainer.datahub.tables import write_table
from arf_trainer.errors import SpecError
from arf_trainer.nightly.step import run_choose
from arf_trainer.spec import JobSpec, StepEnv
from arf_training.settings import ArfSettings
from arf_training.stepspec import RunIdentity, build_step_spec
from arf_training.templates import load_template

UTC = dt.UTC
START = dt.datetime(2026, 11, 25, 2, tzinfo=UTC)
END = dt.datetime(2026, 11, 26, 2, tzinfo=UTC)
DAG = "reach_bc_failure_finetune"
MODEL = "reach_bc_policy"
STEPS = 5  # rows per synthetic episode
# Root: reach_bc trained from scratch, 30 epochs (on 2 processes: the budget counts samples,
# not optimizer steps, which depend on the batch size and the process count).
ROOT_PARAMS = {"epochs": "30", "batch_size": "256", "world_size": "2"}


def _episodes(first: int, count: int, when: dt.datetime | None = None) -> pa.Table:
    n = count * STEPS
    columns: dict[str, Any] = {
        "episode": pa.array(np.repeat(np.arange(first, first + count, dtype=np.int64), STEPS)),
        "step": pa.array(np.tile(np.arange(STEPS, dtype=np.int32), count))}
    columns.update({f"obs_{j}": pa.array(np.zeros(n, np.float32)) for j in range(10)})
    columns.update({f"act_{j}": pa.array(np.zeros(n, np.float32)) for j in range(2)})
    columns["success"] = pa.array(np.ones(n, bool))
    if when is not None:
        columns["collected_at"] = pa.array([when] * n, type=pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """reach_demos: 40 episodes (200 rows); corrections: 2 episodes the night before (10 rows)
    and 4 inside [START, END) (20 rows)."""
    root = tmp_path_factory.mktemp("hub")
    write_table(root, "reach_demos", _episodes(0, 40))
    before = _episodes(-2, 2, START - dt.timedelta(hours=12))
    inside = _episodes(-6, 4, START + dt.timedelta(hours=3))
    write_table(root, "corrections", pa.concat_tables([before, inside]))
    return root


def _env(tmp: Path, hub: Path, uri: str, conf: dict[str, Any] | None = None,
         end: dt.datetime = END, run_id: str = "scheduled__tonight") -> StepEnv:
    loaded = load_template(REPO / "config_templates" / f"{DAG}.yaml")
    settings = ArfSettings(home=tmp, tracking_uri=uri, datahub_uri=str(hub),
                           artifact_root=str(tmp / "artifacts"))
    run = RunIdentity(DAG, run_id, "choose_recipe", 1, end.isoformat(),
                      (end - dt.timedelta(days=1)).isoformat(), end.isoformat())
    spec = build_step_spec(loaded, "choose", run, conf, settings)
    return StepEnv(workspace=spec.workspace, result_path=spec.result_path, tracking_uri=uri,
                   artifact_root=str(tmp / "artifacts"), datahub=hub,
                   spec=JobSpec.from_dict(json.loads(json.dumps(spec.job_spec))))


class Registry:
    """The champion's line in a real MLflow store, with the tags the steps write."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.clock = 1_790_000_000_000  # ms: each run starts a second after the one before
        self.root = self._run("reach_bc", {"arf.dag_id": "reach_bc"}, ROOT_PARAMS)
        self.client.create_registered_model(MODEL)

    def _run(self, experiment: str, tags: dict[str, str],
             params: dict[str, str] | None = None) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.clock += 1000
        run = self.client.create_run(experiment_id, start_time=self.clock, tags=tags)
        for key, value in (params or {}).items():
            self.client.log_param(run.info.run_id, key, value)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def champion(self, run_id: str, rate: float | None) -> str:
        version = self.client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id)
        if rate is not None:
            self.client.set_model_version_tag(MODEL, version.version, "arf.eval.success_rate",
                                              str(rate))
        self.client.set_registered_model_alias(MODEL, "champion", version.version)
        return version.version

    def night(self, base_run: str, samples: int, recipe: str = "fine-tune",
              dag_id: str = DAG, run_id: str = "scheduled__before") -> str:
        return self._run(DAG, {"arf.dag_id": dag_id, "arf.dag_run_id": run_id,
                               "arf.base_model_run_id": base_run, "arf.samples": str(samples),
                               "arf.conf": json.dumps({"nightly_recipe": recipe})})


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return fresh_tracking_uri(tmp_path)


# Tonight: 20 new rows. The aggregate: 200 demonstration rows + 30 corrections = 230, with the
# replay (2 x 230, capped at the 210 rows before tonight) 440 rows a retrain epoch.
# Retrain (2 epochs of the train split): 2 x ceil(440 x 0.9) = 792 samples.
# Reference (the root's 30 epochs): 30 x ceil(230 x 0.9) = 6210; the budget, a quarter: 1552.5.


def test_weak_champion_retrains_on_the_aggregate(tmp_path: Path, hub: Path, uri: str) -> None:
    registry = Registry(uri)
    registry.champion(registry.root, 0.62)
    result = run_choose(_env(tmp_path, hub, uri))
    assert result["recipe"] == "retrain", result
    assert "champion 62% < retrain_below 80%" in result["reason"]
    estimate = result["estimate"]
    assert (estimate["tonight_rows"], estimate["aggregate_rows"],
            estimate["replay_rows_available"], estimate["retrain_rows"]) == (20, 230, 210, 440)
    assert (estimate["retrain_samples"], estimate["reference_samples"]) == (792, 6210)
    assert estimate["root_run_id"] == registry.root and estimate["nights_before"] == 0
    conf = result["conf"]
    assert conf["nightly_recipe"] == "retrain" and conf["epochs"] == 2 and conf["lr"] == 0.001
    assert "FROM corrections" in conf["dataset_query"] and "reach_demos" in conf["dataset_query"]


def test_the_nights_steps_count_against_the_budget(tmp_path: Path, hub: Path,
                                                   uri: str) -> None:
    registry = Registry(uri)
    first = registry.night(registry.root, 600, "retrain", run_id="scheduled__1")
    registry.champion(first, 0.7)
    registry.night(first, 200, run_id="scheduled__2")
    # Not this DAG's nights: another DAG's run, and tonight's own run (cleared, run again).
    registry.night(first, 500, dag_id="reach_bc_other", run_id="scheduled__3")
    registry.night(first, 500, run_id="scheduled__tonight")
    result = run_choose(_env(tmp_path, hub, uri))
    assert result["recipe"] == "fine-tune", result
    assert "would take the nightly total to 1,592 > budget 1,552" in result["reason"]
    assert result["estimate"]["spent_samples"] == 800
    assert result["estimate"]["nights_before"] == 2
    assert result["conf"] == {"nightly_recipe": "fine-tune"}


def test_a_new_from_scratch_champion_starts_a_new_count(tmp_path: Path, hub: Path,
                                                        uri: str) -> None:
    registry = Registry(uri)
    registry.night(registry.root, 9000, "retrain", run_id="scheduled__old")
    fresh = registry._run("reach_bc", {"arf.dag_id": "reach_bc"}, ROOT_PARAMS)
    registry.champion(fresh, 0.5)
    result = run_choose(_env(tmp_path, hub, uri))
    assert result["recipe"] == "retrain" and result["estimate"]["spent_samples"] == 0


@pytest.mark.parametrize("rate, fragment", [
    (0.93, "champion at or above retrain_below"),
    (None, "no recorded evaluation (arf.eval.success_rate)"),
])
def test_strong_or_unevaluated_champion_fine_tunes(tmp_path: Path, hub: Path, uri: str,
                                                   rate: float | None, fragment: str) -> None:
    registry = Registry(uri)
    registry.champion(registry.root, rate)
    result = run_choose(_env(tmp_path, hub, uri))
    assert result["recipe"] == "fine-tune" and fragment in result["reason"], result


def test_a_night_without_new_rows_fine_tunes_without_asking_mlflow(tmp_path: Path,
                                                                   hub: Path) -> None:
    # No registry at all: the empty night is decided from the data hub alone, and the
    # prepare step then skips the run (dataset.skip_if_empty).
    result = run_choose(_env(tmp_path, hub, "sqlite:///nowhere/mlflow.db",
                             end=END + dt.timedelta(days=30)))
    assert result["recipe"] == "fine-tune" and "no new rows tonight" in result["reason"]


def test_the_trigger_conf_decides_and_its_values_win(tmp_path: Path, hub: Path) -> None:
    env = _env(tmp_path, hub, "sqlite:///nowhere/mlflow.db",
               {"nightly_recipe": "retrain", "epochs": 5})
    result = run_choose(env)
    assert result["recipe"] == "retrain" and "trigger conf sets nightly_recipe" in result["reason"]
    assert result["conf"]["epochs"] == 5 and result["conf"]["lr"] == 0.001
    assert result["conf"]["nightly_recipe"] == "retrain"


def test_the_chosen_conf_is_a_valid_conf_of_the_dag(tmp_path: Path, hub: Path,
                                                    uri: str) -> None:
    """What prepare_data and train receive: the aggregate query, the retrain epochs."""
    registry = Registry(uri)
    registry.champion(registry.root, 0.5)
    conf = run_choose(_env(tmp_path, hub, uri))["conf"]
    prepare = _env(tmp_path, hub, uri, conf).spec
    assert prepare.conf["nightly_recipe"] == "retrain"
    assert prepare.hyperparameters["epochs"] == 2 and "nightly_recipe" not in \
        prepare.hyperparameters
    assert prepare.conf["dataset_query"].strip().startswith("SELECT episode")


def test_bad_recipe_in_the_conf_is_refused_before_anything_runs(tmp_path: Path,
                                                                hub: Path) -> None:
    from arf_training.errors import ConfError

    with pytest.raises(ConfError, match="'nightly_recipe' must be one of"):
        _env(tmp_path, hub, "sqlite:///x.db", {"nightly_recipe": "sometimes"})
    spec = _env(tmp_path, hub, "sqlite:///x.db").spec
    spec.conf["nightly_recipe"] = "sometimes"  # a hand-made job spec
    env = StepEnv(workspace=tmp_path, result_path=tmp_path / "r.json",
                  tracking_uri="sqlite:///x.db", artifact_root=None, datahub=hub, spec=spec)
    with pytest.raises(SpecError, match="must be one of"):
        run_choose(env)
