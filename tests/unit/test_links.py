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


@pytest.mark.parametrize("variable", ["ARF_TRACKING_URI", "ARF_MLFLOW_UI_URL"])
def test_credentials_in_the_mlflow_address_never_reach_a_link(variable, monkeypatch):
    """A link is shown to everyone who may see the task; the tracking URI may carry the
    server's password (basic auth) or a token in its query."""
    monkeypatch.delenv("ARF_MLFLOW_UI_URL", raising=False)
    monkeypatch.setenv(variable, "HTTPS://alice:s3cret@mlflow.example.org:8443/mlflow/?token=t0k#x")
    assert mlflow_ui_url() == "https://mlflow.example.org:8443/mlflow"
    link = run_url({"mlflow_run_id": "r1", "experiment_id": "7"})
    assert link == "https://mlflow.example.org:8443/mlflow/#/experiments/7/runs/r1"
    for secret in ("alice", "s3cret", "t0k"):
        assert secret not in link


@pytest.mark.parametrize("setting", ["javascript:alert(1)//", "mlflow.example.org",
                                     "file:///etc/passwd", "http://", "http://[::1",
                                     "ftp://alice:s3cret@mlflow.example.org/"])
def test_an_mlflow_ui_url_that_is_no_web_address_makes_no_link(setting, monkeypatch, caplog):
    """A scheme-less value would be a link relative to the Airflow UI; anything but http(s)
    (javascript:, file:) is no MLflow UI. The task log says so, without the value."""
    monkeypatch.setenv("ARF_MLFLOW_UI_URL", setting)
    assert mlflow_ui_url() is None and run_url({"mlflow_run_id": "r1"}) == ""
    assert "ARF_MLFLOW_UI_URL is not an http(s) address" in caplog.text
    assert "s3cret" not in caplog.text


def test_hostile_ids_in_a_result_stay_one_path_segment(ui, monkeypatch):
    """Each id is one segment of the MLflow UI's route: no `/`, `..`, `:` or quotes of its own
    (a `/` let `../..` climb to another page of the UI), and only strings or integers."""
    hostile = {"mlflow_run_id": "../../#/admin", "experiment_id": "1/../../x",
               "model_name": "javascript:alert('x')", "model_version": "../3\"?"}
    assert run_url(hostile) == f"{UI}/#/experiments/1%2F..%2F..%2Fx/runs/..%2F..%2F%23%2Fadmin"
    assert model_version_url(hostile) == (
        f"{UI}/#/models/javascript%3Aalert%28%27x%27%29/versions/..%2F3%22%3F")
    for odd in ({"a": 1}, ["r1"], True, 1.5, ""):
        assert run_url({"mlflow_run_id": odd}) == "", odd
        assert model_version_url({"model_name": "m", "model_version": odd}) == "", odd
        assert model_version_url({"model_name": odd, "model_version": "1"}) == "", odd
    # An experiment id that is no id: the /runs/<id> route, which finds the experiment itself.
    assert run_url({"mlflow_run_id": "r1", "experiment_id": {"id": 7}}) == f"{UI}/#/runs/r1"
    monkeypatch.setenv("ARF_K8S_JOB_URL", "https://k8s.example/#/pytorchjob/{namespace}/{name}")
    assert pytorchjob_url({"name": "../../x", "namespace": "a/b"}) == (
        "https://k8s.example/#/pytorchjob/a%2Fb/..%2F..%2Fx")
    assert pytorchjob_url({"name": ["x"], "namespace": "a"}) == ""


JOB = {"name": "reach-bc-train-1", "namespace": "arf-ml"}


@pytest.mark.parametrize("template, link", [
    pytest.param("https://kubeflow.example/jobs/{name}", "https://kubeflow.example/jobs/"
                 "reach-bc-train-1", id="no-namespace"),
    pytest.param("https://d.example/{{x}}/{namespace}/{name}",
                 "https://d.example/{x}/arf-ml/reach-bc-train-1", id="literal-braces"),
    pytest.param("https://d.example/{namespace}/{job}", "", id="unknown-field"),
    pytest.param("https://d.example/{namespace}/{name", "", id="unclosed-brace"),
    pytest.param("https://d.example/{}/{name}", "", id="positional"),
    pytest.param("https://d.example/{name.__class__}", "", id="attribute"),
    pytest.param("https://d.example/{name!r}", "", id="conversion"),
])
def test_job_url_templates(template, link, monkeypatch, caplog):
    """A template naming anything but {namespace} and {name} makes no link and says why in the
    task log (before, a KeyError or ValueError from str.format: a traceback, or with an
    attribute or a conversion, a link to the wrong page)."""
    monkeypatch.setenv("ARF_K8S_JOB_URL", template)
    assert pytorchjob_url(JOB) == link
    if not link:
        assert "ARF_K8S_JOB_URL" in caplog.text


def test_a_job_without_the_namespace_its_template_names_has_no_link(monkeypatch):
    monkeypatch.setenv("ARF_K8S_JOB_URL", "https://d.example/{namespace}/{name}")
    assert pytorchjob_url({"name": "j"}) == ""  # was https://d.example//j


def test_https_mlflow_behind_a_path_prefix(monkeypatch):
    monkeypatch.delenv("ARF_MLFLOW_UI_URL", raising=False)
    monkeypatch.setenv("ARF_TRACKING_URI", "https://ml.example.org/tools/mlflow//")
    assert run_url({"mlflow_run_id": "r1", "experiment_id": 7}) == (
        "https://ml.example.org/tools/mlflow/#/experiments/7/runs/r1")


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
