"""`arf demo`: seed the embedded data hub, run a template end to end through Airflow, evaluate.

The training DAG runs with `airflow dags test` (the real DAG, operators and steps, without a
scheduler). Its `register_model` task emits the Asset event; the demo reads that event from the
Airflow metadata DB and runs `arf_evaluate` with the event's payload, which is what the scheduler
does when it sees the event (`make up` runs that path for real).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from arf_training.embedded import environment, migrate
from arf_training.errors import ArfError, ConfError
from arf_training.factory import EVALUATE_DAG_ID
from arf_training.settings import ArfSettings, venv_bin
from arf_training.stepspec import workspace_for


def seed_datahub(settings: ArfSettings, env: dict[str, str],
                 pixels: bool = False) -> dict[str, Any]:
    """Seed the demo tables; with `pixels` also reach_pixels (rendered frames: slow, so only
    for a template that reads it)."""
    proc = subprocess.run([venv_bin("arf-trainer"), "datahub", "seed",
                           "--hub", settings.datahub_uri] + (["--pixels"] if pixels else []),
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArfError(f"seeding the data hub failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def latest_run(dag_id: str, newer_than: int | None = None) -> Any:
    """The newest DagRun of `dag_id`; with `newer_than` (a DagRun id), only a run created after
    it counts, so that a command that made no run is never reported with an older one."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)
                              .order_by(DagRun.id.desc()).limit(1)).first()
        if run is None or (newer_than is not None and run.id <= newer_than):
            raise ArfError(f"no run of {dag_id!r} was recorded; see the output above")
        session.expunge(run)
        return run


def _latest_run_id(dag_id: str) -> int:
    """The id of the newest DagRun of `dag_id`, 0 if there is none."""
    try:
        return latest_run(dag_id).id
    except ArfError:
        return 0


def _asset_event(source_dag: str, source_run: str) -> dict[str, Any]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        event = session.scalars(select(AssetEvent).where(
            AssetEvent.source_dag_id == source_dag, AssetEvent.source_run_id == source_run)
            .order_by(AssetEvent.id.desc()).limit(1)).first()
        if event is None:
            raise ArfError(f"{source_dag}/{source_run} emitted no Asset event; was register_model "
                           "successful?")
        return {"id": event.id, "uri": event.asset.uri, "extra": dict(event.extra or {})}


def task_states(dag_id: str, run_id: str) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(TaskInstance.task_id, TaskInstance.state).where(
            TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)).all()
        return {task: str(state) for task, state in rows}


