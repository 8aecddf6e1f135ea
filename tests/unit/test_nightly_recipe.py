"""The adaptive nightly recipe: fine-tune or retrain on the aggregate, within a budget (the
rule, the estimates, the template's section; the step itself: test_nightly_choose.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from arf_trainer.nightly.policy import (FINETUNE, RETRAIN, choose, estimated_samples,
                                       retrain_conf, retrain_rows)
from arf_training.errors import TemplateError
from arf_training.nightly_recipe import Nightly
from arf_training.params import resolve_conf
from arf_training.templates import load_template, parse_template

REPO = Path(__file__).resolve().parents[2]
FINETUNE_YAML = REPO / "config_templates" / "reach_bc_failure_finetune.yaml"
POLICY = Nightly(aggregate_query="SELECT 1", retrain_below=0.8, retrain_every=3,
                 compute_budget=0.25).model_dump(mode="json")  # as the job spec holds it
# A retrain of 100 steps against a budget of 25 % of 1000 steps: two fit, a third does not.
ROOM = {"retrain": 100, "reference": 1000}


@pytest.mark.parametrize("kwargs, recipe, fragment", [
    pytest.param({"night": 1, "champion_rate": 0.72, "last_retrain_night": None,
                  "spent": 0}, RETRAIN, "champion 72% < retrain_below 80%",
                 id="weak-champion-retrains"),
    pytest.param({"night": 2, "champion_rate": 0.92, "last_retrain_night": None,
                  "spent": 0}, FINETUNE, "at or above", id="strong-champion-fine-tunes"),
    pytest.param({"night": 4, "champion_rate": 0.92, "last_retrain_night": 1,
                  "spent": 60}, RETRAIN, "3 night(s) since the last retrain",
                 id="every-k-nights"),
    pytest.param({"night": 3, "champion_rate": 0.5, "last_retrain_night": 2,
                  "spent": 200}, FINETUNE, "total to 300 > budget 250 (25% of a from-scratch retrain's 1,000)",
                 id="over-budget-fine-tunes-even-when-weak"),
])
def test_choice_and_reason(kwargs, recipe, fragment):
    choice = choose(POLICY, **kwargs, **ROOM)
    assert choice.recipe == recipe and fragment in choice.reason, choice


def test_fine_tune_mode_and_bad_numbers():
    off = {**POLICY, "mode": "fine-tune"}
    assert choose(off, night=1, champion_rate=0.1, last_retrain_night=None, spent=0,
                  **ROOM).recipe == FINETUNE
    with pytest.raises(ValueError, match="retrain=0"):
        choose(POLICY, night=1, champion_rate=0.5, last_retrain_night=None, spent=0,
               retrain=0, reference=10)


@pytest.mark.parametrize("aggregate, available, ratio, expected", [
    pytest.param(200, 50, 2.0, 250, id="replay-capped-by-what-the-replay-query-holds"),
    pytest.param(200, 500, 0.5, 300, id="replay-at-its-ratio"),
    pytest.param(200, 50, None, 200, id="no-replay"),
    pytest.param(150, 0, 2.0, 150, id="nothing-to-replay"),
])
def test_retrain_rows_count_the_replay_as_prepare_samples_it(aggregate, available, ratio,
                                                             expected):
    # The failure loop's night 1 from 50 demonstrations and 150 corrections: 250 episodes an
    # epoch (an estimate that counted a full 2x replay said 600, 2.4 times what ran).
    assert retrain_rows(aggregate, available, ratio) == expected


@pytest.mark.parametrize("rows, epochs, split, expected", [
    pytest.param(1000, 3, 0.1, 2700, id="the-train-split-every-epoch"),
    pytest.param(999, 1, 0.1, 900, id="rounded-up"),
    pytest.param(1000, 2, 0.0, 2000, id="no-validation"),
])
def test_estimated_samples(rows, epochs, split, expected):
    assert estimated_samples(rows, epochs=epochs, validation_split=split) == expected


def test_shipped_policy_gives_a_valid_retrain_conf():
    template = load_template(FINETUNE_YAML).template
    conf = resolve_conf(template, retrain_conf(template.nightly.model_dump(mode="json")))
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


@pytest.mark.parametrize("old, new, fragment", [
    pytest.param("retrain_hyperparameters: {epochs: 2, lr: 0.001}",
                 "retrain_hyperparameters: {epochs: 2, lr: 0.001, dropout: 0.1}",
                 "retrain_hyperparameters sets dropout, not hyperparameters of this template",
                 id="unknown-hyperparameter"),
    pytest.param("retrain_hyperparameters: {epochs: 2, lr: 0.001}",
                 "retrain_hyperparameters: {epochs: 500, lr: 0.001}",
                 "nightly.retrain_hyperparameters.epochs = 500 is above the maximum 200",
                 id="above-bounds"),
    pytest.param("retrain_hyperparameters: {epochs: 2, lr: 0.001}",
                 "retrain_hyperparameters: {epochs: 2.5, lr: 0.001}",
                 "nightly.retrain_hyperparameters.epochs = 2.5 is not a whole number",
                 id="not-an-integer"),
    pytest.param("retrain_hyperparameters: {epochs: 2, lr: 0.001}",
                 "retrain_hyperparameters: {epochs: 2, lr: .nan}",
                 "nightly.retrain_hyperparameters.lr = nan is not a finite number", id="nan"),
    pytest.param("    FROM corrections\n  retrain_hyperparameters",
                 "    FROM corrections;\n    DELETE FROM corrections\n  retrain_hyperparameters",
                 "more than one statement", id="aggregate-query-not-one-select"),
    pytest.param("    FROM corrections\n  retrain_hyperparameters",
                 "    FROM corrections WHERE collected_at < {{ ds }}\n  retrain_hyperparameters",
                 "{{ ds }}", id="aggregate-query-unknown-macro"),
])
def test_nightly_section_errors_name_the_field(old, new, fragment):
    text = FINETUNE_YAML.read_text()
    assert old in text
    with pytest.raises(TemplateError) as info:
        parse_template(text.replace(old, new), "ft.yaml")
    assert fragment in str(info.value) and "nightly" in str(info.value)


def test_nightly_needs_epochs_to_estimate_a_retrain():
    text = FINETUNE_YAML.read_text()
    start = text.index("    epochs:\n")
    end = text.index("    batch_size:\n")
    text = text[:start] + text[end:]
    text = text.replace("retrain_hyperparameters: {epochs: 2, lr: 0.001}",
                        "retrain_hyperparameters: {lr: 0.001}")
    # A built-in recipe needs epochs anyway: the training section says so first.
    with pytest.raises(TemplateError, match=r"recipe 'bc' needs hyperparameter\(s\) \['epochs'\]"):
        parse_template(text, "ft.yaml")


def test_the_trigger_form_offers_the_nights_recipe():
    from arf_training.params import param_schemas

    template = load_template(FINETUNE_YAML).template
    schema = param_schemas(template)["nightly_recipe"]
    assert schema["enum"] == ["auto", "fine-tune", "retrain"] and schema["default"] == "auto"
    assert resolve_conf(template, {"nightly_recipe": "retrain"})["nightly_recipe"] == "retrain"
    assert "nightly_recipe" not in param_schemas(load_template(
        REPO / "config_templates" / "reach_bc.yaml").template)


def test_both_sides_spell_the_recipes_alike():
    # The Airflow side may not import the container's package: the names are written twice.
    from arf_trainer.nightly.policy import CONF_KEY, RECIPES
    from arf_training.params import NIGHTLY_PARAM, NIGHTLY_RECIPES

    assert (NIGHTLY_PARAM, NIGHTLY_RECIPES) == (CONF_KEY, RECIPES)


def test_the_dag_page_says_fine_tune_every_night_when_the_rule_is_off():
    from arf_training.factory import _nightly_row

    template = load_template(FINETUNE_YAML).template
    off = template.nightly.model_copy(update={"mode": "fine-tune"})
    assert "`choose_recipe`: fine-tune every night, within 25%" in _nightly_row(off)
    assert "retrain while the champion is below 80%" in _nightly_row(template.nightly)
