"""Thin MLflow helpers shared by the train and register steps.

One MLflow experiment per template (named after ``metadata.name``) and one MLflow run per
Airflow DAG run, found again by the tag ``arf.dag_run = "<dag_id>/<run_id>"`` so that an Airflow
retry continues the same run instead of creating a second one.

MLflow is imported inside the functions: importing it takes seconds, which the other steps
(and `arf-trainer --help`) should not pay.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from arf_trainer.errors import RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DAG_RUN_TAG = "arf.dag_run"
# Which DagRun of the run id (arf_trainer.dag_run_dir): a run deleted and triggered again under
# its id has another run_after, and must not continue the deleted one's MLflow run.
RUN_AFTER_TAG = "arf.dag_run_after"
PARENT_RUN_TAG = "mlflow.parentRunId"

# A training job must not phone home. MLflow reads this when it is first imported, so it is set
# when this module is imported (before any step imports mlflow); users can still opt in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text (and hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def dag_run_tags(run: Any) -> dict[str, str]:
    """The tags naming the DagRun of `run` (a job spec's `RunIdentity`)."""
    tags = {"arf.dag_id": run.dag_id, "arf.dag_run_id": run.run_id}
    if getattr(run, "run_after", None):
        tags[RUN_AFTER_TAG] = run.run_after
    return tags


def dag_run_key(dag_id: str, run_id: str) -> str:
    return f"{dag_id}/{run_id}"


def shown_uri(uri: str) -> str:
    """`uri` as messages (task logs) show it: without its user info or query. The embedded
    stack's store URI carries the database password (`postgresql+psycopg://arf:...@/mlflow`)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:  # not a URL at all: its scheme only
        return uri.split(":", 1)[0] + ":..."
    if "@" not in parts.netloc and not parts.query:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, ("***@" if "@" in parts.netloc else "") + host,
                       parts.path, "", ""))


_SECRETS: set[str] = set()  # passwords of the tracking URIs `configure` was given


def hide_secrets(text: str) -> str:
    """`text` without the password of any tracking URI this process was pointed at (through
    `configure`, ARF_TRACKING_URI or MLFLOW_TRACKING_URI): MLflow's own messages quote the
    URL they called, credentials included."""
    from urllib.parse import quote, urlsplit

    secrets = set(_SECRETS)
    for name in ("ARF_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        try:
            secrets.add(urlsplit(os.environ.get(name, "")).password or "")
        except ValueError:
            pass
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


@contextmanager
def mlflow_errors(tracking_uri: str, what: str) -> Iterator[None]:
    """Turn MLflow's exceptions into a `RegistryError` that says what we were doing, and where."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"MLflow at {shown_uri(tracking_uri)} failed to {what}: "
                            f"{hide_secrets(exc.message)}") from exc


def configure(tracking_uri: str) -> "MlflowClient":
    """Point MLflow (tracking and registry) at `tracking_uri` and return a client for it."""
    import mlflow
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(tracking_uri).password
    except ValueError:
        password = None
    if password:
        _SECRETS.update({password, unquote(password)})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_or_create_experiment(client: "MlflowClient", name: str, artifact_root: str | None) -> str:
    """The experiment `name`, created with artifacts under ``<artifact_root>/<name>`` if new.

    Without an artifact root MLflow would default to ``./mlruns`` of the working directory,
    which differs between the local backend and a pod.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another run of the same template created it between our get and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RegistryError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted; restore it "
            "(mlflow experiments restore) or delete it permanently, then retry the task"
        )
    return experiment.experiment_id


def find_run_by_tag(client: "MlflowClient", experiment_id: str, key: str, value: str) -> str | None:
    """The id of the oldest active run in the experiment with tag `key` = `value`, if any."""
    if "'" in value:
        raise RegistryError(f"tag value {value!r} for {key} contains a quote; MLflow search "
                            "filters cannot match it: use dag and run ids without quotes")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


def find_own_run(client: "MlflowClient", experiment_id: str, key: str,
                 run_after: str | None) -> str | None:
    """The oldest run with the key `key` that this DagRun (`run_after`) may continue.

    A run keyed so by another DagRun of the run id (deleted, then triggered again) is retired:
    its key becomes ``<key> (DagRun <its run_after>)``, where it stays with all it recorded,
    and the search goes on. A run without `RUN_AFTER_TAG` predates it and is adopted.
    """
    while True:
        found = find_run_by_tag(client, experiment_id, DAG_RUN_TAG, key)
        if found is None or not run_after:
            return found
        theirs = client.get_run(found).data.tags.get(RUN_AFTER_TAG)
        if theirs is None:
            client.set_tag(found, RUN_AFTER_TAG, run_after)
            return found
        if theirs == run_after:
            return found
        client.set_tag(found, DAG_RUN_TAG, f"{key} (DagRun {theirs})")


def find_or_create_run(client: "MlflowClient", experiment_id: str, dag_id: str, run_id: str,
                       tags: dict[str, str], start_time: int | None = None,
                       key: str | None = None, parent_key: str | None = None
                       ) -> tuple[str, bool]:
    """The MLflow run of this DAG run: (run id, True if it already existed, e.g. on retry).

    `start_time` (ms since the epoch) dates a run created after the fact, e.g. by the tracking
    spool once MLflow is reachable again; None means now. `key` replaces the DAG-run key (a
    trial of a study has its own run, ``<dag_id>/<run_id>/trial-<n>``); `parent_key` nests the
    new run under the run with that key (the study's parent run), created if needed.
    """
    key = key or dag_run_key(dag_id, run_id)
    run_after = tags.get(RUN_AFTER_TAG)
    existing = find_own_run(client, experiment_id, key, run_after)
    if existing is not None:
        return existing, True
    tags = {**tags, DAG_RUN_TAG: key}
    if parent_key:
        tags[PARENT_RUN_TAG] = find_or_create_parent_run(
            client, experiment_id, parent_key,
            {"arf.dag_id": dag_id, "arf.dag_run_id": run_id, "arf.hpo.study": parent_key,
             **({RUN_AFTER_TAG: run_after} if run_after else {})})
    mine = client.create_run(experiment_id, start_time=start_time, run_name=key,
                             tags=tags).info.run_id
    # Two processes may both have found none and created one: all settle on the oldest.
    oldest = find_run_by_tag(client, experiment_id, DAG_RUN_TAG, key)
    if oldest is not None and oldest != mine:
        client.delete_run(mine)
        return oldest, True
    return mine, False


def find_or_create_parent_run(client: "MlflowClient", experiment_id: str, key: str,
                              tags: dict[str, str]) -> str:
    """The run with tag arf.dag_run = `key`, created if missing (a study's parent run).

    Trials running side by side may both create it: each then settles on the oldest run with
    the key and deletes its own duplicate, so every trial nests under the same parent.
    """
    existing = find_own_run(client, experiment_id, key, tags.get(RUN_AFTER_TAG))
    if existing is not None:
        return existing
    mine = client.create_run(experiment_id, run_name=key,
                             tags={**tags, DAG_RUN_TAG: key}).info.run_id
    oldest = find_run_by_tag(client, experiment_id, DAG_RUN_TAG, key)
    if oldest is not None and oldest != mine:
        client.delete_run(mine)
        return oldest
    return mine
