"""`arf` driven with bad input, an unwritable home and Ctrl-C, as real processes: each ends with
one line on stderr that names the value and the fix, the documented exit code, no traceback,
and nothing started or written before the input was checked. Also `arf training reproduce`'s
verdict when the run's record is missing a value or names unknown code."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from arf_training import failure_loop as fl
from arf_training.errors import ConfError

ARF = str(Path(sys.executable).parent / "arf")


def arf(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "ARF_HOME": str(home), "ARF_DB": "sqlite", **env}
    return subprocess.run([ARF, *args], env=environ, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[0]


def test_a_schema_written_to_a_missing_folder_is_named(tmp_path):
    target = tmp_path / "no-such-folder" / "schema.json"
    proc = arf("templates", "schema", "-o", str(target), home=tmp_path / "home")
    assert proc.returncode == 2
    assert one_error_line(proc) == (f"arf templates schema: error: -o {target}: No such file or "
                                    "directory; give a file path in an existing folder you can "
                                    "write")


def test_an_arf_home_that_cannot_be_made_names_arf_home_and_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "home"  # under a file: cannot be made, even by root
    proc = arf("env", home=home)
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_error_line(proc)
    assert line.startswith(f"arf env: error: {home / 'airflow'}: Not a directory; ARF_HOME "
                           f"({home}) must be a folder this user can write"), line


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--conf", "[1]"], "--conf '[1]' is a JSON list, not an object", id="list"),
    pytest.param(["--template", "digits_smoke", "--conf", '{"epochs": 0}'],
                 "'epochs' = 0 is below its minimum 1", id="out-of-range"),
    pytest.param(["--template", "digits_smoke", "--conf", '{"epoch": 2}'],
                 "unknown parameter 'epoch'", id="unknown-param"),
    pytest.param(["--template", "digitz"], "no template named 'digitz'", id="unknown-template"),
])
def test_the_demo_refuses_bad_input_before_seeding_or_starting_anything(tmp_path, args,
                                                                         expected):
    home = tmp_path / "home"
    proc = arf("demo", *args, home=home)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert "[arf demo]" not in proc.stdout and not home.exists()  # no hub, DB or Airflow run


@pytest.mark.parametrize("conf, expected", [
    pytest.param({"epochs": 0}, "--conf: invalid trigger conf for 'reach_bc_failure_finetune'",
                 id="out-of-range"),
    pytest.param({"nightly_recipe": "sometimes"}, "'nightly_recipe'", id="bad-enum"),
    pytest.param([1], "--conf [1] must be a JSON object", id="list"),
])
def test_the_failure_loop_checks_the_nightly_conf_before_the_weak_start_trains(conf, expected):
    with pytest.raises(ConfError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        fl.LoopConfig(finetune_conf=conf).check()


def test_loops_started_in_the_same_second_get_homes_of_their_own(tmp_path):
    first, second = fl._new_home(tmp_path), fl._new_home(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    (first / "mlflow.db").write_text("")  # a loop that ran: never reused
    with pytest.raises(ConfError, match="is not empty"):
        fl.Loop(first, fl.LoopConfig())


def test_reproducing_an_unknown_run_is_bad_input_not_a_mismatch(tmp_path):
    proc = arf("training", "reproduce", "no-such-run", home=tmp_path / "home",
               ARF_TRACKING_URI=f"file://{tmp_path}/mlruns", MLFLOW_ALLOW_FILE_STORE="true")
    assert proc.returncode == 2  # exit 1 means "mismatch"
    line = one_error_line(proc)
    assert line.startswith("arf training: error: MLflow run 'no-such-run' not found"), line
    assert proc.stdout == ""


def test_a_value_the_run_did_not_record_is_not_claimed_either_way():
    from arf_training.reproduce import compare, format_report

    verdict = compare({"data_fingerprint": (None, "7cac59"), "weights_sha256": ("b496", "b496")})
    assert verdict["result"] == "not verified"
    assert verdict["checks"]["data_fingerprint"]["match"] is None
    report = {"run_id": "r1", "world_size": 1, "workspace": "/ws", "match": False,
              "result": verdict["result"], "checks": verdict["checks"],
              "notes": verdict["notes"]}
    text = format_report(report)
    assert "recorded (none)" in text and "not compared" in text
    assert text.splitlines()[-1] == "result: not verified"
    assert compare({"a": ("x", "y"), "b": (None, "z")})["result"] == "mismatch"
    assert compare({"a": ("x", "x")})["result"] == "match"


def test_a_run_recorded_with_other_code_says_so():
    from arf_training.reproduce import lineage_notes

    lineage = {"code_version": {"package": "0.1.0", "git_commit": "0" * 40,
                                "git_dirty": "false"}}
    assert any(f"code git_commit {'0' * 40} recorded" in note for note in lineage_notes(lineage))


def test_ctrl_c_ends_with_one_line_and_exit_130(tmp_path):
    """A call blocked on an Airflow that never answers, interrupted as a terminal would."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        environ = {**os.environ, "ARF_HOME": str(tmp_path / "home"),
                   "ARF_AIRFLOW_URL": f"http://127.0.0.1:{server.getsockname()[1]}"}
        proc = subprocess.Popen([ARF, "training", "status", "digits_smoke/r1"], env=environ,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        server.settimeout(60)
        conn, _ = server.accept()  # the CLI is inside its HTTP call now
        with conn:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == ""
    assert err.strip().splitlines() == ["arf training: interrupted (Ctrl-C)"]


@pytest.mark.parametrize("port", ["-5", "65536", "http"])
def test_grpc_refuses_a_port_out_of_range_instead_of_wrapping_it(tmp_path, port):
    """`--port -5` listened on 65531 (and `arf up --port 99999` started an api-server whose
    clients could not reach it): the port is checked at the argument."""
    proc = subprocess.run([ARF, "serve", "grpc", "--port", port], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "ARF_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"arf serve grpc: error: argument --port: {port!r} is not a port number from 0 to 65535")


def test_the_stack_ports_are_checked_before_anything_starts():
    from arf_training.cli import _port

    assert _port()("8080") == 8080 and _port(free_ok=True)("0") == 0
    for bad in ("0", "99999", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a port number from 1 to"):
            _port()(bad)


def test_the_demos_reproduce_command_runs_from_where_the_demo_ran(tmp_path, monkeypatch):
    """It said `.venv/bin/arf ...`, which exists only in the checkout's root."""
    from arf_training.demo import format_summary
    from arf_training.settings import ArfSettings

    monkeypatch.chdir(tmp_path)
    summary = {"template": "reach_bc", "dag_run_id": "manual__1", "state": "success",
               "wall_s": 1.0, "total_s": 2.0, "dataset": {"rows": 10},
               "training": {"mlflow_run_id": "abc"}, "evaluation": None, "log": "demo.log",
               "model": {"model_name": "m", "model_version": "1"}}
    settings = ArfSettings(home=tmp_path, tracking_uri="sqlite:///m.db", datahub_uri="hub",
                           artifact_root="art")
    [line] = [line for line in format_summary(summary, settings).splitlines()
              if line.lstrip().startswith("reproduce")]
    command = line.split()[1:5]
    assert command[1:] == ["training", "reproduce", "abc"]
    assert Path(command[0]).resolve() == Path(sys.executable).parent / "arf"


def test_a_custom_commands_weights_are_hashed_as_register_hashed_them(tmp_path):
    """A command whose result JSON names its own weights_sha256 (of one file) was reported
    MISMATCH against register's hash of the whole output folder although every bit matched."""
    from arf_trainer.custom import folder_sha256 as register_hash

    from arf_training.reproduce import folder_sha256, rerun_weights_sha256

    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    (out / "model.bin").write_bytes(b"weights-v1")
    (out / "sub" / "config.json").write_text("{}")
    (out / os.fsdecode(b"\xff-not-utf8.bin")).write_bytes(b"x")  # register hashes such names
    claim = {"weights_sha256": "sha256 of model.bin alone", "metrics": {}}
    assert rerun_weights_sha256(claim, out, custom=True) == register_hash(out)
    assert folder_sha256(out) == register_hash(out)
    assert rerun_weights_sha256({"weights_sha256": "abc"}, out, custom=False) == "abc"


def test_two_reruns_of_one_run_in_the_same_second_get_workspaces_of_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-run's id was the run id plus the second it started: two `arf reproduce` of one
    run in that second shared a workspace, and the second took the first's steps for its own."""
    from arf_training.reproduce import rerun_identity
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import workspace_for

    monkeypatch.setenv("ARF_HOME", str(tmp_path))
    monkeypatch.setenv("ARF_DB", "sqlite")
    monkeypatch.setattr("time.strftime", lambda fmt: "20261205T120000")
    first, second = rerun_identity("abc123"), rerun_identity("abc123")
    assert first.run_id.startswith("abc123-20261205T120000-")
    settings = ArfSettings.from_env()
    assert workspace_for(settings, first.dag_id, first.run_id) != \
        workspace_for(settings, second.dag_id, second.run_id)
