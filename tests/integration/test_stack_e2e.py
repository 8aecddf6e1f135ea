"""`arf up` for real, in a home of its own on free ports: nothing listens beyond loopback, status
and a second `arf up`, a SIGKILLed scheduler during `train` (restarted, the run succeeds, one
model version), a run deleted and triggered again under its id (a new model), 16 simultaneous
REST triggers (16 runs, 16 successes), `arf down` stops all.

One stack for the module (a start takes about a minute on 2 cores); its data hub is the
session's seeded one, everything else (metadata DB, MLflow store, logs) is its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from airflow_procs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARF = str(Path(sys.executable).parent / "arf")


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    api_port: int
    mlflow_port: int

    def arf(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([ARF, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def state(self) -> dict:
        return json.loads((self.home / "run" / "state.json").read_text())

    def pid_of(self, name: str) -> int:
        return next(c["pid"] for c in self.state()["components"] if c["name"] == name)

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/api/v2{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 (loopback)
            return json.loads(resp.read() or b"{}")

    def processes(self) -> list[psutil.Process]:
        supervisor = int((self.home / "run" / "supervisor.pid").read_text())
        root = psutil.Process(supervisor)
        return [root, *root.children(recursive=True)]


def _stack_env(home: Path, hub: str) -> dict[str, str]:
    # Not the session's Airflow/MLflow settings: the stack derives its own from ARF_HOME.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ARF_", "MLFLOW"))}
    env.update({"ARF_HOME": str(home), "ARF_DATAHUB_URI": hub, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if os.environ.get("ARF_DB"):
        env["ARF_DB"] = os.environ["ARF_DB"]
    return env


@pytest.fixture(scope="module")
def stack(embedded):
    # Not under pytest's 0700 tmp root: the database server runs as an unprivileged user.
    home = Path(tempfile.mkdtemp(prefix="arf-stack-"))
    s = Stack(home, _stack_env(home, embedded["ARF_DATAHUB_URI"]), free_port(), free_port())
    up = s.arf("up", "--port", str(s.api_port), "--mlflow-port", str(s.mlflow_port))
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield s
    finally:
        started = s.processes() if (home / "run" / "supervisor.pid").exists() else []
        down = s.arf("down", timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
        left = [p.pid for p in started if p.is_running() and p.status() != "zombie"]
        assert not left, f"`arf down` left these running: {left}"
        shutil.rmtree(home, ignore_errors=True)


def _poll(what: str, fn, timeout: float, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except OSError as exc:  # 404 while the DAG is not parsed yet, etc.
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def test_nothing_listens_beyond_loopback(stack):
    listening = []
    for proc in stack.processes():
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        listening += [(proc.pid, " ".join(proc.cmdline())[:60], c.laddr.ip, c.laddr.port)
                      for c in conns if c.status == psutil.CONN_LISTEN]
    ports = {port for *_, port in listening}
    assert {stack.api_port, stack.mlflow_port} <= ports, listening
    public = [item for item in listening if item[2] not in ("127.0.0.1", "::1")]
    assert not public, f"listening beyond loopback: {public}"


def test_status_shows_each_component_and_a_second_up_says_it_runs(stack):
    status = stack.arf("status")
    assert status.returncode == 0, status.stderr
    for name in ("mlflow", "api-server", "dag-processor", "triggerer", "scheduler",
                 "log-janitor"):
        line = next(line for line in status.stdout.splitlines() if line.startswith(name))
        assert str(stack.pid_of(name)) in line and "running" in line
    # The janitor sweeps Airflow's log folder of this home (its first sweep is at its start).
    janitor_log = stack.home / "run" / "log-janitor.log"
    _poll("the log janitor's first sweep", lambda: "removed " in janitor_log.read_text(), 30, 1)
    assert str(stack.home / "airflow" / "logs") in janitor_log.read_text()
    assert str(stack.api_port) in status.stdout and str(stack.mlflow_port) in status.stdout
    again = stack.arf("up", "--port", str(stack.api_port), "--mlflow-port",
                      str(stack.mlflow_port))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout


def _versions_of_run(stack: Stack, run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{stack.mlflow_port}"
    client = MlflowClient(uri, uri)
    return [v for v in client.search_model_versions("name = 'digits_classifier'")
            if v.tags.get("arf.dag_run_id") == run_id]


def test_a_sigkilled_scheduler_is_restarted_and_the_run_finishes_once(stack):
    _poll("digits_smoke to be parsed", lambda: stack.api("GET", "/dags/digits_smoke"), 300)
    run_id = stack.api("POST", "/dags/digits_smoke/dagRuns",
                       {"logical_date": None, "conf": {"epochs": 40}})["dag_run_id"]
    ti = f"/dags/digits_smoke/dagRuns/{run_id}/taskInstances/train"
    _poll("train to run", lambda: stack.api("GET", ti)["state"] == "running", 600, 1)
    time.sleep(5)  # the step is training
    scheduler = stack.pid_of("scheduler")
    os.kill(scheduler, signal.SIGKILL)
    _poll("a new scheduler", lambda: stack.pid_of("scheduler") not in (None, scheduler), 120, 1)

    def finished():
        state = stack.api("GET", f"/dags/digits_smoke/dagRuns/{run_id}")["state"]
        assert state != "failed", f"run {run_id} failed after the scheduler was killed"
        return state == "success"

    _poll(f"run {run_id}", finished, 900)
    [scheduler_state] = [c for c in stack.state()["components"] if c["name"] == "scheduler"]
    assert scheduler_state["restarts"] >= 1 and "SIGKILL" in scheduler_state["last_exit"]
    log = (stack.home / "run" / "supervisor.log").read_text()
    assert f"component scheduler (pid {scheduler}) exited: killed by signal SIGKILL" in log
    assert len(_versions_of_run(stack, run_id)) == 1
    # The steps tracked through the MLflow server of `arf up`, not straight into its store.
    assert "POST /api/2.0/mlflow/runs/create" in (stack.home / "run" / "mlflow.log").read_text()


def test_a_run_deleted_and_triggered_again_under_its_id_starts_afresh(stack):
    """A CI system's chosen run id, its run deleted and triggered again: a new DagRun, which
    must not take the deleted one's prepared rows, checkpoints, MLflow run or model version for
    its own (arf_trainer.dag_run_dir); the deleted run's files are kept aside."""
    _poll("digits_smoke to be parsed", lambda: stack.api("GET", "/dags/digits_smoke"), 300)
    run_id = "ci-build-42"

    def run_once() -> None:
        stack.api("POST", "/dags/digits_smoke/dagRuns",
                  {"dag_run_id": run_id, "logical_date": None, "conf": {"epochs": 1}})
        _poll(f"run {run_id}", lambda: stack.api(
            "GET", f"/dags/digits_smoke/dagRuns/{run_id}")["state"] == "success", 600)

    run_once()
    [first] = _versions_of_run(stack, run_id)
    stack.api("DELETE", f"/dags/digits_smoke/dagRuns/{run_id}")
    run_once()
    versions = _versions_of_run(stack, run_id)
    assert len(versions) == 2 and len({v.run_id for v in versions}) == 2, versions
    [aside] = stack.home.rglob(f"{run_id}%dagrun-*")
    assert (aside / "train" / "result.json").exists()
    assert json.loads((aside / "register" / "result.json").read_text())["model_version"] \
        == str(first.version)


