"""Review probes of the ask/tell loop and the nightly choice: a retried ask that died part-way,
a diverged trial, and bad tags on the champion's line (each named in the error)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import test_nightly_choose as nightly_case
from test_hpo import DAG_ID, HPO, hpo_template
from test_nightly_choose import MODEL, Registry, _env

from arf_trainer.errors import RegistryError
from arf_trainer.nightly.step import run_choose
from arf_training import hpo as airflow_hpo


def _ctx(run_id: str) -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id=DAG_ID), "dag_run": SimpleNamespace(run_id=run_id)}


@pytest.fixture
def sqlite_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARF_OPTUNA_STORAGE", f"sqlite:///{tmp_path}/optuna.db")


def _fixed(loaded):
    from arf_trainer.hpo import distributions

    return distributions(loaded.template.model_dump(mode="json")["hpo"]["search_space"])


def _complete_round(loaded, run_id: str, round_index: int, trials: list[dict]) -> None:
    study = airflow_hpo.open_study(loaded.template, DAG_ID, run_id)
    for t in trials:
        airflow_hpo._set_trial_attr(study, t["number"], airflow_hpo.OUTCOME_ATTR, "complete")
        airflow_hpo._set_trial_attr(study, t["number"], airflow_hpo.VALUE_ATTR,
                                    float(t["params"]["lr"]))
    airflow_hpo.tell(loaded, round_index, _ctx(run_id))


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_an_ask_retried_after_dying_part_way_asks_what_one_ask_would_have(sqlite_storage,
                                                                          sampler):
    """Same seed, same trials: a try that asked one trial (tagged) and one more (not tagged yet)
    before dying is completed by the retry with the draws an uninterrupted ask gives, not with
    repeats of the first draws, and the untagged trial is adopted, not wasted."""
    loaded = hpo_template(HPO.replace("trials: 4", "trials: 8").replace("parallel: 2",
                                                                       "parallel: 4")
                          .replace("sampler: random", f"sampler: {sampler}"))
    rounds: dict[str, list[list[dict]]] = {}
    for run_id in ("whole", "retried"):
        airflow_hpo.create_study(loaded, _ctx(run_id))
        rounds[run_id] = []
        for r in range(2):
            if run_id == "retried":
                study = airflow_hpo.open_study(loaded.template, DAG_ID, run_id, round_index=r)
                first = study.ask(fixed_distributions=_fixed(loaded))
                first.set_user_attr(airflow_hpo.ROUND_ATTR, r)
                study.ask(fixed_distributions=_fixed(loaded))  # died before tagging it
            trials = airflow_hpo.ask(loaded, r, _ctx(run_id))
            rounds[run_id].append(trials)
            _complete_round(loaded, run_id, r, trials)
    for whole, retried in zip(rounds["whole"], rounds["retried"]):
        assert [t["params"] for t in retried] == [t["params"] for t in whole]
        assert [t["number"] for t in retried] == [t["number"] for t in whole]
    study = airflow_hpo.open_study(loaded.template, DAG_ID, "retried")
    assert len(study.get_trials()) == 8
    assert all(t.state.name == "COMPLETE" for t in study.get_trials())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_diverged_trial_is_told_fail_with_the_reason(sqlite_storage, value):
    loaded = hpo_template()
    airflow_hpo.create_study(loaded, _ctx("diverged"))
    trials = airflow_hpo.ask(loaded, 0, _ctx("diverged"))
    study = airflow_hpo.open_study(loaded.template, DAG_ID, "diverged")
    bad, good = trials[0]["number"], trials[1]["number"]
    for number, v in ((bad, value), (good, 0.5)):
        airflow_hpo._set_trial_attr(study, number, airflow_hpo.OUTCOME_ATTR, "complete")
        airflow_hpo._set_trial_attr(study, number, airflow_hpo.VALUE_ATTR, v)
    told = airflow_hpo.tell(loaded, 0, _ctx("diverged"))
    assert told == {"complete": [good], "pruned": [], "fail": [bad]}
    assert airflow_hpo.tell(loaded, 0, _ctx("diverged")) == told  # a retried tell agrees
    frozen = {t.number: t for t in study.get_trials()}
    assert frozen[bad].state.name == "FAIL"
    assert "not a finite value" in frozen[bad].user_attrs[airflow_hpo.FAIL_REASON_ATTR]
    assert airflow_hpo.select_best(loaded, _ctx("diverged"))["number"] == good


# -- the nightly choice: bad tags on the champion's line name the tag --------------------------

hub, uri = nightly_case.hub, nightly_case.uri  # the Delta hub and MLflow store fixtures


@pytest.mark.parametrize("rate", ["n/a", "nan", "1.5"])
def test_a_bad_champion_success_rate_names_the_tag(tmp_path: Path, hub: Path, uri: str, rate):
    registry = Registry(uri)
    version = registry.champion(registry.root, None)
    registry.client.set_model_version_tag(MODEL, version, "arf.eval.success_rate", rate)
    with pytest.raises(RegistryError, match=r"arf\.eval\.success_rate='" + rate):
        run_choose(_env(tmp_path, hub, uri))


@pytest.mark.parametrize("samples", ["-5000", "lots", "2.5"])
def test_a_bad_samples_tag_of_a_night_names_the_run_and_the_tag(tmp_path: Path, hub: Path,
                                                                uri: str, samples):
    registry = Registry(uri)
    night = registry.night(registry.root, 10)
    registry.client.set_tag(night, "arf.samples", samples)
    registry.champion(night, 0.5)
    with pytest.raises(RegistryError, match=rf"run {night} .*arf\.samples='{samples}'"):
        run_choose(_env(tmp_path, hub, uri))


def test_a_champion_without_a_training_run_is_a_clear_error(tmp_path: Path, hub: Path,
                                                             uri: str):
    registry = Registry(uri)
    version = registry.client.create_model_version(MODEL, str(tmp_path / "model"), None)
    registry.client.set_registered_model_alias(MODEL, "champion", version.version)
    with pytest.raises(RegistryError, match="names no training run"):
        run_choose(_env(tmp_path, hub, uri))


def test_whole_float_retrain_epochs_are_taken_as_the_template_check_takes_them(
        tmp_path: Path, hub: Path, uri: str):
    """`retrain_hyperparameters: {epochs: 2.0}` passes the template's check (a whole number);
    the choice must estimate with it, not refuse it every night."""
    registry = Registry(uri)
    registry.champion(registry.root, 0.5)
    env = _env(tmp_path, hub, uri, conf={"epochs": 2.0})
    result = run_choose(env)
    assert result["recipe"] == "retrain"
    assert result["estimate"]["retrain_samples"] == 792


@pytest.mark.parametrize("direction, values, best", [
    ("maximize", [0.5, 0.9, 0.9, 0.1], 1),
    ("minimize", [0.3, 0.1, 0.2, 0.1], 1),
    ("maximize", [0.9, 0.9, 0.9], 0),
])
def test_both_sides_pick_the_same_best_trial_among_ties(direction, values, best):
    """Optuna's best_trial orders by value alone (PostgreSQL may return either tie): select_best
    and the final training each queried it, so they could disagree on the trial."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from arf_trainer.hpo import best_of as container_best
    from arf_training.hpo import best_of as airflow_best

    study = optuna.create_study(direction=direction)
    for value in values:
        study.add_trial(create_trial(value=value, params={"lr": 0.01},
                                     distributions={"lr": FloatDistribution(1e-4, 1.0)}))
    study.add_trial(create_trial(state=TrialState.FAIL))
    assert container_best(study).number == airflow_best(study).number == best
