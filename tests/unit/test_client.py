"""The training client's settings, job ids and `--set` parsing (no server needed)."""

from __future__ import annotations

import json

import pytest

from arf_training.cli import main
from arf_training.client import BadInput, ClientSettings, Job, TrainingClient, split_job_id
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


UNREACHABLE = "http://127.0.0.1:9"  # nothing listens: a call that got this far exits 3


def test_non_finite_set_values_refused_before_submitting():
    schemas = schemas_from_airflow({"lr": {"value": 0.01, "schema": {
        "type": "number", "minimum": 0.0, "maximum": 1.0}}})
    client = TrainingClient(ClientSettings(url=UNREACHABLE))
    for text in ("nan", "inf", "-inf"):
        with pytest.raises(ConfError, match=rf"lr='{text}' is not a finite number"):
            client.build_conf("reach_bc", sets={"lr": text}, schemas=schemas)
    with pytest.raises(ConfError, match="'lr' must be a finite number, got nan"):
        client.build_conf("reach_bc", conf=json.loads('{"lr": NaN}'), schemas=schemas)
    assert client.build_conf("reach_bc", sets={"lr": "0.5"}, schemas=schemas) == {"lr": 0.5}


@pytest.mark.parametrize("args, field", [
    pytest.param(["list", "--limit", "-1"], "limit", id="limit-negative"),
    pytest.param(["list", "--limit", "0"], "limit", id="limit-zero"),
    pytest.param(["list", "--state", "s" * 100_000], "--state", id="state-100kB"),
    pytest.param(["list", "--template", "t" * 100_000], "template", id="list-template-100kB"),
    pytest.param(["start", "t" * 100_000], "template", id="template-100kB"),
    pytest.param(["start", "digits_smoke", "--set", "lr=" + "1" * 100_000], "lr",
                 id="set-value-100kB"),
    pytest.param(["start", "digits_smoke", "--set", "n" * 100_000 + "=1"],
                 "hyperparameter name", id="set-name-100kB"),
    pytest.param(["start", "digits_smoke", "--name", "d" * 100_000], "display_name",
                 id="display-name-100kB"),
    pytest.param(["status", "j" * 100_000], "job_id", id="job-id-100kB"),
    pytest.param(["cancel", "t/" + "r" * 100_000], "job_id", id="cancel-job-id-100kB"),
    pytest.param(["logs", "t/r", "--task", "x" * 100_000], "task", id="task-100kB"),
])
def test_bad_input_exits_2_before_contacting_airflow(capsys, args, field):
    code = main(["training", *args, "--url", UNREACHABLE])
    err = capsys.readouterr().err
    assert code == 2, err[:300]
    assert err.startswith(f"arf training: error: {field}") and len(err) < 1000, err[:300]
    assert "Traceback" not in err


def test_oversized_conf_file_value_and_nan_timeout_exit_2(tmp_path, capsys):
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps({"dataset_query": "q" * 100_000}))
    code = main(["training", "start", "digits_smoke", "--conf-file", str(conf),
                 "--url", UNREACHABLE])
    err = capsys.readouterr().err
    assert code == 2 and "dataset_query is too long: 100000 characters" in err, err[:300]
    assert len(err) < 1000
    with pytest.raises(SystemExit) as info:  # argparse: exit 2 naming the option
        main(["training", "start", "digits_smoke", "--wait", "--timeout", "nan"])
    assert info.value.code == 2
    assert "argument --timeout: 'nan' is not a number of seconds > 0" in capsys.readouterr().err


@pytest.mark.parametrize("text, says", [
    ('{"epochs": 2, "epochs": 3}', "key(s) ['epochs'] appear more than once"),
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply to read"),
    ('{"epochs": ', "Expecting value"),
])
def test_a_bad_conf_file_exits_2_naming_it(tmp_path, capsys, text, says):
    conf = tmp_path / "conf.json"
    conf.write_text(text)
    code = main(["training", "start", "digits_smoke", "--conf-file", str(conf),
                 "--url", UNREACHABLE])
    err = capsys.readouterr().err
    assert code == 2 and f"--conf-file {conf}" in err and says in err, err[:300]
    assert "Traceback" not in err and len(err) < 1000


def test_templates_list_columns_fit_long_names(tmp_path, monkeypatch, capsys):
    from arf_training.settings import REPO_ROOT

    source = (REPO_ROOT / "config_templates" / "digits_smoke.yaml").read_text()
    long_name = "digits_smoke_with_a_name_longer_than_the_old_columns"
    (tmp_path / "digits_smoke.yaml").write_text(source)
    (tmp_path / f"{long_name}.yaml").write_text(  # names are unique: template and model
        source.replace("name: digits_smoke", f"name: {long_name}", 1)
        .replace("name: digits_classifier", "name: long_named_classifier", 1))
    monkeypatch.setenv("ARF_TEMPLATES_DIR", str(tmp_path))
    assert main(["templates", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["digits_smoke", long_name]
    assert len({line.index(" classifier") for line in lines}) == 1, lines  # one column


def test_job_table_columns_fit_long_ids():
    from arf_training.cli_templates import table_lines as _table

    jobs = [Job(template="t", run_id="manual__1", state="running", start_date="2026-12-03"),
            Job(template="a_template_with_a_long_name", run_id="arf__20261203T174000_abcdef" * 3,
                state="success", queued_at="2026-12-02")]
    lines = _table([[j.job_id, j.state, j.start_date or j.queued_at or ""] for j in jobs])
    assert len({line.index(" running") if "running" in line else line.index(" success")
                for line in lines}) == 1, lines
    assert lines[0].split() == ["t/manual__1", "running", "2026-12-03"]


class _Replayed(TrainingClient):
    """The REST answers of one job, poll by poll. Injected rather than run: the race (the
    train log read as the run finishes) cannot be made to happen on demand against a real
    Airflow; tests/integration/test_cli_training.py covers the real path."""

    def __init__(self, polls: list[tuple[str, str, list]]):
        super().__init__(ClientSettings(url="http://127.0.0.1:9"))
        self.polls, self.reads = polls, []

    def status(self, job_id: str, *, tasks: bool = True) -> Job:
        state, train, self.reads = self.polls.pop(0)
        return Job("digits_smoke", "r1", state, tasks={"train": train})

    def _try(self, job: Job, task_id: str) -> int:
        return 1

    def log_chunk(self, template, run_id, task_id, try_number, token=None):
        answer = self.reads.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer, None


def test_wait_shows_every_epoch_when_the_finished_log_differs_or_fails_once(monkeypatch):
    """The worker-served log of the running task and the finished task's file need not line
    up (an offset carried over skipped the last epoch), and a read as the job finishes can
    fail once; each progress line is shown once, in order."""
    from arf_training.client_errors import Unreachable

    monkeypatch.setattr("time.sleep", lambda _s: None)
    served = ["source: worker", "header", "x epoch 1/2 | step 5/10 | loss 0.9"]
    finished = ["x epoch 1/2 | step 5/10 | loss 0.9", "x epoch 2/2 | step 10/10 | loss 0.5"]
    client = _Replayed([("running", "running", [served]),
                        ("success", "success", [Unreachable("timed out"), finished])])
    shown: list[str] = []
    job = client.wait("digits_smoke/r1", on_line=lambda _t, line: shown.append(line))
    assert job.state == "success"
    assert shown == ["epoch 1/2 | step 5/10 | loss 0.9", "epoch 2/2 | step 10/10 | loss 0.5"]
