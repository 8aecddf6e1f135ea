"""`arf training ...` against a real Airflow (the session's `airflow_stack`): start --wait to a
registered model, status/list/logs, cancel of a running job, and the documented exit codes of bad
input and an unreachable server. Every command runs as a subprocess, as a CI job would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_procs import free_port

# slow: one shared Airflow stack (api-server, scheduler, ...) for the three files, ~7 min.
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ARF = str(Path(sys.executable).parent / "arf")


def arf(stack, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full_env = {**stack.client_env(), **env}
    return subprocess.run([ARF, "training", *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def job_ids(stack) -> set[str]:
    from arf_training.client import TrainingClient

    return {j.job_id for j in TrainingClient(stack.client_settings()).list(
        template="digits_smoke")}


def test_templates_list(airflow_stack):
    out = arf(airflow_stack, "templates", "list", "--output", "json")
    assert out.returncode == 0, out.stderr
    names = {t["name"] for t in json.loads(out.stdout)}
    assert {"digits_smoke", "reach_bc"} <= names and "arf_evaluate" not in names


def test_start_wait_succeeds_and_prints_the_model_version(airflow_stack):
    out = arf(airflow_stack, "start", "digits_smoke", "--set", "epochs=2", "--name", "cli e2e",
              "--wait", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "epoch 2/2 | step" in out.stdout  # live training progress
    assert "register_model   success" in out.stdout
    job_id = out.stdout.split("started ", 1)[1].split()[0]
    assert f"job      {job_id}" in out.stdout and "state    success" in out.stdout
    assert "model    digits_classifier version " in out.stdout

    status = arf(airflow_stack, "status", job_id, "--output", "json")
    assert status.returncode == 0, status.stderr
    job = json.loads(status.stdout)
    assert job["status"] == "SUCCEEDED" and job["conf"] == {"epochs": 2}
    assert job["display_name"] == "cli e2e" and job["model_version"]
    assert set(job["tasks"].values()) == {"success"}

    listed = arf(airflow_stack, "list", "--template", "digits_smoke", "--output", "json")
    assert listed.returncode == 0 and job_id in {j["job_id"] for j in json.loads(listed.stdout)}
    listed = arf(airflow_stack, "list", "--state", "SUCCEEDED")
    assert listed.returncode == 0 and job_id in listed.stdout

    logs = arf(airflow_stack, "logs", job_id, "--task", "train")
    assert logs.returncode == 0, logs.stderr
    assert "epoch 1/2 | step" in logs.stdout
    assert all(line.startswith("train ") for line in logs.stdout.splitlines())
    bad_task = arf(airflow_stack, "logs", job_id, "--task", "nope")
    assert bad_task.returncode == 2 and "has no task 'nope'" in bad_task.stderr
    again = arf(airflow_stack, "cancel", job_id)
    assert again.returncode == 2 and "already finished (success)" in again.stderr


def test_cancel_a_running_job(airflow_stack):
    started = arf(airflow_stack, "start", "digits_smoke", "--set", "epochs=200")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    deadline = time.monotonic() + 240
    while True:
        job = json.loads(arf(airflow_stack, "status", job_id, "--output", "json").stdout)
        if job["tasks"].get("train") == "running":
            break
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"train never started: {job}"
        time.sleep(1)
    cancelled = arf(airflow_stack, "cancel", job_id, "--output", "json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["cancelled"] is True
    follow = arf(airflow_stack, "logs", job_id, "--follow", "--task", "train", timeout=120)
    assert follow.returncode == 0  # --follow returns once the job has finished
    job = json.loads(arf(airflow_stack, "status", job_id, "--output", "json").stdout)
    assert job["status"] == "FAILED" and job["cancelled"]
    assert job["tasks"]["train"] != "running" and job["tasks"]["register_model"] != "success"


@pytest.mark.parametrize("args, fragments", [
    pytest.param(["--set", "epochs=0"], ["'epochs' = 0 is below its minimum 1",
                                         "type integer", "Passes over the training data"],
                 id="below-minimum"),
    pytest.param(["--set", "epochs=ten"], ["epochs='ten' is not a valid integer",
                                           "maximum 200"], id="wrong-type"),
    pytest.param(["--set", "hidden_size=100"], ["'hidden_size' must be one of [32, 64, 128]",
                                                "Width of each hidden layer"], id="not-in-enum"),
    pytest.param(["--set", "learning_rate=0.1"], ["unknown parameter 'learning_rate'",
                                                  "accepts:", "lr"], id="unknown-param"),
    pytest.param(["--set", "epochs"], ["--set 'epochs' is not KEY=VALUE"], id="not-key-value"),
    pytest.param(["--set", "lr=nan"], ["lr='nan' is not a finite number", "type number"],
                 id="nan"),
    pytest.param(["--set", "lr=-inf"], ["lr='-inf' is not a finite number"], id="infinity"),
])
def test_bad_set_values_are_rejected_before_submitting(airflow_stack, args, fragments):
    before = job_ids(airflow_stack)
    out = arf(airflow_stack, "start", "digits_smoke", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr
    assert job_ids(airflow_stack) == before  # nothing was submitted


def test_nan_in_a_conf_file_and_bad_list_limit(airflow_stack, tmp_path):
    conf = tmp_path / "conf.json"
    conf.write_text('{"lr": NaN}')  # Python's json reads this non-standard token
    before = job_ids(airflow_stack)
    out = arf(airflow_stack, "start", "digits_smoke", "--conf-file", str(conf))
    assert out.returncode == 2 and "'lr' must be a finite number, got nan" in out.stderr
    assert job_ids(airflow_stack) == before
    out = arf(airflow_stack, "list", "--limit", "-1")
    assert out.returncode == 2 and "limit -1 is out of range" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_oversized_name_is_not_echoed(airflow_stack):
    out = arf(airflow_stack, "start", "x" * 100_000)
    assert out.returncode == 2 and "template is too long: 100000 characters" in out.stderr
    assert len(out.stderr) < 1000, len(out.stderr)


def test_unknown_template_and_job(airflow_stack):
    out = arf(airflow_stack, "start", "no_such_template")
    assert out.returncode == 2
    assert "unknown template 'no_such_template'" in out.stderr and "digits_smoke" in out.stderr
    out = arf(airflow_stack, "status", "digits_smoke/no_such_run")
    assert out.returncode == 2 and "no job 'digits_smoke/no_such_run'" in out.stderr
    out = arf(airflow_stack, "status", "not-a-job-id")
    assert out.returncode == 2 and "TEMPLATE/RUN_ID" in out.stderr


def test_unreachable_server_and_bad_credentials(airflow_stack):
    out = arf(airflow_stack, "list", ARF_AIRFLOW_URL=f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 3 and "unreachable" in out.stderr
    out = arf(airflow_stack, "list", ARF_AIRFLOW_PASSWORD="wrong-password")
    assert out.returncode == 2 and "was rejected (HTTP 401" in out.stderr
    assert "wrong-password" not in out.stderr  # credentials never echoed
