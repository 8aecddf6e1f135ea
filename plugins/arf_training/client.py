"""Training jobs on a running Airflow, over its REST API v2 (`apache-airflow-client`).

The one implementation of "start / inspect / stop training": the `arf training` CLI and the gRPC
`TrainingService` are thin adapters over `TrainingClient`. A *job* is a DAG run; its id is
`<dag_id>/<dag_run_id>` (the template name is the DAG id).

Settings: `client_settings.ClientSettings` (flags, environment, YAML file). Authentication
follows Airflow 3: a JWT from `POST /auth/token` (username + password), a given token, or
`GET /auth/token` when the deployment lets everyone in (`simple_auth_manager_all_admins`).
Credentials never appear in messages or `repr`. The job record is `client_jobs.Job`, the errors
`client_errors`, the input caps `limits`, logs and waiting `client_logs.JobLogs`; all are
importable from here too.

`apache-airflow-client` is imported lazily (it is an extra of the Airflow side); a missing
install is reported with the command that fixes it.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime, timezone
from typing import Any, Callable

from arf_training.client_errors import (EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED,  # noqa: F401
                                        EXIT_UNREACHABLE, AuthFailed, BadInput, ClientError,
                                        Conflict, NotFound, Unreachable, airflow_client)
from arf_training.client_logs import JobLogs
from arf_training.client_jobs import (CANCEL_NOTE, FINISHED, STATUS, Job,  # noqa: F401
                                     split_job_id)
from arf_training.client_settings import (DEFAULT_CONFIG, DEFAULT_URL,  # noqa: F401
                                          ClientSettings, fetch_token, redacted_url)
from arf_training.errors import ConfError
from arf_training.limits import (MAX_DISPLAY_NAME, MAX_LIST_LIMIT, MAX_NAME, MAX_VALUE,
                                 check_length, check_name, quote)

PLATFORM_DAGS = frozenset({"arf_evaluate"})
# The train step's progress lines (arf_trainer.trainer.run._epoch_line).


def _checked_sizes(values: dict[str, Any] | None) -> dict[str, Any]:
    """`--set` / conf names and text values within their caps (`limits`), or `BadInput`."""
    for key, value in (values or {}).items():
        check_length("hyperparameter name", str(key), MAX_NAME)
        if isinstance(value, str):
            check_length(key, value, MAX_VALUE)
    return values or {}


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


class TrainingClient(JobLogs):
    """Start, inspect and stop training jobs on one Airflow deployment."""

    def __init__(self, settings: ClientSettings | None = None):
        self.settings = settings or ClientSettings.resolve()
        self._api_client = None

    # -- plumbing ------------------------------------------------------------------------------

    def _api(self):
        if self._api_client is None:
            ac = airflow_client()
            config = ac.Configuration(host=self.settings.url,
                                      access_token=fetch_token(self.settings))
            config.retries = False
            client = ac.ApiClient(config)
            call_api, timeout = client.call_api, self.settings.timeout_s

            # The generated API waits forever unless each call passes a timeout: a hung Airflow
            # would hang the CLI and hold a gRPC worker thread for good.
            def call_api_with_timeout(*args, _request_timeout=None, **kwargs):
                return call_api(*args, _request_timeout=_request_timeout or timeout, **kwargs)

            client.call_api = call_api_with_timeout
            self._api_client = client
        return self._api_client

    def _call(self, fn: Callable[[], Any], *, what: str, not_found: str | None = None) -> Any:
        """Run one REST call and translate its failure into a `ClientError` subclass."""
        import urllib3

        ac = airflow_client()
        try:
            try:
                return fn()
            except ac.ApiException as exc:
                # A JWT we fetched ourselves has expired (long-lived clients such as the gRPC
                # server): fetch a new one once. A token given to us is the caller's business.
                if exc.status in (401, 403) and not self.settings.token and self._api_client:
                    self._api_client = None
                    return fn()
                raise
        except ac.ApiException as exc:
            detail, url = _detail(exc.body), redacted_url(self.settings.url)
            if exc.status == 404 and not_found:
                raise NotFound(not_found) from exc
            if exc.status in (401, 403):
                raise AuthFailed(f"{what}: Airflow refused access (HTTP {exc.status}: {detail}); "
                                 "check the credentials and the user's role",
                                 field="credentials") from exc
            if exc.status is not None and exc.status >= 500:
                raise Unreachable(f"{what}: Airflow at {url} failed with HTTP {exc.status}: "
                                  f"{detail}") from exc
            raise BadInput(f"{what}: HTTP {exc.status}: {detail}") from exc
        except urllib3.exceptions.HTTPError as exc:
            url = redacted_url(self.settings.url)
            raise Unreachable(f"{what}: Airflow at {url} is unreachable ({type(exc).__name__}); "
                              "start it or check --url") from exc

    def _dag_runs(self):
        return airflow_client().DagRunApi(self._api())

    # -- templates -----------------------------------------------------------------------------

    def templates(self) -> list[dict[str, Any]]:
        """The training templates Airflow knows (DAGs tagged `arf`, minus platform DAGs)."""
        ac = airflow_client()
        dags = self._call(lambda: ac.DAGApi(self._api()).get_dags(tags=["arf"], limit=1000),
                          what="listing templates")
        return [{"name": d.dag_id, "description": d.description or "",
                 "paused": bool(d.is_paused)}
                for d in dags.dags if d.dag_id not in PLATFORM_DAGS]

    def param_schemas(self, template: str) -> dict[str, dict[str, Any]]:
        """The template's Params as the running deployment has them (the trigger form's fields)."""
        from arf_training.params import schemas_from_airflow

        ac = airflow_client()
        check_name("template", template)
        if template in PLATFORM_DAGS:
            raise NotFound(f"{template!r} is a platform DAG, not a training template",
                           field="template")
        try:
            details = self._call(lambda: ac.DAGApi(self._api()).get_dag_details(template),
                                 what=f"reading template {template!r}", not_found="unknown")
        except NotFound as exc:  # listing the known ones costs a call: only when needed
            raise NotFound(self._unknown_template(template), field="template") from exc
        if "arf" not in {getattr(tag, "name", tag) for tag in details.tags or []}:
            # Another team's DAG on the same Airflow: not ours to start or cancel.
            raise NotFound(f"{self._unknown_template(template)}; {template!r} is a DAG without "
                           "the 'arf' tag, not a training template", field="template")
        return schemas_from_airflow(details.params or {})

    def _unknown_template(self, template: str) -> str:
        try:
            names = sorted(t["name"] for t in self.templates())
            more = f" and {len(names) - 20} more" if len(names) > 20 else ""  # a short message
            known = (", ".join(names[:20]) + more) or "none"
        except ClientError:
            known = "(could not list them)"
        return (f"unknown template {quote(template)}; templates on this Airflow: {known} "
                "(`arf training templates list`)")

    # -- jobs ----------------------------------------------------------------------------------

    def build_conf(self, template: str, sets: dict[str, str] | None = None,
                   conf: dict[str, Any] | None = None,
                   schemas: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The trigger conf from `--set` strings and a conf dict, checked against the template's
        Params before anything is submitted (raises `ConfError`)."""
        from arf_training.params import check_conf, parse_value

        schemas = self.param_schemas(template) if schemas is None else schemas
        merged = dict(_checked_sizes(conf))
        for key, text in _checked_sizes(sets).items():
            merged[key] = parse_value(key, text, schemas.get(key))
        check_conf(template, schemas, merged)
        return merged

    def start(self, template: str, *, sets: dict[str, str] | None = None,
              conf: dict[str, Any] | None = None, display_name: str = "",
              dataset_query: str | None = None) -> Job:
        """Validate the conf, then create a DAG run. Only the keys given are sent (the DAG's
        Params fill in the rest, so a later template default change applies)."""
        ac = airflow_client()
        check_name("template", template)
        check_length("display_name", display_name, MAX_DISPLAY_NAME)
        check_length("dataset_query", dataset_query, MAX_VALUE)
        _checked_sizes(sets)  # all sizes before the first HTTP call
        _checked_sizes(conf)
        schemas = self.param_schemas(template)
        if dataset_query:
            if "dataset_query" not in schemas:
                raise BadInput(f"dataset_query: template {template!r} does not allow a query "
                               "override (its dataset.allow_query_override is false); leave it "
                               "empty or use a template that allows it", field="dataset_query")
            conf = {**(conf or {}), "dataset_query": dataset_query}
        try:
            merged = self.build_conf(template, sets, conf, schemas=schemas)
        except ConfError as exc:
            raise BadInput(str(exc), field=_first_param(str(exc))) from exc
        run_id = f"arf__{datetime.now(timezone.utc):%Y%m%dT%H%M%S}_{secrets.token_hex(3)}"
        body = ac.TriggerDAGRunPostBody(dag_run_id=run_id, conf=merged, logical_date=None,
                                        note=display_name or None)
        run = self._call(lambda: self._dag_runs().trigger_dag_run(template, body),
                         what=f"starting {template!r}",
                         not_found=f"unknown template {template!r}")
        return self._job(run)

    def _job(self, run: Any) -> Job:
        state = getattr(run.state, "value", run.state)
        note = run.note or ""
        name = note[:-len(CANCEL_NOTE)].rstrip(" -") if note.endswith(CANCEL_NOTE) else note
        return Job(template=run.dag_id, run_id=run.dag_run_id, state=str(state),
                   display_name=name, note=note, conf=dict(run.conf or {}),
                   queued_at=_iso(run.queued_at), start_date=_iso(run.start_date),
                   end_date=_iso(run.end_date))

    def status(self, job_id: str, *, tasks: bool = True) -> Job:
        template, run_id = split_job_id(job_id)
        run = self._call(lambda: self._dag_runs().get_dag_run(template, run_id),
                         what=f"reading job {job_id}",
                         not_found=f"no job {job_id!r} (template {template!r}, run {run_id!r}); "
                                   "list jobs with `arf training list`")
        job = self._job(run)
        if tasks:
            job.tasks = self.task_states(template, run_id)
            if job.state == "success":
                self._add_model_version(job)
        return job

    def task_states(self, template: str, run_id: str) -> dict[str, str]:
        ac = airflow_client()
        tis = self._call(lambda: ac.TaskInstanceApi(self._api()).get_task_instances(
            template, run_id), what=f"reading the tasks of {template}/{run_id}")
        return {ti.task_id: str(getattr(ti.state, "value", ti.state) or "none")
                for ti in tis.task_instances}

    def _add_model_version(self, job: Job) -> None:
        ac = airflow_client()
        try:
            entry = self._call(lambda: ac.XComApi(self._api()).get_xcom_entry(
                job.template, "register_model", job.run_id, "return_value"),
                what="reading the registered model", not_found="no register_model result")
        except ClientError:
            return
        value = getattr(getattr(entry, "actual_instance", entry), "value", None)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return
        if isinstance(value, dict):
            job.model_name = value.get("model_name")
            job.model_version = str(value["model_version"]) if "model_version" in value else None

    def list(self, *, template: str | None = None, state: str | None = None,
             limit: int = 50) -> list[Job]:
        """Recent jobs, newest first, of one template or of all templates."""
        check_name("template", template)
        if type(limit) is not int or not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadInput(f"limit {quote(limit)} is out of range; give a whole number from 1 to "
                           f"{MAX_LIST_LIMIT} (--limit, or ListTrainingJobs' limit: 0 means 50)",
                           field="limit")
        if state and state not in STATUS and state.upper() not in STATUS.values():
            raise BadInput(f"--state {quote(state)} is not a state; use one of "
                           f"{', '.join(STATUS)} (or {', '.join(STATUS.values())})",
                           field="state")
        airflow_state = next((k for k, v in STATUS.items() if v == (state or "").upper()),
                             state)
        dag = template or "~"  # `~` = every DAG
        runs = self._call(lambda: self._dag_runs().get_dag_runs(
            dag, limit=limit, order_by=["-run_after"],
            state=[airflow_state] if airflow_state else None),
            what="listing jobs", not_found=f"unknown template {template!r}")
        return [self._job(r) for r in runs.dag_runs if r.dag_id not in PLATFORM_DAGS]

    def cancel(self, job_id: str) -> Job:
        """Mark a queued or running job failed (Airflow stops its running tasks)."""
        ac = airflow_client()
        self.param_schemas(split_job_id(job_id)[0])  # a training template's run, or NotFound
        job = self.status(job_id, tasks=False)
        if job.state in FINISHED:
            raise Conflict(f"job {job_id} already finished ({job.state}); nothing to cancel",
                           field="job_id")
        note = f"{job.display_name} - {CANCEL_NOTE}" if job.display_name else CANCEL_NOTE
        body = ac.DAGRunPatchBody(state=ac.DagRunMutableStates.FAILED, note=note)
        run = self._call(lambda: self._dag_runs().patch_dag_run(job.template, job.run_id, body),
                         what=f"cancelling {job_id}", not_found=f"no job {job_id!r}")
        return self._job(run)


def _detail(body: Any) -> str:
    try:
        data = json.loads(body)
        text = str(data.get("detail", data)) if isinstance(data, dict) else str(data)
    except (TypeError, ValueError):
        text = str(body)
    # Airflow's detail may echo what was sent (a long name, a whole conf): keep a prefix.
    return text if len(text) <= 300 else text[:300] + "..."


def _first_param(message: str) -> str:
    """The Param a `ConfError` message is about (its first problem), for INVALID_ARGUMENT."""
    for line in message.splitlines():
        found = re.match(r"\s*(?:- )?(?:unknown parameter )?'?([^'=\s;]+)'?"
                         r"(?:=| =| must|;)", line)
        if found:
            return found.group(1)
    return ""
