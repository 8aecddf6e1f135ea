"""Hyperparameters become typed Params; a bad trigger conf is rejected naming the parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arf_training.errors import ConfError
from arf_training.params import NOT_FINITE, build_params, param_schemas, parse_value, resolve_conf
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


@pytest.mark.parametrize("value", [
    pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
    pytest.param(float("-inf"), id="-inf"),
])
def test_non_finite_numbers_are_refused_naming_the_parameter(value):
    with pytest.raises(ConfError, match=r"'lr' must be a finite number, got (nan|inf|-inf)"):
        resolve_conf(REACH, {"lr": value})


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-Infinity", "1e999"])
def test_non_finite_set_values_are_refused(text):
    schema = param_schemas(REACH)["lr"]
    with pytest.raises(ConfError, match=r"lr='.*' is not a finite number. Expected lr"):
        parse_value("lr", text, schema)
    assert parse_value("lr", "0.01", schema) == 0.01


def test_airflow_param_schema_refuses_non_finite_numbers():
    """The trigger form's and the REST API's own validation (Airflow `Param`), not ours."""
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    lr = build_params(REACH)["lr"]
    with pytest.raises(ParamValidationError):
        Param(float("nan"), description=lr.description, **lr.schema).resolve()
    assert Param(0.01, **lr.schema).resolve() == 0.01
    # Without bounds only the `not` clause stands between infinities and the run.
    unbounded = {"type": "number", "not": NOT_FINITE}
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ParamValidationError):
            Param(value, **unbounded).resolve()
    for value in (0, -3.5, 1e308, -1e308):
        assert Param(value, **unbounded).resolve() == value


def test_long_values_are_quoted_short():
    with pytest.raises(ConfError) as info:
        resolve_conf(REACH, {"k" * 100_000: 1, "epochs": "e" * 100_000})
    message = str(info.value)
    assert len(message) < 2000 and "(100000 chars)" in message


def _job_spec(**changes):
    raw = {"spec_version": 1, "step": "train", "template": {}, "template_sha256": "0" * 64,
           "conf": {"lr": 0.01}, "hyperparameters": {"lr": 0.01}, "seed": 0,
           "run": {"dag_id": "reach_bc", "run_id": "r1", "task_id": "train"}}
    return {**raw, **changes}


@pytest.mark.parametrize("changes, where", [
    pytest.param({"conf": {"lr": float("nan")}}, "conf.lr", id="conf"),
    pytest.param({"hyperparameters": {"lr": float("inf")}}, "hyperparameters.lr",
                 id="hyperparameters"),
    pytest.param({"seed": float("nan")}, "seed", id="seed"),
])
def test_container_refuses_non_finite_numbers_in_the_job_spec(changes, where):
    from arf_trainer.errors import SpecError
    from arf_trainer.spec import JobSpec

    assert JobSpec.from_dict(_job_spec()).hyperparameters == {"lr": 0.01}
    with pytest.raises(SpecError, match=rf"job spec {where} = (nan|inf) is not a finite number"):
        JobSpec.from_dict(_job_spec(**changes))


def test_container_refuses_nan_tokens_in_the_job_spec_json(tmp_path):
    from arf_trainer.errors import SpecError
    from arf_trainer.spec import StepEnv

    text = json.dumps(_job_spec()).replace('"lr": 0.01}, "seed"', '"lr": NaN}, "seed"')
    assert "NaN" in text  # json.loads reads this non-standard token as float("nan")
    env = {"ARF_JOB_SPEC_JSON": text, "ARF_WORKSPACE": str(tmp_path),
           "ARF_TRACKING_URI": str(tmp_path / "mlruns"), "ARF_DATAHUB_URI": str(tmp_path)}
    with pytest.raises(SpecError, match="hyperparameters.lr = nan"):
        StepEnv.from_environ(env)


def test_an_overlong_query_override_is_refused_at_trigger_time():
    """Prepare refuses a query over its cap (sqlcheck); the trigger form, Airflow's REST API
    and the conf check refuse it first, quoting only a prefix."""
    from arf_trainer.datahub.sqlcheck import MAX_QUERY_CHARS

    query = "SELECT * FROM digits WHERE " + "label < 5 AND " * (MAX_QUERY_CHARS // 14) + "TRUE"
    with pytest.raises(ConfError, match="over its limit of 32,768") as info:
        resolve_conf(DIGITS, {"dataset_query": query})
    assert len(str(info.value)) < 1000
    param = build_params(DIGITS)["dataset_query"]
    assert param.schema["maxLength"] == MAX_QUERY_CHARS
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="too long"):
        Param(query, **param.schema).resolve()
    assert Param("SELECT * FROM digits", **param.schema).resolve()