def test_sixteen_simultaneous_triggers_all_run_and_succeed(stack):
    _poll("digits_smoke to be parsed", lambda: stack.api("GET", "/dags/digits_smoke"), 300)

    def trigger(i: int) -> str:
        return stack.api("POST", "/dags/digits_smoke/dagRuns",
                         {"logical_date": None, "conf": {"epochs": 1}})["dag_run_id"]

    with ThreadPoolExecutor(16) as pool:
        run_ids = list(pool.map(trigger, range(16)))  # an HTTP error raises here
    assert len(set(run_ids)) == 16

    def states():
        found = {r["dag_run_id"]: r["state"] for r in stack.api(
            "GET", "/dags/digits_smoke/dagRuns?limit=100")["dag_runs"]}
        mine = {run_id: found.get(run_id) for run_id in run_ids}
        failed = [r for r, s in mine.items() if s == "failed"]
        assert not failed, f"failed runs: {failed}"
        return mine if all(s == "success" for s in mine.values()) else None

    _poll("16 successful runs", states, 1500, 5)
    assert sum(len(_versions_of_run(stack, run_id)) for run_id in run_ids) == 16


def test_a_public_host_serves_real_users_only(embedded):
    """`arf up --host 0.0.0.0`: the api-server on every interface, but no request without a
    login; the generated admin password (0600 file, printed once) logs in; the rest stays on
    loopback."""
    home = Path(tempfile.mkdtemp(prefix="arf-public-"))
    s = Stack(home, _stack_env(home, embedded["ARF_DATAHUB_URI"]), free_port(), free_port())
    up = s.arf("up", "--host", "0.0.0.0", "--port", str(s.api_port),
               "--mlflow-port", str(s.mlflow_port))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        passwords = home / "airflow" / "passwords.json"
        assert passwords.stat().st_mode & 0o777 == 0o600
        password = json.loads(passwords.read_text())["admin"]
        assert password in up.stdout  # printed once ...
        again = s.arf("up", "--host", "0.0.0.0", "--port", str(s.api_port),
                      "--mlflow-port", str(s.mlflow_port))
        assert again.returncode == 0 and password not in again.stdout  # ... and only once
        with pytest.raises(urllib.error.HTTPError) as denied:
            s.api("GET", "/dags")
        assert denied.value.code == 401
        login = urllib.request.Request(
            f"http://127.0.0.1:{s.api_port}/auth/token", method="POST",
            data=json.dumps({"username": "admin", "password": password}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(login, timeout=60) as resp:  # noqa: S310 (loopback)
            token = json.loads(resp.read())["access_token"]
        dags = urllib.request.Request(f"http://127.0.0.1:{s.api_port}/api/v2/dags",
                                      headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(dags, timeout=60) as resp:  # noqa: S310 (loopback)
            assert resp.status == 200
        beyond = {c.laddr.port for p in s.processes()
                  for c in _listening(p) if c.laddr.ip not in ("127.0.0.1", "::1")}
        assert beyond == {s.api_port}, beyond
    finally:
        s.arf("down", timeout=300)
        shutil.rmtree(home, ignore_errors=True)


def _listening(proc: psutil.Process) -> list:
    try:
        return [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []
