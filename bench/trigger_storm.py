"""N simultaneous REST triggers of `digits_smoke` on the running embedded stack (`arf up`).

For each database backend (SQLite and PostgreSQL side by side, each in a fresh ARF home of its
own on free ports) and each N, with and without CPU load made by this bench (one busy loop per
core, bounded by a deadline and stopped when the runs end), it fires N POST /dagRuns at once
and reports: HTTP 2xx/4xx/5xx, runs succeeded, model versions registered (should = runs),
components restarted by the supervisor, p50/p95 from trigger to DAG run created (the POST's
answer) and from trigger to the first task running (the run's first task start_date).

    .venv/bin/python bench/trigger_storm.py                       # N = 8 32 64, both, ± load
    .venv/bin/python bench/trigger_storm.py --n 8 --load off --backends postgres

A benchmark, not a test: figures depend on the machine; the goal is 0 server errors and 0
lost runs at every N.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

DAG = "digits_smoke"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v2{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 (loopback)
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {"detail": exc.read().decode(errors="replace")[:300]}


def _burn(deadline: float, stop) -> None:
    x = 1
    while time.time() < deadline and not stop.is_set():
        for _ in range(10000):
            x = x * 31 % 1000003


class CpuLoad:
    """One busy process per core until `stop()` or the deadline, whichever comes first."""

    def __init__(self, seconds: float):
        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        deadline = time.time() + seconds
        self.procs = [ctx.Process(target=_burn, args=(deadline, self.stop_event), daemon=True)
                      for _ in range(os.cpu_count() or 1)]
        for proc in self.procs:
            proc.start()

    def stop(self) -> None:
        self.stop_event.set()
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def storm(port: int, mlflow_port: int, n: int, epochs: int, timeout_s: float,
          restarts_before: int, restarts_now) -> dict:
    def trigger(_i: int) -> tuple[float, float, int, str | None]:
        sent = time.time()
        code, body = api(port, "POST", f"/dags/{DAG}/dagRuns",
                         {"logical_date": None, "conf": {"epochs": epochs}})
        return sent, time.time(), code, body.get("dag_run_id")

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(trigger, range(n)))
    run_ids = [a[3] for a in answers if 200 <= a[2] < 300 and a[3]]
    sent_at = {a[3]: a[0] for a in answers if a[3]}
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        code, body = api(port, "GET", f"/dags/{DAG}/dagRuns?limit=1000&order_by=-id")
        if code == 200:
            found = {r["dag_run_id"]: r["state"] for r in body["dag_runs"]}
            states = {r: found.get(r, "missing") for r in run_ids}
            if all(s in ("success", "failed") for s in states.values()):
                break
        time.sleep(5)
    timings = [run_timings(port, run_id, sent_at[run_id]) for run_id in run_ids]
    first_task = [t["first_task_s"] for t in timings if t["first_task_s"] is not None]
    at_once = _admitted_at_once(port, timings)
    admitted = [t["admitted_s"] for t in timings if t["admitted_s"] is not None]
    scheduled = [t["scheduling_s"] for t in timings if t["scheduling_s"] is not None]
    created = [a[1] - a[0] for a in answers if 200 <= a[2] < 300]
    return {
        "n": n, "2xx": sum(200 <= a[2] < 300 for a in answers),
        "4xx": sum(400 <= a[2] < 500 for a in answers), "5xx": sum(a[2] >= 500 for a in answers),
        "runs_created": len(run_ids),
        "runs_succeeded": sum(s == "success" for s in states.values()),
        "runs_failed": sum(s == "failed" for s in states.values()),
        "runs_unfinished": sum(s not in ("success", "failed") for s in states.values()),
        "model_versions": _versions(mlflow_port, set(run_ids)),
        "restarts": restarts_now() - restarts_before,
        "created_p50_s": _pct(created, 50), "created_p95_s": _pct(created, 95),
        "first_task_p50_s": _pct(first_task, 50), "first_task_p95_s": _pct(first_task, 95),
        "at_once": len(at_once), "at_once_first_task_p50_s": _pct(at_once, 50),
        "at_once_first_task_p95_s": _pct(at_once, 95),
        "admitted_p50_s": _pct(admitted, 50), "admitted_p95_s": _pct(admitted, 95),
        "scheduling_p50_s": _pct(scheduled, 50), "scheduling_p95_s": _pct(scheduled, 95),
    }


def _admitted_at_once(port: int, timings: list[dict]) -> list[float]:
    """Trigger -> first task running of the runs the DAG's `max_active_runs` let start at once
    (the first that many to be admitted): the latency a trigger sees when the template's own
    limit does not hold it back. The others wait for whole runs to end, by design."""
    code, dag = api(port, "GET", f"/dags/{DAG}/details")
    limit = dag.get("max_active_runs") if code == 200 else None
    admitted = sorted((t for t in timings if t["admitted_s"] is not None and t["first_task_s"]),
                      key=lambda t: t["admitted_s"])
    return [t["first_task_s"] for t in admitted[:limit or len(admitted)]]


def run_timings(port: int, run_id: str, sent: float) -> dict:
    """Where the time from trigger to first task goes, for one run:

    - `admitted_s`: trigger -> the scheduler sets the run running (its start_date). Includes
      waiting for a free place under the DAG's `max_active_runs` (a limit the template sets).
    - `scheduling_s`: run running -> its first task running (its earliest start_date): the
      scheduler loop, the executor queue and the task supervisor's start. Includes waiting
      for a free executor slot (`parallelism`) while other runs' tasks hold them.
    - `first_task_s`: trigger -> first task running, end to end (the two above).
    """
    code, run = api(port, "GET", f"/dags/{DAG}/dagRuns/{run_id}")
    started = _ts(run.get("start_date")) if code == 200 else None
    code, body = api(port, "GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances")
    starts = [_ts(t.get("start_date")) for t in body.get("task_instances", [])] if code == 200 else []
    first = min((s for s in starts if s), default=None)
    return {"admitted_s": started - sent if started else None,
            "scheduling_s": first - started if first and started else None,
            "first_task_s": first - sent if first else None}


def wait_finished(port: int, run_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code, run = api(port, "GET", f"/dags/{DAG}/dagRuns/{run_id}")
        if code == 200 and run.get("state") in ("success", "failed"):
            return run["state"]
        time.sleep(1)
    return "unfinished"


def single_triggers(port: int, count: int, epochs: int, timeout_s: float) -> dict:
    """One trigger at a time on an idle stack: the first right after `arf up` (fresh), then
    `count` more, each after the previous run ended (warm). Trigger -> first task running."""
    rows = []
    for i in range(count + 1):
        sent = time.time()
        code, body = api(port, "POST", f"/dags/{DAG}/dagRuns",
                         {"logical_date": None, "conf": {"epochs": epochs}})
        if not 200 <= code < 300:
            rows.append({"state": f"HTTP {code}"})
            continue
        state = wait_finished(port, body["dag_run_id"], timeout_s)
        rows.append({"state": state, **run_timings(port, body["dag_run_id"], sent)})
    warm = [r["first_task_s"] for r in rows[1:] if r.get("first_task_s") is not None]
    return {"fresh_first_task_s": rows[0].get("first_task_s"),
            "fresh_scheduling_s": rows[0].get("scheduling_s"),
            "warm_first_task_p50_s": _pct(warm, 50), "warm_first_task_p95_s": _pct(warm, 95),
            "warm_runs": len(warm), "failed": sum(r["state"] != "success" for r in rows)}


def footprint(supervisor_pid: int) -> dict:
    """Processes and proportional set size (PSS) of the whole stack (issue 14.4)."""
    import psutil

    root = psutil.Process(supervisor_pid)
    pss = 0
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            pss += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return {"processes": len(procs), "pss_mib": pss / 2**20}


def _versions(mlflow_port: int, run_ids: set[str]) -> int:
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{mlflow_port}"
    versions = MlflowClient(uri, uri).search_model_versions("name = 'digits_classifier'",
                                                            max_results=10000)
    return sum(v.tags.get("arf.dag_run_id") in run_ids for v in versions)


def run_backend(backend: str, root: Path, hub: str, args, singles: list[dict],
                done: list[dict]) -> list[dict]:
    """The storms on one backend; each result is also appended to `done` (and to --out) as it
    comes, so that a stopped bench keeps what it measured."""
    from arf_training import stack

    home = root / backend
    for key in [k for k in os.environ if k.startswith(("AIRFLOW", "ARF_", "MLFLOW_TRACKING"))]:
        del os.environ[key]
    os.environ.update({"ARF_HOME": str(home), "ARF_DB": backend, "ARF_DATAHUB_URI": hub,
                       "MLFLOW_DISABLE_TELEMETRY": "true"})
    opts = stack.StackOptions(api_port=free_port(), mlflow_port=free_port())
    t0 = time.monotonic()
    stack.up(opts)
    print(f"[{backend}] stack up in {time.monotonic() - t0:.0f} s (home {home})", flush=True)

    def restarts() -> int:
        return sum(c["restarts"] for c in stack.status()["components"])

    results = []
    try:
        deadline = time.monotonic() + 300
        while api(opts.api_port, "GET", f"/dags/{DAG}")[0] != 200:
            if time.monotonic() > deadline:
                raise SystemExit(f"[{backend}] {DAG} was not parsed within 300 s")
            time.sleep(3)
        rest = footprint(stack.status()["supervisor_pid"])
        print(f"[{backend}] at rest: {rest['processes']} processes, PSS {rest['pss_mib']:.0f} MiB",
              flush=True)
        if args.single:
            single = single_triggers(opts.api_port, args.single, args.epochs, args.timeout)
            single["backend"] = backend
            print(json.dumps(single), flush=True)
            singles.append(single)
            _save(args.out, singles, done)
        for load in args.loads:
            for n in args.n:
                cpu = CpuLoad(args.timeout) if load else None
                try:
                    result = storm(opts.api_port, opts.mlflow_port, n, args.epochs, args.timeout,
                                   restarts(), restarts)
                finally:
                    if cpu:
                        cpu.stop()
                result.update(backend=backend, load=load)
                print(json.dumps(result), flush=True)
                results.append(result)
                done.append(result)
                _save(args.out, singles, done)
    finally:
        stack.down()
    return results


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def table(results: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or ["backend", "load", "n", "2xx", "4xx", "5xx", "runs_succeeded", "runs_failed",
            "runs_unfinished", "model_versions", "restarts", "created_p50_s", "created_p95_s",
            "first_task_p50_s", "first_task_p95_s", "at_once", "at_once_first_task_p50_s",
            "at_once_first_task_p95_s", "admitted_p50_s", "admitted_p95_s",
            "scheduling_p50_s", "scheduling_p95_s"]
    rows = [cols] + [[_fmt(r.get(c)) for c in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--load", choices=["both", "on", "off"], default="both")
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgres"],
                        default=["sqlite", "postgres"])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (short runs)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds to wait for one storm's runs (also bounds the CPU load)")
    parser.add_argument("--single", type=int, default=5,
                        help="before the storms: one fresh trigger, then this many warm ones, "
                             "one at a time (0 to skip)")
    parser.add_argument("--out", help="write the results as JSON here (after each storm)")
    args = parser.parse_args()
    args.loads = {"both": [False, True], "on": [True], "off": [False]}[args.load]
    root = Path(tempfile.mkdtemp(prefix="arf-storm-"))
    root.chmod(0o711)  # the database server runs as an unprivileged user: let it pass
    hub = str(root / "datahub")
    env = {**os.environ, "ARF_HOME": str(root / "seed"), "ARF_DATAHUB_URI": hub,
           "ARF_DB": "sqlite"}
    subprocess.run([str(Path(sys.executable).parent / "arf-trainer"), "datahub", "seed",
                    "--hub", hub, "--episodes", "80"], env=env, check=True, capture_output=True)
    singles: list[dict] = []
    results: list[dict] = []
    for backend in args.backends:
        run_backend(backend, root, hub, args, singles, results)
    print(f"\n{DAG}, {os.cpu_count()} cores, epochs={args.epochs}, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    if singles:
        print("one trigger at a time (trigger -> first task running, s):\n"
              + table(singles, ["backend", "fresh_first_task_s", "fresh_scheduling_s",
                                "warm_runs", "warm_first_task_p50_s", "warm_first_task_p95_s",
                                "failed"]))
    print("storms:\n" + table(results))
    return 0


def _save(out: str | None, singles: list[dict], storms: list[dict]) -> None:
    if out:
        Path(out).write_text(json.dumps({"single": singles, "storms": storms}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
