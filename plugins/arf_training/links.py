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
  without a server (sqlite, a file path) has no UI, so no MLflow link. Either way a link
  carries only scheme, host and path: never the user info or query of the address (a tracking
  URI may hold a password or a token, and a link is shown to everyone who sees the task).
* `ARF_K8S_JOB_URL`: a URL template for a PyTorchJob with `{namespace}` and `{name}`, e.g. a
  Kubernetes dashboard's or Kubeflow's page of the job; unset, no PyTorchJob link. A template
  with any other field makes no link and says so in the task log.

Every id taken from a result is one URL path segment (`/` and `:` quoted too) and must be a
string or an integer: a result cannot climb to another page (`../`) or name a scheme.

Imported at DAG parse time (the operator classes name the links): only the SDK's link class.
"""

from __future__ import annotations

import logging
import os
from string import Formatter
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)
WEB = ("http", "https")


def mlflow_ui_url() -> str | None:
    """The MLflow UI's base URL, or None when there is no UI to link to."""
    source, url = "ARF_MLFLOW_UI_URL", (os.environ.get("ARF_MLFLOW_UI_URL") or "").strip()
    if not url:
        tracking = (os.environ.get("ARF_TRACKING_URI") or "").strip()
        source = "ARF_TRACKING_URI"
        url = tracking if tracking.lower().startswith(("http://", "https://")) else ""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        ok = parts.scheme.lower() in WEB and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        ok = False
    if not ok:
        # Without a scheme the link would be relative to Airflow's own UI. The value is not
        # logged: it may hold a password.
        log.warning("%s is not an http(s) address with a host (e.g. "
                    "https://mlflow.example.org): no MLflow links", source)
        return None
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _segment(value: Any) -> str | None:
    """An id from a result as one quoted URL path segment; None unless a non-empty string or
    an integer (a dict or a list would show as its Python repr)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return quote(str(value), safe="")


def _first(result: Any) -> dict[str, Any]:
    """The task's result as one mapping: evaluate returns a list (one per version)."""
    if isinstance(result, list):
        result = result[0] if result else None
    return result if isinstance(result, dict) else {}


def run_url(result: Any) -> str:
    """The MLflow run of a step result: the training run (train; `training_run_id` of
    register) or the evaluation run (evaluate)."""
    base, result = mlflow_ui_url(), _first(result)
    run_id = _segment(result.get("mlflow_run_id") or result.get("training_run_id"))
    if not base or not run_id:
        return ""
    experiment = _segment(result.get("experiment_id"))
    # MLflow's UI resolves /runs/<id> to its experiment when the result does not name it.
    path = f"experiments/{experiment}/runs/" if experiment else "runs/"
    return f"{base}/#/{path}{run_id}"


def model_version_url(result: Any) -> str:
    """The registry page of the version a register/evaluate result names."""
    base, result = mlflow_ui_url(), _first(result)
    name, version = _segment(result.get("model_name")), _segment(result.get("model_version"))
    if not base or not name or not version:
        return ""
    return f"{base}/#/models/{name}/versions/{version}"


def pytorchjob_url(result: Any) -> str:
    """The PyTorchJob of a distributed train step's summary (its name and namespace)."""
    template = (os.environ.get("ARF_K8S_JOB_URL") or "").strip()
    result = _first(result)
    values = {"namespace": _segment(result.get("namespace")), "name": _segment(result.get("name"))}
    if not template or not values["name"]:
        return ""
    try:
        fields = [(f, spec or conversion) for _, f, spec, conversion in
                  Formatter().parse(template) if f is not None]
    except ValueError:  # a lone "{" or "}"
        fields = [("{", None)]
    # Only the two names, bare: str.format would also take positions, attributes
    # ({name.__class__}) and conversions ({name!r}), and raise on any other name.
    bad = [f for f, extra in fields if f not in values or extra]
    if bad:
        log.warning("ARF_K8S_JOB_URL may name only {namespace} and {name}, each bare; it has %s "
                    "(write {{ and }} for a literal brace): no PyTorchJob link", bad)
        return ""
    if any(values[f] is None for f, _ in fields):
        return ""  # a field the result does not hold: a link with an empty segment is broken
    return template.format(**values)


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
