"""Operator extra links: from a task to its results in one click.

    train, register_model, evaluate, trials   "MLflow run"          the step's MLflow run
    register_model, evaluate                  "Model version"       the registered version
    train as a PyTorchJob (Kubernetes)        "PyTorchJob"          the job, in a dashboard

Airflow 3 computes a task's links on the worker when the task ends (`get_link`, right after
`execute`), stores each as an XCom under the link's `xcom_key`, and the UI shows that XCom. So
the links sit on the operator classes (`operator_extra_links`), are serialized by name and key,
and need no plugin on the API server. Each link reads the task's own result, its
`return_value` XCom (the step's result JSON): no result, or no id in it (prepare, a failed
step), means no link ("" is shown as no button).

Base URLs come from the worker's environment, never from Airflow Variables:

* `ARF_MLFLOW_UI_URL`: the MLflow UI as a browser reaches it. Unset, `ARF_TRACKING_URI` is used
  when it is an http(s) server (under `arf up`, the embedded http://127.0.0.1:5000); a store
  without a server (sqlite, a file path) has no UI, so no MLflow link.
* `ARF_K8S_JOB_URL`: a URL template for a PyTorchJob with `{namespace}` and `{name}`, e.g. a
  Kubernetes dashboard's or Kubeflow's page of the job; unset, no PyTorchJob link.

Imported at DAG parse time (the operator classes name the links): only the SDK's link class.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink


def mlflow_ui_url() -> str | None:
    """The MLflow UI's base URL, or None when there is no UI to link to."""
    url = (os.environ.get("ARF_MLFLOW_UI_URL") or "").strip()
    if not url:
        tracking = (os.environ.get("ARF_TRACKING_URI") or "").strip()
        url = tracking if tracking.startswith(("http://", "https://")) else ""
    return url.rstrip("/") or None


def _first(result: Any) -> dict[str, Any]:
    """The task's result as one mapping: evaluate returns a list (one per version)."""
    if isinstance(result, list):
        result = result[0] if result else None
    return result if isinstance(result, dict) else {}


def run_url(result: Any) -> str:
    """The MLflow run of a step result: the training run (train; `training_run_id` of
    register) or the evaluation run (evaluate)."""
    base, result = mlflow_ui_url(), _first(result)
    run_id = result.get("mlflow_run_id") or result.get("training_run_id")
    if not base or not run_id:
        return ""
    experiment = result.get("experiment_id")
    # MLflow's UI resolves /runs/<id> to its experiment when the result does not name it.
    path = f"experiments/{quote(str(experiment))}/runs/" if experiment else "runs/"
    return f"{base}/#/{path}{quote(str(run_id))}"


def model_version_url(result: Any) -> str:
    """The registry page of the version a register/evaluate result names."""
    base, result = mlflow_ui_url(), _first(result)
    name, version = result.get("model_name"), result.get("model_version")
    if not base or not name or version in (None, ""):
        return ""
    return f"{base}/#/models/{quote(str(name), safe='')}/versions/{quote(str(version))}"


def pytorchjob_url(result: Any) -> str:
    """The PyTorchJob of a distributed train step's summary (its name and namespace)."""
    template = (os.environ.get("ARF_K8S_JOB_URL") or "").strip()
    result = _first(result)
    if not template or not result.get("name"):
        return ""
    return template.format(namespace=quote(str(result.get("namespace") or ""), safe=""),
                           name=quote(str(result["name"]), safe=""))


def _task_result(ti_key: Any) -> Any:
    from airflow.sdk import BaseXCom

    return BaseXCom.get_value(ti_key=ti_key, key="return_value")


class MlflowRunLink(BaseOperatorLink):
    """The step's MLflow run (training, or evaluation)."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return run_url(_task_result(ti_key))


class ModelVersionLink(BaseOperatorLink):
    """The model version a register or evaluate step names, in the MLflow registry."""

    name = "Model version"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return model_version_url(_task_result(ti_key))


class PyTorchJobLink(BaseOperatorLink):
    """The PyTorchJob of a distributed train step (`ARF_K8S_JOB_URL`)."""

    name = "PyTorchJob"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return pytorchjob_url(_task_result(ti_key))


# What each kind of step operator shows. A step operator runs prepare, train and register alike;
# a link whose id is missing from the result (prepare) shows no button.
STEP_LINKS = (MlflowRunLink(), ModelVersionLink())
JOB_LINKS = (PyTorchJobLink(),)
