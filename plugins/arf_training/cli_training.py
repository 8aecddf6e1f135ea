"""`arf training start | status | logs | list | cancel | templates`: training jobs on a running
Airflow through its REST API v2 (`arf_training.client.TrainingClient`), and the client options
`arf serve grpc` shares. `arf training reproduce` lives in `arf_training.reproduce`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from arf_training.cli_templates import table_lines
from arf_training.errors import ConfError


def client_for(args: argparse.Namespace):
    from arf_training.client import ClientSettings, TrainingClient

    return TrainingClient(ClientSettings.resolve(url=args.url, username=args.username,
                                                 password=args.password, token=args.token,
                                                 config_file=args.config))


def _seconds(text: str) -> float:
    """argparse type: seconds, finite and > 0 (`--timeout nan` would wait forever)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a number of seconds > 0")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: with two, which one the user meant is a
    guess (json keeps the last silently)."""
    from collections import Counter

    twice = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    if twice:
        raise ValueError(f"key(s) {twice} appear more than once in one object")
    return dict(pairs)


def _parse_sets(items: list[str]) -> dict[str, str]:
    sets = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfError(f"--set {item!r} is not KEY=VALUE (e.g. --set epochs=2)")
        sets[key.strip()] = value
    return sets


def _print_job(job, as_json: bool) -> None:
    if as_json:
        print(json.dumps(job.to_dict(), indent=2, default=str))
        return
    print(f"job      {job.job_id}\nstate    {job.state}{' (cancelled)' if job.cancelled else ''}")
    if job.display_name:
        print(f"name     {job.display_name}")
    if job.conf:
        print(f"conf     {json.dumps(job.conf, sort_keys=True)}")
    for task_id, state in job.tasks.items():
        print(f"task     {task_id:16} {state}")
    if job.model_version:
        print(f"model    {job.model_name} version {job.model_version}")


def run(args: argparse.Namespace) -> int:
    """`arf training start|status|logs|list|cancel|templates`: thin over `TrainingClient`."""
    from arf_training.client import EXIT_OK, EXIT_RUN_FAILED

    as_json = args.output == "json"
    client = client_for(args)
    if args.sub == "templates":
        templates = client.templates()
        if as_json:
            print(json.dumps(templates, indent=2))
        for line in [] if as_json else table_lines(
                [[t["name"], "paused" if t["paused"] else "active",
                  " ".join(t["description"].split())] for t in templates]):
            print(line)
        return EXIT_OK
    if args.sub == "start":
        conf = {}
        if args.conf_file:
            try:
                conf = json.loads(Path(args.conf_file).read_text(), object_pairs_hook=_unique)
            except RecursionError:
                raise ConfError(f"--conf-file {args.conf_file} is nested too deeply to read; "
                                'give a JSON object of Params such as {"epochs": 2}') from None
            except (OSError, ValueError) as exc:
                raise ConfError(f"--conf-file {args.conf_file}: {exc}; give a JSON object such "
                                'as {"epochs": 2}') from exc
            if not isinstance(conf, dict):
                raise ConfError(f"--conf-file {args.conf_file} holds a {type(conf).__name__}, "
                                "not a JSON object")
        job = client.start(args.template, sets=_parse_sets(args.set), conf=conf,
                           display_name=args.name or "")
        if not args.wait:
            print(json.dumps(job.to_dict(), default=str) if as_json else job.job_id)
            return EXIT_OK
        log = sys.stderr if as_json else sys.stdout
        print(f"started {job.job_id}", file=log, flush=True)
        job = client.wait(
            job.job_id,
            on_task=lambda t, s: print(f"  {t:16} {s}", file=log, flush=True),
            on_line=lambda t, line: print(f"  {t:16} | {line}", file=log, flush=True),
            timeout_s=args.timeout)
        _print_job(job, as_json)
        return EXIT_OK if job.state == "success" else EXIT_RUN_FAILED
    if args.sub == "status":
        job = client.status(args.job)
        _print_job(job, as_json)
        return EXIT_OK
    if args.sub == "list":
        jobs = client.list(template=args.template, state=args.state, limit=args.limit)
        if as_json:
            print(json.dumps([j.to_dict() for j in jobs], indent=2, default=str))
        for line in [] if as_json else table_lines(
                [[j.job_id, j.state, j.start_date or j.queued_at or ""] for j in jobs]):
            print(line)
        return EXIT_OK
    if args.sub == "cancel":
        job = client.cancel(args.job)
        _print_job(job, as_json)
        return EXIT_OK
    if args.sub == "logs":
        for task_id, line in client.logs(args.job, task=args.task, follow=args.follow):
            if as_json:
                print(json.dumps({"task": task_id, "line": line}), flush=True)
            else:
                print(f"{task_id:16} | {line}", flush=True)
        return EXIT_OK
    raise ConfError(f"unknown training command {args.sub!r}")


def client_options() -> argparse.ArgumentParser:
    """Where the Airflow REST API is and who calls it: shared by `arf training` and `arf serve
    grpc`."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--url", help="Airflow base URL (env ARF_AIRFLOW_URL; default "
                                    "http://127.0.0.1:8080)")
    opts.add_argument("--username", help="Airflow user (env ARF_AIRFLOW_USERNAME)")
    opts.add_argument("--password", help="its password (env ARF_AIRFLOW_PASSWORD; prefer the "
                                         "environment or the config file to a flag)")
    opts.add_argument("--token", help="an Airflow JWT instead of user + password "
                                      "(env ARF_AIRFLOW_TOKEN)")
    opts.add_argument("--config", help="YAML file with url/username/password/token (env "
                                       "ARF_CLIENT_CONFIG; default ~/.config/arf/client.yaml)")
    opts.add_argument("--output", choices=["text", "json"], default="text",
                      help="json: machine-readable output on stdout")
    return opts


