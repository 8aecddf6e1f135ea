"""Failure learning, Airflow side: the template fields of a fine-tune, the data-interval macros,
the DAG built from it, and a prepare step that finds nothing skipping its task (real Airflow
operator, real `arf-trainer prepare` subprocess, real Delta hub)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from arf_training.errors import TemplateError
from arf_training.templates import load_folder, parse_template, template_files

REPO = Path(__file__).resolve().parents[2]
FINETUNE = (REPO / "config_templates" / "reach_bc_failure_finetune.yaml").read_text()
REACH = (REPO / "config_templates" / "reach_bc.yaml").read_text()


def _edit(old: str, new: str, text: str = FINETUNE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_macros_become_bound_parameters():
    template = parse_template(FINETUNE)
    query = template.dataset.query
    assert "collected_at >= $data_interval_start AND collected_at < $data_interval_end" in query
    assert "{{" not in query and template.uses_data_interval
    assert template.dataset.skip_if_empty and template.dataset.replay.ratio == 2.0
    assert "collected_at < $data_interval_start" in template.dataset.replay.query
    assert template.training.freeze_layers == 0
    assert template.evaluation.promotion_margin == 0.02
    assert parse_template(REACH).evaluation.promotion_margin == 0.02
    assert not parse_template(REACH).uses_data_interval


MALFORMED = [
    pytest.param(_edit("< {{ data_interval_end }}", "< {{ ds }}"),
                 ["dataset.query", "'{{ ds }}'", "only {{ data_interval_start }}",
                  "{{ logical_date }}"], id="unknown-macro"),
    pytest.param(_edit("< {{ data_interval_end }}", "< {{ data_interval_end | ds }}"),
                 ["dataset.query", "data_interval_end | ds", "only"], id="macro-with-filter"),
    pytest.param(_edit("< {{ data_interval_end }}", "< '{{ data_interval_end }}'"),
                 ["dataset.query", "string literal", "without quotes"], id="quoted-macro"),
    pytest.param(_edit('schedule: "0 2 * * *"', "schedule: null"),
                 ["reads the run's data interval", "schedule is None", "'0 2 * * *'"],
                 id="interval-without-schedule"),
    pytest.param(_edit("  promotion_margin: 0.02", "  promotion_margin: 1.0"),
                 ["evaluation.promotion_margin", "less than 1", "1.0"], id="margin-too-big"),
    pytest.param(_edit("  promotion_margin: 0.02", "  promotion_margin: -0.1"),
                 ["evaluation.promotion_margin", "greater than or equal to 0"],
                 id="margin-negative"),
    pytest.param(_edit("    ratio: 2.0", "    ratio: 0"),
                 ["dataset.replay.ratio", "greater than 0"], id="replay-ratio-zero"),
    pytest.param(_edit("    ratio: 2.0", "    ratio: 2.0\n    limit: 5"),
                 ["dataset.replay.limit", "unknown key 'limit'", "query, ratio"],
                 id="replay-unknown-key"),
    pytest.param(_edit("FROM reach_demos WHERE success", "FROM reach_demos; DROP TABLE x"),
                 ["dataset.replay.query", "more than one statement"], id="replay-two-statements"),
    pytest.param(_edit("  skip_if_empty: true", "  skip_if_empty: sometimes"),
                 ["dataset.skip_if_empty", "'sometimes'"], id="skip-not-bool"),
    pytest.param(_edit("  freeze_layers: 0", "  freeze_layers: -1"),
                 ["training.freeze_layers", "greater than or equal to 0"], id="freeze-negative"),
    pytest.param(_edit("  base_model: models:/reach_bc_policy@champion\n", "")
                 .replace("  name: reach_bc_policy", "  name: other_policy")
                 .replace("  freeze_layers: 0", "  freeze_layers: 1"),
                 ["freeze_layers is 1, but model.base_model is not set"], id="freeze-no-base"),
    pytest.param(_edit("  base_model: models:/reach_bc_policy@champion",
                       "  base_model: reach_bc_policy@champion"),
                 ["model.base_model", "should match pattern"], id="base-not-a-uri"),
]


@pytest.mark.parametrize("text,fragments", MALFORMED)
def test_malformed_finetune_messages(text, fragments):
    with pytest.raises(TemplateError) as info:
        parse_template(text, "ft.yaml")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_finetune_may_share_its_base_models_name_but_not_evaluate_differently(tmp_path):
    (tmp_path / "a.yaml").write_text(REACH)
    (tmp_path / "b.yaml").write_text(FINETUNE)
    good, issues = load_folder(template_files(tmp_path))
    assert issues == [] and {g.name for g in good} == {"reach_bc", "reach_bc_failure_finetune"}

    (tmp_path / "b.yaml").write_text(_edit("  episodes: 50", "  episodes: 20"))
    good, issues = load_folder(template_files(tmp_path))
    assert [g.name for g in good] == ["reach_bc"]
    assert issues[0].field == "evaluation" and "same model 'reach_bc_policy'" in issues[0].message

    # Two from-scratch templates of one model are still refused.
    (tmp_path / "b.yaml").write_text(REACH.replace("name: reach_bc\n", "name: reach_two\n"))
    good, issues = load_folder(template_files(tmp_path))
    assert good == [] and all("duplicate model name" in i.message for i in issues)


def test_dags_of_the_finetune(monkeypatch):
    from airflow.sdk import CronDataIntervalTimetable

    from arf_training.backends.base import Backend
    from arf_training.factory import build_dags

    monkeypatch.delenv("ARF_BACKEND", raising=False)
    dags = build_dags(REPO / "config_templates")
    dag = dags["reach_bc_failure_finetune"]
    # Contiguous [previous fire time, this fire time) intervals, not CronTrigger's empty ones.
    assert isinstance(dag.timetable, CronDataIntervalTimetable) and dag.catchup is False
    assert [t.task_id for t in dag.topological_sort()] == [
        "choose_recipe", "prepare_data", "train", "register_model"]
    assert "nightly_recipe" in dag.params and "nightly_recipe" not in dags["reach_bc"].params
    assert "| nightly | `choose_recipe`: retrain while the champion is below 80%, within 25% " \
        in dag.doc_md and "| nightly |" not in dags["reach_bc"].doc_md
    assert [o.uri.rstrip("/") for o in dag.get_task("register_model").outlets] == [
        "arf-model://reach_bc_policy"]
    # arf_evaluate scores reach_bc_policy once, with reach_bc's evaluation section.
    (evaluate,) = dags["arf_evaluate"].tasks
    assert evaluate.templates["reach_bc_policy"].name == "reach_bc"
    loaded, _ = load_folder(template_files(REPO / "config_templates"))
    assert Backend.evaluable(list(reversed(loaded)))["reach_bc_policy"].name == "reach_bc"


def _context(dag, task_id: str, start: dt.datetime | None, end: dt.datetime | None,
             xcoms: dict | None = None):
    """A task's context; `xcoms`: the return values of the tasks before (by task id)."""
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task_id, try_number=1, map_index=-1,
                         xcom_pull=lambda task_ids: (xcoms or {}).get(task_ids))
    dag_run = SimpleNamespace(run_id="scheduled__2026-11-29T02:00:00+00:00", conf={},
                              logical_date=start, data_interval_start=start,
                              data_interval_end=end)
    return {"ti": ti, "dag": dag, "task": dag.get_task(task_id), "dag_run": dag_run,
            "params": {}}