def _dags_test(dag_id: str, conf: dict[str, Any], env: dict[str, str], log_path: Path,
               verbose: bool, logical_date: str | None = None) -> tuple[Any, float]:
    start = time.monotonic()
    before = _latest_run_id(dag_id)
    args = ["dags", "test", dag_id, *([logical_date] if logical_date else []),
            "-c", json.dumps(conf)]
    with open(log_path, "a") as log:
        log.write(f"\n$ airflow {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen([venv_bin("airflow"), *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                shown = line.rstrip() if verbose else demo_line(line)
                if shown is not None:
                    print(shown, flush=True)
            proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C: stop the run here rather than leave `airflow dags test` training on,
            # unseen, with nobody reading its output.
            _stop(proc, log)
            raise
    if proc.returncode != 0 and _latest_run_id(dag_id) == before:
        raise ArfError(f"`airflow dags test {dag_id}` exited {proc.returncode} before it "
                       f"started a run; full log: {log_path}")
    run = latest_run(dag_id, newer_than=before)
    if proc.returncode != 0 or str(run.state) != "success":
        raise ArfError(f"{dag_id} run {run.run_id} ended {run.state} (exit {proc.returncode}); "
                       f"full log: {log_path}")
    return run, time.monotonic() - start


def _stop(proc: subprocess.Popen, log: Any, grace_s: float = 30.0) -> None:
    """SIGTERM `proc` (Airflow then stops its task's step), SIGKILL after `grace_s`; its last
    output goes to the log."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    log.write(out or "")
    log.write(f"\n[arf demo] interrupted (Ctrl-C): airflow stopped, exit {proc.returncode}\n")


# One log record as `airflow dags test` prints it: "<ISO time>Z [<level>  ] <event> [<logger>]
# key=value ...". The demo keeps the time of day, a level other than info, and the event.
_AIRFLOW_RECORD = re.compile(r"\d{4}-\d\d-\d\dT(?P<time>\d\d:\d\d:\d\d)\S* "
                             r"\[(?P<level>[a-z]+) *\] (?P<event>.*?)"
                             r"(?: \[[\w.]+\])?(?: [\w.]+=\S*)*")
# What a new user follows of a run: each step's start and every line of the trainer's own log
# (data, setup, one progress line per epoch as `arf training start --wait` shows, registration,
# evaluation, promotion gate), and any error.
_SHOWN = re.compile(r"^step \w+:|^arf_trainer\.|epoch \d+/\d+ \| step \d+/\d+|registered"
                    r"|evaluate:|success rate|ERROR|Error|Traceback|failed")


def demo_line(line: str) -> str | None:
    """The demo's console line for one line of `airflow dags test` output, or None to show
    only in the full log. Never cut: a step's line is shown whole, with one timestamp."""
    line = line.rstrip()
    record = _AIRFLOW_RECORD.fullmatch(line)
    if record is None:  # a traceback's lines, a plain print
        return line if _SHOWN.search(line) else None
    event = record["event"]
    if not _SHOWN.search(event):
        return None
    level = "" if record["level"] == "info" else f" {record['level'].upper()}"
    return f"  {record['time']}{level} {event}"


def run_demo(template: str = "reach_bc", conf: dict[str, Any] | None = None,
             verbose: bool = False) -> dict[str, Any]:
    from arf_training.params import resolve_conf

    # Template and conf first: a typo must fail here, before the hub, database and Airflow.
    spec = _template(template)
    resolve_conf(spec, conf)
    settings = ArfSettings.from_env()
    env = environment(settings)
    os.environ.update(env)  # this process reads the Airflow DB below
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    t0 = time.monotonic()

    if spec.federated is not None:
        seeded = seed_site_hubs(settings, env, spec)
    else:
        print(f"[arf demo] data hub: {settings.datahub_uri}", flush=True)
        seeded = seed_datahub(settings, env, pixels=reads_pixels(spec))
    print(f"[arf demo] Airflow metadata DB: "
          f"{shown_uri(env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN'])}", flush=True)
    migrate(env)
    print(f"[arf demo] running DAG {template!r} with `airflow dags test` (log: {log_path})",
          flush=True)
    run, train_s = _dags_test(template, conf or {}, env, log_path, verbose)
    ws = workspace_for(settings, template, run.run_id)
    prepare = _prepare_result(ws, spec)
    train = json.loads((ws / "train" / "result.json").read_text())
    register = json.loads((ws / "register" / "result.json").read_text())
    event = _asset_event(template, run.run_id)

    evaluation = None
    if spec.evaluation:
        print(f"[arf demo] Asset event {event['uri']} -> running {EVALUATE_DAG_ID} with its "
              f"payload", flush=True)
        payload = {"model_name": event["extra"]["model_name"],
                   "model_version": event["extra"]["model_version"]}
        eval_run, eval_s = _dags_test(EVALUATE_DAG_ID, payload, env, log_path, verbose)
        eval_ws = workspace_for(settings, EVALUATE_DAG_ID, eval_run.run_id)
        evaluation = json.loads(next(eval_ws.glob("evaluate-*/result.json")).read_text())
        evaluation.update(dag_run_id=eval_run.run_id, wall_s=round(eval_s, 1))

    summary = {
        "template": template, "dag_run_id": run.run_id, "state": str(run.state),
        "wall_s": round(train_s, 1), "total_s": round(time.monotonic() - t0, 1),
        "datahub": seeded, "dataset": prepare, "training": train, "model": register,
        "asset_event": event, "evaluation": evaluation, "log": str(log_path),
        "tracking_uri": settings.tracking_uri,
    }
    (ws / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(format_summary(summary, settings), flush=True)
    return summary


def _template(name: str) -> Any:
    """The TrainingTemplate of the DAG `name`, from the templates folder the DAGs are built from."""
    from arf_training.settings import templates_dir
    from arf_training.templates import load_folder, template_files

    loaded, _ = load_folder(template_files(templates_dir()))
    for t in loaded:
        if t.name == name:
            return t.template
    raise ConfError(f"no template named {name!r} in {templates_dir()}; "
                    f"templates: {sorted(t.name for t in loaded)} (--template)")


def reads_pixels(template: Any) -> bool:
    """Whether the template's query names reach_pixels (its frames are seeded only then)."""
    return re.search(r"\breach_pixels\b", template.dataset.query) is not None


def seed_site_hubs(settings: ArfSettings, env: dict[str, str], template: Any) -> dict[str, Any]:
    """A federated template's site hubs: the reach demonstrations split over them by target
    sector (`arf-trainer datahub seed-sites`); idempotent like `seed_datahub`."""
    from arf_training.federation import site_hub

    sites = [f"{s.name}={site_hub(settings, s.hub)}" for s in template.federated.sites]
    for site in sites:
        print(f"[arf demo] site data hub: {site}", flush=True)
    proc = subprocess.run([venv_bin("arf-trainer"), "datahub", "seed-sites",
                           *[a for site in sites for a in ("--site", site)]],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArfError(f"seeding the site hubs failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _prepare_result(ws: Path, template: Any) -> dict[str, Any]:
    """The prepare step's result; for a federation, the sites' results summed (rows) and
    listed (tables and fingerprints, by site)."""
    if template.federated is None:
        return json.loads((ws / "prepare" / "result.json").read_text())
    from arf_training.federation import SITES_DIR

    sites = {s.name: json.loads((ws / SITES_DIR / s.name / "prepare" / "result.json").read_text())
             for s in template.federated.sites}
    total = {k: sum(r.get(k) or 0 for r in sites.values())
             for k in ("rows", "train_rows", "val_rows")}
    tables = {f"{site}:{name}": version for site, r in sites.items()
              for name, version in (r.get("tables") or {}).items()}
    return {**total, "tables": tables, "fingerprint": "per site", "sites": sites}


def format_summary(s: dict[str, Any], settings: ArfSettings) -> str:
    ds, tr, model, ev = s["dataset"], s["training"], s["model"], s["evaluation"]
    tables = ", ".join(f"{n}@v{v['version'] if isinstance(v, dict) else v}"
                       for n, v in (ds.get("tables") or {}).items())
    metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                        for k, v in sorted((tr.get("metrics") or {}).items()))
    lines = [
        "",
        "=" * 78,
        f"ARF demo: template {s['template']!r}",
        f"  DAG run     {s['template']} / {s['dag_run_id']}: {s['state']} in {s['wall_s']} s",
        f"  dataset     {ds.get('rows')} rows (train {ds.get('train_rows')}, val "
        f"{ds.get('val_rows')}) from {tables}; fingerprint {str(ds.get('fingerprint'))[:16]}",
        _training_line(tr, metrics),
        f"              weights sha256 {str(tr.get('weights_sha256'))[:16]}; MLflow run "
        f"{tr.get('mlflow_run_id')}",
        f"  model       {model['model_name']} version {model['model_version']} "
        f"({model.get('model_uri')})",
    ]
    if ev:
        ci = (f" (95% CI {ev['success_rate_ci95_low']:.0%}-{ev['success_rate_ci95_high']:.0%})"
              if "success_rate_ci95_low" in ev else "")
        lines.append(f"  evaluation  success rate {ev['success_rate']:.2%}{ci} over "
                     f"{ev['episodes']} episodes, mean final distance {ev['mean_final_distance']:.4f} "
                     f"({'passed' if ev.get('passed') else 'below threshold'}; "
                     f"{EVALUATE_DAG_ID} run {ev['dag_run_id']})")
    lines += [
        f"  total       {s['total_s']} s; full log {s['log']}",
        "Next:",
        *_activate_line(),
        # Both UIs through the stack, not `mlflow ui --backend-store-uri ...`: the store's URI
        # carries the embedded database's password, which a console line must not show.
        "  UIs         make up   (Airflow http://127.0.0.1:8080, MLflow http://127.0.0.1:5000; "
        "`make down` stops them)",
        f"  reproduce   {_shown_path(Path(sys.executable).parent / 'arf')} training reproduce "
        f"{tr.get('mlflow_run_id')}   (re-runs "
        "from the recorded lineage, compares the weights' sha256)",
        "=" * 78,
    ]
    return "\n".join(lines)


def _training_line(tr: dict[str, Any], metrics: str) -> str:
    fed = tr.get("federated")
    if fed:
        sent = sum(fed.get("bytes_per_round") or [0]) / max(1, fed.get("rounds") or 1)
        return (f"  training    federated over {len(fed.get('sites') or {})} sites, "
                f"{fed.get('rounds')} rounds ({sent / 1e6:.2f} MB exchanged a round); {metrics}")
    return f"  training    world size {tr.get('world_size')}, {tr.get('steps')} steps; {metrics}"


def shown_uri(uri: str) -> str:
    """A database URI fit for the console: its password (the embedded server's) masked."""
    from sqlalchemy.engine import make_url

    return make_url(uri).render_as_string(hide_password=True)


def _activate_line() -> list[str]:
    """How to put `arf` on PATH: `make demo` installs into a venv that is not active, while the
    README writes `arf ...` (as a user types it once the venv is active)."""
    activate = Path(sys.executable).parent / "activate"
    if not activate.exists():  # not a venv: `arf` is wherever pip put it
        return []
    return [f"  shell       source {_shown_path(activate)}   (puts `arf`, `airflow` and `mlflow` "
            "on PATH, as the README's commands expect)"]


def _shown_path(path: Path) -> Path:
    """`path` as a command typed in this directory finds it: relative below it, else absolute."""
    with contextlib.suppress(ValueError, OSError):
        return path.relative_to(Path.cwd())
    return path
