"""`arf`: the platform's command line.

    arf templates lint [PATH ...]     validate templates (default: the templates folder)
    arf templates schema [-o FILE]    JSON Schema of the template format, for editors
    arf templates list                the templates and their DAGs
    arf templates render NAME         the Kubernetes manifests of its steps (like helm template)
    arf datahub seed [--force]        create the demo tables in the embedded data hub
    arf datahub ingest TABLE FILE_OR_FOLDER... [--mode append|overwrite] [--partition-by COL]
    arf datahub tables | describe TABLE [--version N]   users' data in the hub (any size)
    arf datahub compact | vacuum | restore TABLE ...     table maintenance
    arf demo [--template T]           seed, run T end to end through Airflow, evaluate
    arf demo failure-loop [--nights N] [--adaptive]   weak champion -> N nightly fine-tunes
                                      (or the template's nightly choice) on corrected field
                                      failures, gated; vs a from-scratch retrain
    arf up [--host H] | arf down      start / stop Airflow + MLflow (+ PostgreSQL) under one
                                      supervisor; loopback only unless --host says otherwise
    arf status                        each component's pid, uptime, restarts, port
    arf airflow ARGS ...              any `airflow` command in the embedded environment
    arf env                           print the embedded environment as shell exports
    arf training reproduce RUN_ID     re-run a training run from its lineage: match (exit 0),
                                      mismatch or not verified (1), unknown run (2)
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

from arf_training import cli_datahub, cli_templates, cli_training
from arf_training.errors import ArfError, ConfError, TemplateError


def _stack(args: argparse.Namespace) -> int:
    """`arf up | down | status`: the supervised embedded stack (`arf_training.stack`)."""
    from arf_training import stack

    if args.command == "down":
        print("stopped: " + (", ".join(stack.down()) or "nothing was running"))
        return 0
    if args.command == "status":
        report = stack.status()
        print(format_status(report))
        return 0 if report["running"] else 3
    opts = stack.StackOptions(api_port=args.port, mlflow_port=args.mlflow_port, host=args.host)
    report = stack.up(opts)
    if report["already_running"]:
        print("the stack is already running; components waiting to restart were restarted now")
    print(format_status(report))
    if report.get("password"):
        print(f"Airflow user '{stack.PUBLIC_USER}', password {report['password']} (shown "
              f"once; kept 0600 in {report['passwords_file']})")
    print(f"Airflow UI  http://{args.host}:{args.port}    MLflow UI  "
          f"http://127.0.0.1:{args.mlflow_port}    status `arf status`, stop `make down`")
    return 0


def _port(free_ok: bool = False):
    """argparse type: a TCP port, 1..65535 (0 too where it means "a free one"): the servers
    would otherwise take 99999 or -5 and listen on it modulo 65536."""
    low = 0 if free_ok else 1

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not low <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a port number from {low} to "
                                             "65535")
        return value
    return parse


def _os_error(exc: OSError) -> str:
    """One line for a file system error: the path, the reason and, under ARF_HOME, the fix."""
    import errno

    from arf_training.settings import default_home

    path = exc.filename or ""
    line = f"{path}: {exc.strerror or exc}" if path else str(exc)
    home = default_home()
    unwritable = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)
    if unwritable and path and (Path(path) == home or home in Path(path).parents):
        line += (f"; ARF_HOME ({home}) must be a folder this user can write: point ARF_HOME "
                 "at one (e.g. export ARF_HOME=$HOME/.arf)")
    return line


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
    cli_datahub.add_parsers(hsub)  # ingest | tables | describe | compact | vacuum | restore
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
    up.add_argument("--port", type=_port(), default=8080, help="Airflow UI/API port")
    up.add_argument("--mlflow-port", type=_port(), default=5000, help="MLflow UI port (loopback)")
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
    copts = cli_training.client_options()
    cli_training.add_parsers(trsub, copts)  # start | status | logs | list | cancel | templates
    serve = sub.add_parser("serve", help="run a network service")
    ssub = serve.add_subparsers(dest="sub", required=True)
    grpc_p = ssub.add_parser("grpc", parents=[copts],
                             help="the gRPC TrainingService (health + reflection enabled)")
    grpc_p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    grpc_p.add_argument("--port", type=_port(free_ok=True), default=50051,
                        help="port (0: a free one)")
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
                raise ConfError(f"--conf is not valid JSON ({exc}): {args.conf[:60]!r}") from exc
            if not isinstance(conf, dict):
                raise ConfError(f"--conf {args.conf[:60]!r} is a JSON {type(conf).__name__}, not "
                                'an object of the template\'s Params; give e.g. \'{"epochs": 5}\'')
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
            return serve(cli_training.client_for(args).settings, host=args.host, port=args.port,
                         allow_anonymous=args.allow_anonymous, tls=tls)
        if args.command == "training" and args.sub != "reproduce":
            return cli_training.run(args)
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
        print(f"arf {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except OSError as exc:  # a file or folder the command needs: name it, and ARF_HOME if it is
        print(f"arf {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except ArfError as exc:
        code = getattr(exc, "exit_code", 1)
        print(f"arf {args.command}: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())


def format_status(report: dict) -> str:
    if report.get("leftovers"):
        return (f"the supervisor is gone, but {', '.join(report['leftovers'])} still run: `arf "
                "down` stops them, `arf up` stops them and starts the stack afresh")
    if not report["running"]:
        return "the stack is not running (start it with `arf up`)"
    lines = [f"supervisor pid {report['supervisor_pid']} ({report['phase']}); logs in "
             f"{report['run_dir']}",
             f"{'component':14} {'state':9} {'pid':>7} {'uptime':>8} {'restarts':>8} {'port':>6}"
             "  last exit"]
    for c in report["components"]:
        uptime = f"{c['uptime_s']}s" if c.get("uptime_s") is not None else "-"
        lines.append(f"{c['name']:14} {c['state']:9} {c['pid'] or '-':>7} {uptime:>8} "
                     f"{c['restarts']:>8} {c['port'] or '-':>6}  {c['last_exit'] or ''}")
    return "\n".join(lines)
