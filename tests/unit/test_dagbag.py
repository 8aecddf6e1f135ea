"""The DAG folder: no import errors, one DAG per valid template, the expected task graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_DAGS = ["digits_sklearn", "digits_smoke", "reach_bc"]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_one_dag_per_template_plus_evaluate(dagbag):
    from arf_training.templates import load_folder, template_files

    good, _ = load_folder(template_files(REPO / "config_templates"))
    assert sorted(dagbag.dag_ids) == sorted([g.name for g in good] + ["arf_evaluate"])


@pytest.mark.parametrize("dag_id", TEMPLATE_DAGS)
def test_training_task_graph(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert [t.task_id for t in dag.topological_sort()] == ["prepare_data", "train", "register_model"]
    assert dag.get_task("prepare_data").downstream_task_ids == {"train"}
    assert dag.get_task("train").downstream_task_ids == {"register_model"}
    register = dag.get_task("register_model")
    assert [o.uri.rstrip("/") for o in register.outlets] == [
        f"arf-model://{register.loaded.template.model.name}"]
    assert {type(t).__name__ for t in dag.tasks} == {"LocalStepOperator"}
    assert "arf" in dag.tags and dag.catchup is False
    assert dag.doc_md and register.loaded.path.name in dag.doc_md
    hyperparameters = set(register.loaded.template.training.hyperparameters)
    assert hyperparameters and set(dag.params.keys()) >= hyperparameters | {"seed"}


def test_dag_settings_come_from_the_template(dagbag):
    dag = dagbag.dags["reach_bc"]
    assert dag.max_active_runs == 2
    assert dag.default_args["retries"] == 1 and dag.default_args["owner"] == "robotics-ml"
    assert dag.get_task("train").execution_timeout.total_seconds() == 30 * 60
    assert sorted(dag.tags) == ["arf", "behaviour-cloning", "demo", "reach"]


def test_tasks_see_the_dag_params_at_run_time(dagbag):
    """The factory sets the DAG's Params after creating the tasks (so that Airflow does not
    deep-copy them into every task): each task must still resolve them, with the run's conf
    on top and validation, also after the scheduler's serialization round trip."""
    from airflow.sdk.definitions.param import process_params
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    dag = dagbag.dags["reach_bc"]
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert restored.params.keys() == dag.params.keys() >= {"epochs", "seed"}
    for task_id in ("prepare_data", "train", "register_model"):
        values = process_params(dag, dag.get_task(task_id), {"epochs": 7},
                                suppress_exception=False)
        assert values["epochs"] == 7 and values["batch_size"] == 256
        with pytest.raises(ParamValidationError, match="epochs"):
            process_params(dag, dag.get_task(task_id), {"epochs": 0}, suppress_exception=False)


def test_building_leaves_the_garbage_collector_as_it_was(monkeypatch):
    """The factory pauses the cyclic GC while it builds (parse time); the DAG processor's
    setting must be back afterwards, also after a failure."""
    import gc

    from arf_training.errors import ArfError
    from arf_training.factory import build_dags, raise_template_issues

    assert gc.isenabled()
    build_dags(REPO / "config_templates")
    assert gc.isenabled()
    monkeypatch.setenv("ARF_BACKEND", "slurm")  # fails while building
    with pytest.raises(ArfError, match="slurm"):
        build_dags(REPO / "config_templates")
    assert gc.isenabled()
    monkeypatch.delenv("ARF_BACKEND")
    gc.disable()
    try:
        raise_template_issues(REPO / "config_templates")
        assert not gc.isenabled()  # left off when it was off
    finally:
        gc.enable()


def test_evaluate_dag_is_scheduled_on_model_assets(dagbag):
    dag = dagbag.dags["arf_evaluate"]
    assert [t.task_id for t in dag.tasks] == ["evaluate"]

    def uris_of(condition):  # an Asset, or AssetAny/AssetAll of them
        if hasattr(condition, "objects"):
            return set().union(*(uris_of(o) for o in condition.objects))
        return {condition.uri.rstrip("/")}

    uris = uris_of(dag.timetable.asset_condition)
    assert "arf-model://reach_bc_policy" in uris
    # digits_smoke has no evaluation section: its model does not trigger evaluation.
    assert "arf-model://digits_classifier" not in uris


