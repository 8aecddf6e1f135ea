"""Operator extra links (issue 13): from a task to its MLflow run, model version, PyTorchJob."""

from __future__ import annotations

from pathlib import Path

import pytest

from arf_training.links import model_version_url, mlflow_ui_url, pytorchjob_url, run_url
from arf_training.templates import load_template

REPO = Path(__file__).resolve().parents[2]
UI = "https://mlflow.example.org"
STEP_LINKS = {"MLflow run", "Model version"}


@pytest.fixture
def ui(monkeypatch):
    monkeypatch.setenv("ARF_MLFLOW_UI_URL", UI + "/")
    return UI


def test_mlflow_ui_url_from_the_setting_or_an_mlflow_server(monkeypatch):
    monkeypatch.delenv("ARF_MLFLOW_UI_URL", raising=False)
    monkeypatch.setenv("ARF_TRACKING_URI", "http://127.0.0.1:5000")  # `arf up`'s server
    assert mlflow_ui_url() == "http://127.0.0.1:5000"
    monkeypatch.setenv("ARF_TRACKING_URI", "postgresql+psycopg://mlflow@/mlflow")
    assert mlflow_ui_url() is None  # a store without a server has no UI: no link
    assert run_url({"mlflow_run_id": "abc"}) == ""
    monkeypatch.setenv("ARF_MLFLOW_UI_URL", "https://mlflow.prod/")
    assert mlflow_ui_url() == "https://mlflow.prod"


def test_urls_from_step_results(ui, monkeypatch):
    train = {"mlflow_run_id": "r1", "experiment_id": "7", "weights_sha256": "x"}
    assert run_url(train) == f"{UI}/#/experiments/7/runs/r1"
    register = {"model_name": "reach bc/policy", "model_version": "3",
                "training_run_id": "r1"}
    # No experiment in the register result: MLflow's /runs/<id> route finds it.
    assert run_url(register) == f"{UI}/#/runs/r1"
    assert model_version_url(register) == f"{UI}/#/models/reach%20bc%2Fpolicy/versions/3"
    evaluate = [{"model_name": "m", "model_version": 4, "mlflow_run_id": "e1"}]
    assert run_url(evaluate) == f"{UI}/#/runs/e1"
    assert model_version_url(evaluate) == f"{UI}/#/models/m/versions/4"
    for nothing in (None, {}, [], {"rows": 10}):  # prepare, no result: no button
        assert run_url(nothing) == "" and model_version_url(nothing) == ""
    job = {"status": "success", "name": "reach-bc-train-1", "namespace": "arf-ml"}
    assert pytorchjob_url(job) == ""  # no dashboard configured
    monkeypatch.setenv("ARF_K8S_JOB_URL", "https://k8s.example/#/pytorchjob/{namespace}/{name}")
    assert pytorchjob_url(job) == "https://k8s.example/#/pytorchjob/arf-ml/reach-bc-train-1"


def _link_names(task) -> set[str]:
    return {link.name for link in task.operator_extra_links}


@pytest.mark.parametrize("backend", ["local", "kubernetes"])
def test_built_dags_have_the_links_and_they_survive_serialization(backend, monkeypatch):
    from airflow.serialization.serialized_objects import DagSerialization

    from arf_training.factory import build_evaluate_dag, build_training_dag

    monkeypatch.setenv("ARF_K8S_NAMESPACE", "arf-ml")
    reach = load_template(REPO / "config_templates" / "reach_bc.yaml")  # train: 2 processes
    dag = build_training_dag(reach, backend)
    evaluate = build_evaluate_dag([reach], backend)
    expected = {"prepare_data": STEP_LINKS, "register_model": STEP_LINKS,
                "train": {"PyTorchJob"} if backend == "kubernetes" else STEP_LINKS}
    for task_id, names in expected.items():
        assert _link_names(dag.get_task(task_id)) == names, task_id
    assert _link_names(evaluate.get_task("evaluate")) == STEP_LINKS
    for built in (dag, evaluate):
        restored = DagSerialization.from_dict(DagSerialization.to_dict(built))
        for task in built.tasks:
            assert set(restored.get_task(task.task_id).extra_links) == _link_names(task)


CUSTOM_TRAIN = (REPO / "config_templates" / "digits_sklearn.yaml").read_text().replace(
    "name: digits_sklearn\n", "name: links_probe\n", 1).replace(
    "command: [python, -m, arf_trainer.examples.sklearn_digits]",
    # A stand-in training command: writes the result a real one writes (run and experiment).
    "command: [python, -c, \"import json, os; p = os.environ['ARF_RESULT_PATH']; "
    "os.makedirs(os.path.dirname(p), exist_ok=True); "
    "json.dump({'mlflow_run_id': 'run42', 'experiment_id': '5'}, open(p, 'w'))\"]")


@pytest.mark.integration
def test_a_real_run_stores_the_link_of_its_result(embedded, monkeypatch, tmp_path):
    """dag.test() runs the train task through Airflow's task runner; the runner stores each
    link as an XCom, which is what the UI reads."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from arf_training.factory import build_training_dag
    from arf_training.links import MlflowRunLink, ModelVersionLink

    monkeypatch.setenv("ARF_MLFLOW_UI_URL", UI)
    # dag.test() runs a DAG of the DAG folder: point it at a folder with only this template.
    monkeypatch.setenv("ARF_TEMPLATES_DIR", str(tmp_path))
    path = tmp_path / "links_probe.yaml"
    path.write_text(CUSTOM_TRAIN)
    dag = build_training_dag(load_template(path), "local").partial_subset(
        ["train"], include_upstream=False)
    run = dag.test()
    assert str(run.state) == "success"
    with create_session() as session:
        stored = {x.key: XComModel.deserialize_value(x) for x in session.scalars(
            select(XComModel).where(XComModel.dag_id == "links_probe",
                                    XComModel.run_id == run.run_id,
                                    XComModel.task_id == "train"))}
    assert stored["return_value"]["mlflow_run_id"] == "run42"
    assert stored[MlflowRunLink().xcom_key] == f"{UI}/#/experiments/5/runs/run42"
    assert stored[ModelVersionLink().xcom_key] == ""  # a training result names no version
