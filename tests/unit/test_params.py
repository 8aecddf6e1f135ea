"""Hyperparameters become typed Params; a bad trigger conf is rejected naming the parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from arf_training.errors import ConfError
from arf_training.params import build_params, resolve_conf
from arf_training.templates import load_template

REPO = Path(__file__).resolve().parents[2]
REACH = load_template(REPO / "config_templates" / "reach_bc.yaml").template
DIGITS = load_template(REPO / "config_templates" / "digits_smoke.yaml").template


def test_defaults_resolve():
    values = resolve_conf(REACH, {})
    assert values["epochs"] == 30 and values["lr"] == 0.003 and values["seed"] == 0
    assert "dataset_query" not in values


def test_overrides_resolve():
    values = resolve_conf(REACH, {"epochs": 3, "lr": 0.01, "hidden_size": 64, "seed": 7})
    assert (values["epochs"], values["lr"], values["hidden_size"], values["seed"]) == (3, 0.01, 64, 7)


@pytest.mark.parametrize("conf, fragments", [
    pytest.param({"epochs": "ten"}, ["'epochs' must be of type integer", "'ten'",
                                     "Passes over the training data"], id="wrong-type"),
    pytest.param({"epochs": True}, ["'epochs' must be of type integer"], id="bool-is-not-int"),
    pytest.param({"epochs": 2.5}, ["'epochs' must be of type integer"], id="float-for-int"),
    pytest.param({"lr": 5}, ["'lr' = 5 is above its maximum 1.0", "Adam learning rate"],
                 id="above-max"),
    pytest.param({"epochs": 0}, ["'epochs' = 0 is below its minimum 1"], id="below-min"),
    pytest.param({"hidden_size": 100}, ["'hidden_size' must be one of [64, 128, 256, 512]"],
                 id="not-in-enum"),
    pytest.param({"learning_rate": 0.1}, ["unknown parameter 'learning_rate'", "accepts:", "lr"],
                 id="unknown-key"),
    pytest.param({"dataset_query": "SELECT 1"}, ["unknown parameter 'dataset_query'"],
                 id="query-override-not-allowed"),
])
def test_bad_conf_names_the_parameter(conf, fragments):
    with pytest.raises(ConfError) as info:
        resolve_conf(REACH, conf)
    message = str(info.value)
    assert "invalid trigger conf for 'reach_bc'" in message
    for fragment in fragments:
        assert fragment in message, message


def test_all_problems_reported_at_once():
    with pytest.raises(ConfError) as info:
        resolve_conf(REACH, {"epochs": -1, "bogus": 1})
    assert "'epochs' = -1" in str(info.value) and "'bogus'" in str(info.value)


def test_query_override_only_where_allowed():
    values = resolve_conf(DIGITS, {"dataset_query": "SELECT * FROM digits WHERE label < 5"})
    assert values["dataset_query"].endswith("label < 5")


def test_params_for_the_trigger_form():
    params = build_params(REACH)
    lr = params["lr"]
    assert lr.value == 0.003
    assert lr.schema["type"] == "number" and lr.schema["maximum"] == 1.0
    assert lr.schema["section"] == "Training" and lr.description == "Adam learning rate."
    assert params["hidden_size"].schema["enum"] == [64, 128, 256, 512]
    assert "dataset_query" not in params
    digits = build_params(DIGITS)
    assert digits["dataset_query"].schema["section"] == "Data"
    # Airflow's own validation (used by the UI/REST API) agrees with ours.
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        Param(5, **{k: v for k, v in lr.schema.items()}).resolve()


def test_form_labels_show_bounds():
    params = build_params(REACH)
    assert params["epochs"].schema["title"] == "epochs (1 – 500)"
    assert params["seed"].schema["title"] == "seed (≥ 0)"
    assert params["hidden_size"].schema["title"] == "hidden_size"  # a dropdown: no bounds
