"""The adaptive nightly recipe: fine-tune or retrain on the aggregate, within a budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from arf_training.errors import TemplateError
from arf_training.nightly_recipe import (FINETUNE, RETRAIN, Nightly, choose, retrain_conf,
                                         retrain_episodes)
from arf_training.params import resolve_conf
from arf_training.templates import load_template, parse_template

REPO = Path(__file__).resolve().parents[2]
FINETUNE_YAML = REPO / "config_templates" / "reach_bc_failure_finetune.yaml"
POLICY = Nightly(aggregate_query="SELECT 1", retrain_below=0.8, retrain_every=3,
                 compute_budget=0.25)
# A retrain of 100 steps against a budget of 25 % of 1000 steps: two fit, a third does not.
ROOM = {"retrain_steps": 100, "budget_reference_steps": 1000}


@pytest.mark.parametrize("kwargs, recipe, fragment", [
    pytest.param({"night": 1, "champion_rate": 0.72, "last_retrain_night": None,
                  "spent_steps": 0}, RETRAIN, "champion 72% < retrain_below 80%",
                 id="weak-champion-retrains"),
    pytest.param({"night": 2, "champion_rate": 0.92, "last_retrain_night": None,
                  "spent_steps": 0}, FINETUNE, "at or above", id="strong-champion-fine-tunes"),
    pytest.param({"night": 4, "champion_rate": 0.92, "last_retrain_night": 1,
                  "spent_steps": 60}, RETRAIN, "3 night(s) since the last retrain",
                 id="every-k-nights"),
    pytest.param({"night": 3, "champion_rate": 0.5, "last_retrain_night": 2,
                  "spent_steps": 200}, FINETUNE, "total to 300 > budget 250",
                 id="over-budget-fine-tunes-even-when-weak"),
])
def test_choice_and_reason(kwargs, recipe, fragment):
    choice = choose(POLICY, **kwargs, **ROOM)
    assert choice.recipe == recipe and fragment in choice.reason, choice


def test_fine_tune_mode_and_bad_numbers():
    off = POLICY.model_copy(update={"mode": "fine-tune"})
    assert choose(off, night=1, champion_rate=0.1, last_retrain_night=None, spent_steps=0,
                  **ROOM).recipe == FINETUNE
    with pytest.raises(ValueError, match="retrain_steps=0"):
        choose(POLICY, night=1, champion_rate=0.5, last_retrain_night=None, spent_steps=0,
               retrain_steps=0, budget_reference_steps=10)


@pytest.mark.parametrize("aggregate, tonight, ratio, expected", [
    pytest.param(200, 150, 2.0, 250, id="replay-capped-by-what-came-before-tonight"),
    pytest.param(200, 50, 0.5, 300, id="replay-at-its-ratio"),
    pytest.param(200, 150, None, 200, id="no-replay"),
    pytest.param(150, 150, 2.0, 150, id="nothing-to-replay"),
])
def test_retrain_episodes_count_the_replay_as_prepare_samples_it(aggregate, tonight, ratio,
                                                                  expected):
    # The failure loop's night 1 from 50 demonstrations and 150 corrections: 250 episodes an
    # epoch (an estimate that counted a full 2x replay said 600, 2.4 times what ran).
    assert retrain_episodes(aggregate, tonight, ratio) == expected


def test_shipped_policy_gives_a_valid_retrain_conf():
    template = load_template(FINETUNE_YAML).template
    conf = resolve_conf(template, retrain_conf(template.nightly))
    assert conf["epochs"] == 2 and conf["lr"] == 0.001
    assert "FROM corrections" in conf["dataset_query"] and "reach_demos" in conf["dataset_query"]


def test_nightly_needs_a_fine_tune_that_allows_query_overrides():
    text = FINETUNE_YAML.read_text()
    no_override = text.replace("  allow_query_override: true\n", "")
    with pytest.raises(TemplateError, match="allow_query_override: true"):
        parse_template(no_override, "ft.yaml")
    bad = text.replace("  retrain_below: 0.8", "  retrain_below: 1.5")
    with pytest.raises(TemplateError, match="nightly.retrain_below"):
        parse_template(bad, "ft.yaml")