# Never imported by a DAG parse, with either backend: the container side's stack, and the
# Kubernetes clients (the provider's pod operator loads both, about a second; the Kubernetes
# backend creates it only when a task runs).
HEAVY = ("torch", "mlflow", "duckdb", "pandas", "optuna", "gymnasium", "kubernetes",
         "kubernetes_asyncio", "airflow.providers.cncf.kubernetes.operators.pod")


def _bag_in_subprocess(dags: Path, templates: Path) -> dict:
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag({str(dags)!r})\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('RESULT' + json.dumps({'dags': sorted(b.dag_ids), 'errors': b.import_errors, "
        "'heavy': heavy}))\n"
    )
    env = {**os.environ, "ARF_TEMPLATES_DIR": str(templates)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_parsing_imports_no_heavy_library():
    result = _bag_in_subprocess(REPO / "dags", REPO / "config_templates")
    assert result["errors"] == {}
    assert result["heavy"] == []


def test_broken_template_is_an_import_error_and_hides_nothing(tmp_path):
    for name in ("digits_smoke.yaml", "reach_bc.yaml"):
        (tmp_path / name).write_text((REPO / "config_templates" / name).read_text())
    (tmp_path / "broken.yaml").write_text(
        (REPO / "config_templates" / "digits_smoke.yaml").read_text()
        .replace("name: digits_smoke", "name: broken_one").replace("cpu: 1", "cpu: -1"))
    result = _bag_in_subprocess(REPO / "dags", tmp_path)
    assert result["dags"] == ["arf_evaluate", "digits_smoke", "reach_bc"]  # only these copied
    [(path, error)] = result["errors"].items()
    assert path.endswith("arf_template_errors.py")
    assert "1 invalid template(s)" in error
    assert "broken.yaml:" in error and "training.resources.cpu" in error


def test_duplicate_keys_and_yaml_syntax_errors_are_import_errors_with_their_line(tmp_path):
    good = (REPO / "config_templates" / "digits_smoke.yaml").read_text()
    (tmp_path / "digits_smoke.yaml").write_text(good)
    # A second metadata.name: without the check, the DAG would silently be called 'renamed'.
    dup = good.replace("  owner: platform", "  owner: platform\n  name: renamed", 1)
    (tmp_path / "dup.yaml").write_text(dup)
    bad = good.replace("  tags: [smoke, classifier]", "  tags: [smoke, classifier\n  x: 1", 1)
    (tmp_path / "bad.yaml").write_text(bad)
    result = _bag_in_subprocess(REPO / "dags", tmp_path)
    assert result["dags"] == ["arf_evaluate", "digits_smoke"]
    [(path, error)] = result["errors"].items()
    assert path.endswith("arf_template_errors.py")
    dup_line = dup.splitlines().index("  name: renamed") + 1
    bad_line = bad.splitlines().index("  tags: [smoke, classifier") + 1
    assert f"dup.yaml:{dup_line}: metadata.name: duplicate key 'name'" in error, error
    assert f"bad.yaml:{bad_line}: YAML syntax error" in error, error


def test_airflow_plugin_loader_leaves_the_package_alone():
    """Airflow imports every .py under plugins/ as a top-level module named after the file;
    plugins/.airflowignore keeps it out of arf_training, whose backends/kubernetes.py would
    otherwise become sys.modules["kubernetes"] and break the Kubernetes provider."""
    code = (
        "import sys, json\n"
        "from airflow import plugins_manager\n"
        "plugins_manager.ensure_plugins_loaded() if hasattr(plugins_manager, 'ensure_plugins_loaded')"
        " else plugins_manager.get_plugin_info()\n"
        "import kubernetes.client\n"
        "ours = sorted(n for n, m in list(sys.modules.items())"
        " if 'arf_training' in str(getattr(m, '__file__', '') or '')"
        " and not n.startswith(('arf_training', '__editable__')))\n"
        "print(json.dumps({'kubernetes': kubernetes.__file__, 'ours': ours}))\n")
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "site-packages" in result["kubernetes"], result
    assert result["ours"] == [], result
