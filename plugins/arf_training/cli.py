"""`arf`: the platform's command line.

    arf templates lint [PATH ...]     validate templates (default: the templates folder)
    arf templates schema [-o FILE]    JSON Schema of the template format, for editors
    arf templates list                the templates and their DAGs
    arf templates render NAME         the Kubernetes manifests of its steps (like helm template)
    arf datahub seed [--force]        create the demo tables in the embedded data hub
    arf datahub ingest TABLE FILE_OR_FOLDER... [--mode append|overwrite] [--partition-by COL]
    arf datahub tables | describe TABLE [--version N]   users' data in the hub (any size)
    arf demo [--template T]           seed, run T end to end through Airflow, evaluate
    arf demo failure-loop [--nights N] [--adaptive]   weak champion -> N nightly fine-tunes
                                      (or the template's nightly choice) on corrected field
                                      failures, gated; vs a from-scratch retrain
    arf up [--host H] | arf down      start / stop Airflow + MLflow (+ PostgreSQL) under one
                                      supervisor; loopback only unless --host says otherwise
    arf status                        each component's pid, uptime, restarts, port
    arf airflow ARGS ...              any `airflow` command in the embedded environment
    arf env                           print the embedded environment as shell exports
    arf training reproduce RUN_ID     re-run a training run from its lineage; match/mismatch
    arf training start TEMPLATE [--set k=v ...] [--conf-file f.json] [--wait]
    arf training status JOB | logs JOB [--follow] [--task T] | cancel JOB
    arf training list [--template T] [--state S] | arf training templates list
                                      training jobs on a running Airflow (REST API v2);
                                      JOB = TEMPLATE/RUN_ID; --output json for scripts
    arf serve grpc [--port P]         the gRPC TrainingService (arf.cloud.v1) over the same client

Exit codes: 0 success, 1 the work (or the training run) failed, 2 bad input (template, argument,
conf value, unknown job, rejected credentials), 3 Airflow unreachable.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from arf_training import cli_datahub, cli_templates
from arf_training.cli_templates import table_lines
from arf_training.errors import ArfError, ConfError, TemplateError


def _client(args: argparse.Namespace):
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


def _training(args: argparse.Namespace) -> int:
    """`arf training start|status|logs|list|cancel|templates`: thin over `TrainingClient`."""
    from arf_training.client import EXIT_OK, EXIT_RUN_FAILED

    as_json = args.output == "json"
    client = _client(args)
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


def _stack(args: argparse.Namespace) -> int:
    """`arf up | down | status`: the supervised embedded stack (`arf_training.stack`)."""
    from arf_training import stack

    if args.command == "down":
        print("stopped: " + (", ".join(stack.down()) or "nothing was running"))
        return 0
    if args.command == "status":
        report = stack.status()
        print(stack.format_status(report))
        return 0 if report["running"] else 3
    opts = stack.StackOptions(api_port=args.port, mlflow_port=args.mlflow_port, host=args.host)
    report = stack.up(opts)
    if report["already_running"]:
        print("the stack is already running; components waiting to restart were restarted now")
    print(stack.format_status(report))
    if report.get("password"):
        print(f"Airflow user '{stack.PUBLIC_USER}', password {report['password']} (shown "
              f"once; kept 0600 in {report['passwords_file']})")
    print(f"Airflow UI  http://{args.host}:{args.port}    MLflow UI  "
          f"http://127.0.0.1:{args.mlflow_port}    status `arf status`, stop `make down`")
    return 0


def _client_options() -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    templates = sub.add_parser("templates", help="validate and inspect training templates")
    cli_templates.add_parsers(templates.add_subparsers(dest="sub", required=True))
    hub = sub.add_parser("datahub", help="the embedded data hub")
    hsub = hub.add_subparsers(dest="sub", required=True)
    seed = hsub.add_parser("seed", help="create the demo tables (idempotent)")
    seed.add_argument("--force", action="store_true", help="write new versions even if seeded")
    seed.add_argument("--episodes", type=int, default=200, help="expert reach episodes")
    seed.add_argument("--pixels", action="store_true", help="also reach_pixels: the same "
                      "episodes as camera frames, for reach_pixels_bc (slow: a few ms a frame)")
    seed.add_argument("--frame-size", type=int, default=64,
                      help="reach_pixels frame width and height in pixels (default 64)")
    seed.add_argument("--collected-at", help="collected_at to record, ISO 8601 with a zone "
                      "(default: a fixed 2026-01-01T00:00:00+00:00: the same rows on any machine)")
    cli_datahub.add_parsers(hsub)  # ingest | tables | describe
    demo = sub.add_parser("demo", help="run a template end to end on the embedded default; "
                          "`arf demo failure-loop` runs the measured failure-learning loop")
    demo.add_argument("what", nargs="?", choices=["failure-loop"],
                      help="failure-loop: weak champion -> nightly field failures, corrections, "
                      "fine-tunes and gate, vs a from-scratch retrain (in a home of its own)")
    demo.add_argument("--template", default="reach_bc", help="template name (default reach_bc)")
    demo.add_argument("--conf", default="{}", help="trigger conf as JSON, e.g. '{\"epochs\": 5}' "
                      "(failure-loop: the nightly fine-tune's)")
    demo.add_argument("--nights", type=int, default=4, help="failure-loop: nightly iterations")
    demo.add_argument("--demos", type=int, default=50,
                      help="failure-loop: expert episodes the weak champion learns from")
    demo.add_argument("--field-episodes", type=int, default=150,
                      help="failure-loop: field rollouts of the champion per night")
    demo.add_argument("--seed", type=int, default=0,
                      help="failure-loop: seed of the demonstrations and the field episodes")
    demo.add_argument("--adaptive", action="store_true",
                      help="failure-loop: each night's recipe chosen by the DAG's choose_recipe "
                      "task (the template's nightly: rule, as on the schedule); default: every "
                      "night fine-tunes")
    demo.add_argument("-v", "--verbose", action="store_true", help="show the full Airflow output")
    up = sub.add_parser("up", help="start Airflow (api-server, scheduler, dag-processor, "
                                   "triggerer), MLflow and the database under one supervisor "
                                   "(restarts what exits); repairs a running stack")
    up.add_argument("--port", type=int, default=8080, help="Airflow UI/API port")
    up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (loopback)")
    up.add_argument("--host", default="127.0.0.1",
                    help="address of the Airflow UI/API (default 127.0.0.1: this machine only, "
                         "every user an admin); any other (e.g. 0.0.0.0) turns on real users: "
                         "an 'admin' with a generated password, printed once")
    sub.add_parser("down", help="stop what `arf up` started")
    sub.add_parser("status", help="the components of `arf up`: pid, uptime, restarts, port")
    af = sub.add_parser("airflow", help="run an airflow command in the embedded environment")
    af.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("env", help="print the embedded environment as shell exports")
    training = sub.add_parser("training", help="training runs")
    trsub = training.add_subparsers(dest="sub", required=True)
    rep = trsub.add_parser("reproduce", help="re-run a training run from its recorded lineage "
                                             "and compare data fingerprint and weights sha256")
    rep.add_argument("run_id", help="MLflow run id of the training run (model version tag "
                                    "arf.training_run_id)")
    rep.add_argument("--output", choices=["text", "json"], default="text")
    copts = _client_options()
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
    serve = sub.add_parser("serve", help="run a network service")
    ssub = serve.add_subparsers(dest="sub", required=True)
    grpc_p = ssub.add_parser("grpc", parents=[copts],
                             help="the gRPC TrainingService (health + reflection enabled)")
    grpc_p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    grpc_p.add_argument("--port", type=int, default=50051, help="port (0: a free one)")
    grpc_p.add_argument("--allow-anonymous", action="store_true",
                        help="serve calls without `authorization: Bearer <JWT>` metadata with "
                             "this server's Airflow credentials even off loopback (warned about; "
                             "on loopback they are always served)")
    grpc_p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    grpc_p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    grpc_p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates "
                                                "signed by it (mutual TLS)")
    args = parser.parse_args(argv)

    try:
        if args.command == "templates":
            return cli_templates.run(args)
        if args.command == "datahub" and args.sub in cli_datahub.COMMANDS:
            return cli_datahub.run(args)
        if args.command == "datahub":
            import subprocess

            from arf_training.embedded import environment
            from arf_training.settings import ArfSettings, venv_bin

            settings = ArfSettings.from_env()
            cmd = [venv_bin("arf-trainer"), "datahub", "seed", "--hub", settings.datahub_uri,
                   "--episodes", str(args.episodes)] + (["--force"] if args.force else [])
            if args.pixels:
                cmd += ["--pixels", "--frame-size", str(args.frame_size)]
            if args.collected_at:
                cmd += ["--collected-at", args.collected_at]
            return subprocess.run(cmd, env=environment(settings)).returncode
        if args.command == "demo":
            try:
                conf = json.loads(args.conf)
            except json.JSONDecodeError as exc:
                raise ConfError(f"--conf is not valid JSON ({exc}): {args.conf!r}") from exc
            if args.what == "failure-loop":
                from arf_training.failure_loop import LoopConfig, run_failure_loop

                run_failure_loop(LoopConfig(nights=args.nights, demos=args.demos,
                                            field_episodes=args.field_episodes,
                                            seed=args.seed, adaptive=args.adaptive,
                                            finetune_conf=conf),
                                 verbose=args.verbose)
                return 0
            from arf_training.demo import run_demo

            run_demo(args.template, conf, verbose=args.verbose)
            return 0
        if args.command in ("up", "down", "status"):
            return _stack(args)
        if args.command == "serve":
            from arf_training.grpc_service.security import TlsFiles
            from arf_training.grpc_service.server import serve

            tls = TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
            return serve(_client(args).settings, host=args.host, port=args.port,
                         allow_anonymous=args.allow_anonymous, tls=tls)
        if args.command == "training" and args.sub != "reproduce":
            return _training(args)
        if args.command == "training":
            from arf_training.embedded import environment
            from arf_training.reproduce import main as reproduce_main

            import os

            os.environ.update({k: v for k, v in environment().items() if k.startswith("ARF_")})
            return reproduce_main(args.run_id, as_json=args.output == "json")
        if args.command == "airflow":
            from arf_training.embedded import airflow, ensure_migrated, environment

            env = environment()
            if args.args[:1] != ["db"]:  # a fresh ARF_HOME: migrate on first use
                ensure_migrated(env)
            return airflow(args.args, env=env, check=False).returncode
        from arf_training.embedded import environment

        keys = sorted(k for k in environment() if k.startswith(("AIRFLOW", "ARF_", "MLFLOW")))
        env = environment()
        for key in keys:
            print(f"export {key}={shlex.quote(env[key])}")
        return 0
    except (TemplateError, ConfError) as exc:
        print(f"arf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except ArfError as exc:
        code = getattr(exc, "exit_code", 1)
        print(f"arf {args.command}: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
