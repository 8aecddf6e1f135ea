"""The training client's settings, job ids and `--set` parsing (no server needed)."""

from __future__ import annotations

import pytest

from arf_training.cli import main
from arf_training.client import BadInput, ClientSettings, Job, split_job_id
from arf_training.errors import ConfError
from arf_training.params import parse_value, schemas_from_airflow


def test_settings_precedence_flag_env_file(tmp_path, monkeypatch):
    config = tmp_path / "client.yaml"
    config.write_text("url: http://file:1\nusername: file-user\npassword: file-pw\n")
    monkeypatch.setenv("ARF_AIRFLOW_URL", "http://env:2/")
    monkeypatch.delenv("ARF_AIRFLOW_USERNAME", raising=False)
    monkeypatch.delenv("ARF_AIRFLOW_PASSWORD", raising=False)
    s = ClientSettings.resolve(config_file=str(config))
    assert (s.url, s.username, s.password) == ("http://env:2", "file-user", "file-pw")
    s = ClientSettings.resolve(url="http://flag:3", config_file=str(config))
    assert s.url == "http://flag:3"
    assert "file-pw" not in repr(s)  # secrets never in repr (logs, tracebacks)


def test_settings_file_errors(tmp_path):
    bad = tmp_path / "client.yaml"
    bad.write_text("url: http://x\npasswd: typo\n")
    with pytest.raises(BadInput, match=r"unknown key\(s\) \['passwd'\]"):
        ClientSettings.resolve(config_file=str(bad))
    with pytest.raises(BadInput, match="no such file"):
        ClientSettings.resolve(config_file=str(tmp_path / "missing.yaml"))


def test_job_ids_and_status():
    assert split_job_id("digits_smoke/arf__1") == ("digits_smoke", "arf__1")
    with pytest.raises(BadInput, match="TEMPLATE/RUN_ID"):
        split_job_id("arf__1")
    job = Job(template="t", run_id="r", state="queued")
    assert (job.job_id, job.status) == ("t/r", "PENDING")
    assert Job(template="t", run_id="r", state="failed",
               note="x - cancelled via arf").cancelled


AIRFLOW_PARAMS = {  # what GET /api/v2/dags/{id}/details returns for a DAG's Params
    "epochs": {"value": 5, "description": "Passes.", "schema": {
        "type": "integer", "minimum": 1, "maximum": 200, "section": "Training"}},
    "flag": {"value": False, "description": None, "schema": {"type": "boolean"}},
    "model_name": {"value": None, "description": None, "schema": {"type": ["null", "string"]}},
}


def test_set_values_parse_by_param_type():
    schemas = schemas_from_airflow(AIRFLOW_PARAMS)
    assert schemas["epochs"]["default"] == 5 and schemas["model_name"]["type"] == "string"
    assert parse_value("epochs", "7", schemas["epochs"]) == 7
    assert parse_value("flag", "yes", schemas["flag"]) is True
    with pytest.raises(ConfError, match=r"epochs='x' is not a valid integer. Expected epochs "
                                        r"\(type integer, minimum 1, maximum 200\) — Passes."):
        parse_value("epochs", "x", schemas["epochs"])


def test_bad_set_syntax_fails_before_contacting_airflow(capsys):
    code = main(["training", "start", "digits_smoke", "--set", "epochs",
                 "--url", "http://127.0.0.1:9"])
    assert code == 2 and "is not KEY=VALUE" in capsys.readouterr().err