def add_parsers(trsub: argparse._SubParsersAction, copts: argparse.ArgumentParser) -> None:
    """Add the REST client's subcommands to `arf training`; `copts` are the client options."""
    start = trsub.add_parser("start", parents=[copts], help="start a training job (a DAG run)")
    start.add_argument("template", help="template name (= DAG id)")
    start.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="a trigger-form Param, e.g. --set epochs=2 (repeatable); checked "
                            "against the template's Params before submitting")
    start.add_argument("--conf-file", help="JSON object of Params; --set values win")
    start.add_argument("--name", help="display name (the DAG run's note)")
    start.add_argument("--wait", action="store_true",
                       help="follow task states and training progress until the job ends; exit "
                            "0 if it succeeded, 1 if it failed")
    start.add_argument("--timeout", type=_seconds, default=None,
                       help="with --wait: give up after this many seconds (exit 1)")
    st = trsub.add_parser("status", parents=[copts], help="state of a job, its tasks and model")
    st.add_argument("job", help="TEMPLATE/RUN_ID")
    lg = trsub.add_parser("logs", parents=[copts], help="task logs of a job")
    lg.add_argument("job", help="TEMPLATE/RUN_ID")
    lg.add_argument("--task", help="only this task (prepare_data, train, register_model)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    ls = trsub.add_parser("list", parents=[copts], help="recent jobs, newest first")
    ls.add_argument("--template", help="only this template")
    ls.add_argument("--state", help="queued|running|success|failed (or PENDING|RUNNING|"
                                    "SUCCEEDED|FAILED)")
    ls.add_argument("--limit", type=int, default=50)
    cn = trsub.add_parser("cancel", parents=[copts], help="stop a queued or running job")
    cn.add_argument("job", help="TEMPLATE/RUN_ID")
    ttpl = trsub.add_parser("templates", help="templates on the running Airflow")
    ttsub = ttpl.add_subparsers(dest="templates_sub", required=True)
    ttsub.add_parser("list", parents=[copts], help="list the training templates (DAGs)")