def test_prepare_with_no_new_rows_skips_the_task(tmp_path, monkeypatch):
    """choose_recipe (a real `arf-trainer choose`) finds no new rows: fine-tune, without asking
    MLflow; prepare_data reads its conf, and its exit code 99 -> AirflowSkipException (not a
    failure)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from arf_trainer.datahub.tables import write_table
    from arf_training.factory import build_dags
    from arf_training.runtime import run_identity

    hub = tmp_path / "hub"
    n = 3
    columns = {"episode": pa.array(np.full(n, -1, dtype=np.int64)),
               "step": pa.array(np.arange(n, dtype=np.int32))}
    columns.update({f"obs_{j}": pa.array(np.zeros(n, dtype=np.float32)) for j in range(10)})
    columns.update({f"act_{j}": pa.array(np.zeros(n, dtype=np.float32)) for j in range(2)})
    columns["collected_at"] = pa.array([dt.datetime(2026, 11, 20, tzinfo=dt.UTC)] * n,
                                       type=pa.timestamp("us", tz="UTC"))
    write_table(hub, "corrections", pa.table(columns))
    monkeypatch.setenv("ARF_DATAHUB_URI", str(hub))
    monkeypatch.setenv("ARF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ARF_BACKEND", raising=False)
    dag = build_dags(REPO / "config_templates")["reach_bc_failure_finetune"]
    start = dt.datetime(2026, 11, 28, 2, tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1)
    chosen = dag.get_task("choose_recipe").execute(_context(dag, "choose_recipe", start, end))
    assert chosen["recipe"] == "fine-tune" and "no new rows tonight" in chosen["reason"]
    assert chosen["conf"] == {"nightly_recipe": "fine-tune"}
    context = _context(dag, "prepare_data", start, end, {"choose_recipe": chosen})

    identity = run_identity(context)
    assert (identity.data_interval_start, identity.data_interval_end) == (
        start.isoformat(), end.isoformat())
    with pytest.raises(AirflowSkipException) as info:
        dag.get_task("prepare_data").execute(context)
    message = str(info.value)
    (spec,) = (tmp_path / "home" / "workspace" / dag.dag_id).glob("*/jobspec/prepare-try1.json")
    assert json.loads(spec.read_text())["conf"] == {"nightly_recipe": "fine-tune"}
    assert "exit code 99" in message
    assert "no new rows between 2026-11-28T02:00:00+00:00 and 2026-11-29T02:00:00+00:00" \
        in message and "corrections@v0" in message


def test_a_step_after_a_choice_that_returned_nothing_says_what_to_do(monkeypatch):
    from arf_training.errors import ArfError
    from arf_training.factory import build_dags
    from arf_training.runtime import trigger_conf

    monkeypatch.delenv("ARF_BACKEND", raising=False)
    dags = build_dags(REPO / "config_templates")
    dag = dags["reach_bc_failure_finetune"]
    start = dt.datetime(2026, 11, 28, 2, tzinfo=dt.UTC)
    with pytest.raises(ArfError, match="clear choose_recipe to run it again"):
        trigger_conf(_context(dag, "train", start, start, {"choose_recipe": None}))
    chosen = {"recipe": "retrain", "conf": {"nightly_recipe": "retrain", "epochs": 2}}
    assert trigger_conf(_context(dag, "train", start, start, {"choose_recipe": chosen})) == \
        chosen["conf"]
    # A DAG without the task reads the trigger conf, whatever XComs there are.
    other = dags["reach_bc"]
    assert trigger_conf(_context(other, "train", start, start,
                                 {"choose_recipe": {"conf": {"epochs": 9}}})) == {}
