"""What `arf demo` shows of an `airflow dags test` run: each step's lines whole, with one
timestamp, the training's epoch progress, and nothing of Airflow's own bookkeeping."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from arf_training.demo import demo_line

# Lines as `airflow dags test` prints them (Airflow 3.3's console renderer), relayed step
# output included: "<time>Z [<level>] <event> [<logger>] key=value ...".
LOGGER = "[airflow.task.operators.arf_training.backends.local.LocalStepOperator] loc=local.py:168"
EPOCH = ("arf_trainer.trainer.run: epoch 3/30 | step 99/990 | train_loss 0.1973 | val_loss 0.1700"
         " | 10,519 samples/s | ETA 0:00:23")


def airflow_line(event: str, level: str = "info", logger: str = LOGGER) -> str:
    return f"2026-12-03T17:41:59.413945Z [{level:<9}] {event} {logger}\n"


def test_training_epoch_progress_is_shown():
    assert demo_line(airflow_line(EPOCH)) == f"  17:41:59 {EPOCH}"


def test_a_long_step_line_is_shown_whole_with_one_timestamp():
    event = ("arf_trainer.evaluator: evaluate: models:/reach_bc_policy/1 on reach: success rate "
             "96.0% (95% CI 86.5-98.9%) over 50 episodes (threshold 80.0%), mean final distance "
             "0.0049 (95% CI 0.0031-0.0072); failures written to the data hub table failures "
             "for the nightly fine-tune")
    shown = demo_line(airflow_line(event))
    assert len(event) > 250
    assert shown == f"  17:41:59 {event}"  # nothing cut, Airflow's logger suffix dropped


@pytest.mark.parametrize("event", [
    pytest.param("arf_trainer.trainer.run: on SIGTERM: finish the step, checkpoint and exit 75",
                 id="setup"),
    pytest.param("arf_trainer.trainer.run: trained bc: 990 steps; weights /w/train/model.pt",
                 id="trained"),
    pytest.param("arf_trainer.evaluator: promotion gate for models:/reach_bc_policy/1: no version "
                 "has the 'champion' alias yet", id="gate"),
])
def test_every_line_of_the_trainers_own_log_is_shown(event):
    assert demo_line(airflow_line(event)) == f"  17:41:59 {event}"


@pytest.mark.parametrize("event, logger", [
    pytest.param("$ /work/main/.venv/bin/arf-trainer prepare", LOGGER, id="command"),
    pytest.param("Pushing xcom", "[task] loc=task_runner.py:2280", id="xcom"),
    pytest.param("::group::Post Execute", "[task] loc=task_runner.py:1580", id="group"),
    pytest.param("Task instance state updated",
                 "[airflow.api_fastapi.execution_api.routes.task_instances] rows_affected=1",
                 id="state"),
])
def test_airflow_bookkeeping_stays_in_the_full_log_only(event, logger):
    assert demo_line(airflow_line(event, logger=logger)) is None


def test_errors_are_shown_with_their_level():
    line = airflow_line("Task failed with exception: StepFailed: step 'train' failed", "error",
                        "[task] loc=task_runner.py:1100")
    assert demo_line(line) == ("  17:41:59 ERROR Task failed with exception: StepFailed: "
                               "step 'train' failed")
    assert demo_line("Traceback (most recent call last):\n") == "Traceback (most recent call last):"


def _summary() -> dict:
    return {"template": "reach_bc", "dag_run_id": "manual__1", "state": "success", "wall_s": 1.0,
            "total_s": 2.0, "dataset": {"rows": 10}, "training": {"mlflow_run_id": "abc"},
            "model": {"model_name": "m", "model_version": "1"}, "evaluation": None,
            "log": "demo.log"}


def test_the_summary_says_how_to_put_arf_on_path(tmp_path):
    from arf_training.demo import format_summary
    from arf_training.settings import ArfSettings

    settings = ArfSettings(home=tmp_path, tracking_uri="sqlite:///m.db", datahub_uri="hub",
                           artifact_root="art")
    text = format_summary(_summary(), settings)
    [line] = [line for line in text.splitlines() if "activate" in line]
    activate = line.split("source ", 1)[1].split()[0]
    # Run as printed, in a shell whose PATH lacks the venv (as after `make demo`).
    proc = subprocess.run(["bash", "-c", f"source {activate} && command -v arf"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == Path(sys.executable).parent / "arf"


def test_readme_activates_the_venv_before_its_first_arf_command(repo):
    text = (repo / "README.md").read_text()
    first = re.search(r"^arf \w", text, re.MULTILINE)
    assert first is not None
    assert "source .venv/bin/activate" in text[:first.start()], \
        "README writes `arf ...` before saying how to put it on PATH"


def test_the_metadata_db_is_shown_without_its_password():
    from arf_training.demo import shown_uri

    uri = "postgresql+psycopg://arf:s3cret-Pw@/airflow?host=/tmp/h/postgres/run&port=5432"
    assert "s3cret-Pw" not in shown_uri(uri)
    assert shown_uri(uri).startswith("postgresql+psycopg://arf:***@/airflow")
    assert shown_uri("sqlite:////tmp/h/airflow/airflow.db") == "sqlite:////tmp/h/airflow/airflow.db"


def test_the_summary_shows_no_database_password(tmp_path):
    from arf_training.demo import format_summary
    from arf_training.settings import ArfSettings

    uri = "postgresql+psycopg://arf:s3cret-Pw@/mlflow?host=/tmp/h/postgres/run&port=5432"
    settings = ArfSettings(home=tmp_path, tracking_uri=uri, datahub_uri="hub",
                           artifact_root="art")
    summary = format_summary(_summary(), settings)
    assert "s3cret-Pw" not in summary
    [line] = [line for line in summary.splitlines() if "UIs" in line]
    assert "make up" in line and "http://127.0.0.1:5000" in line


def test_the_demo_renders_camera_frames_only_for_a_template_that_reads_them():
    from arf_training.demo import _template, reads_pixels

    # Seeding reach_pixels renders 10,000 frames: only `arf demo --template reach_pixels_bc`.
    assert reads_pixels(_template("reach_pixels_bc"))
    assert not reads_pixels(_template("reach_bc"))


def test_an_unknown_template_is_named_with_the_ones_there_are():
    from arf_training.demo import _template
    from arf_training.errors import ArfError

    with pytest.raises(ArfError, match=r"no template named 'reach_bcc'.*'reach_bc'"):
        _template("reach_bcc")


def test_a_federated_demo_seeds_each_site_hub_non_iid(tmp_path):
    from arf_training.demo import _template, seed_site_hubs
    from arf_training.settings import ArfSettings

    settings = ArfSettings(home=tmp_path, tracking_uri="sqlite:///x.db",
                           datahub_uri=str(tmp_path / "datahub"), artifact_root="art")
    template = _template("reach_bc_federated")
    env = {**os.environ, "ARF_HOME": str(tmp_path)}
    seeded = seed_site_hubs(settings, env, template)
    assert set(seeded) == {"north", "south", "west"}
    assert all(v["action"] == "written" and v["rows"] > 0 for v in seeded.values())
    assert sum(v["episodes"] for v in seeded.values()) == 300  # one split, no episode twice
    for site in seeded:  # the template's relative hubs lie under ARF_HOME
        assert (tmp_path / "sites" / site / "datahub" / "reach_demos").is_dir()
    again = seed_site_hubs(settings, env, template)
    assert {v["action"] for v in again.values()} == {"unchanged"}


def test_a_federated_runs_dataset_is_the_sites_results(tmp_path):
    import json

    from arf_training.demo import _prepare_result, _template

    for n, site in enumerate(("north", "south", "west")):
        folder = tmp_path / "sites" / site / "prepare"
        folder.mkdir(parents=True)
        folder.joinpath("result.json").write_text(json.dumps(
            {"rows": 100 + n, "train_rows": 90, "val_rows": 10 + n,
             "tables": {"reach_demos": n}, "fingerprint": f"f{n}"}))
    result = _prepare_result(tmp_path, _template("reach_bc_federated"))
    assert (result["rows"], result["train_rows"], result["val_rows"]) == (303, 270, 33)
    assert result["tables"] == {"north:reach_demos": 0, "south:reach_demos": 1,
                                "west:reach_demos": 2}
    assert result["sites"]["west"]["fingerprint"] == "f2"
