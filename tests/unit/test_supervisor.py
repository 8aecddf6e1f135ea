"""The supervisor of `arf up` with small real processes as components (no Airflow): start order
with readiness, restart with backoff and a log line, the killed component's leftovers stopped,
state for `arf status`, everything stopped on SIGTERM."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from arf_training.supervisor import Component, Supervisor, read_state

# A component like a LocalExecutor scheduler: a child in its own group (a worker) and a
# grandchild in a session of its own (a step's torchrun), pids written to `pids.json`.
FAMILY = textwrap.dedent("""
    import json, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    step = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            start_new_session=True)
    time.sleep(0.5)  # as if it ran a while; the supervisor snapshots its descendants
    with open(sys.argv[1], "w") as out:
        json.dump([worker.pid, step.pid], out)
    time.sleep(600)
""")


def _wait(what: str, predicate, timeout: float = 30.0, tick=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick:
            tick()
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


@pytest.fixture
def logs() -> list[str]:
    return []


def test_a_sigkilled_component_is_restarted_and_its_leftovers_are_stopped(tmp_path, logs):
    pids_file = tmp_path / "pids.json"
    sup = Supervisor([Component("scheduler", _python(FAMILY, str(pids_file)), dict(os.environ),
                                port=8793)],
                     tmp_path, backoff_s=(0.2, 1.0), grace_s=3, log=logs.append)
    try:
        assert sup.start_all()
        worker, step = _wait("the family", lambda: pids_file.exists()
                             and json.loads(pids_file.read_text() or "null"), tick=sup.tick)
        time.sleep(2.5)  # one descendant snapshot after the family exists
        sup.tick()
        leader = sup.slots[0].proc.pid
        pids_file.unlink()
        os.kill(leader, signal.SIGKILL)
        _wait("the restart", lambda: sup.slots[0].proc and sup.slots[0].proc.pid != leader,
              tick=sup.tick)
        assert not _alive(worker), "the dead scheduler's worker (same group) still runs"
        assert not _alive(step), "the dead scheduler's step (own session) still runs"
        assert any(f"component scheduler (pid {leader}) exited: killed by signal SIGKILL" in line
                   and "restart #1" in line for line in logs), logs
        state = read_state(tmp_path)
        [comp] = state["components"]
        assert comp["restarts"] == 1 and comp["port"] == 8793
        assert comp["pid"] == sup.slots[0].proc.pid and comp["started_at"] > 0
        assert "SIGKILL" in comp["last_exit"]
    finally:
        sup.stop_all()


def test_components_start_in_order_each_after_the_previous_is_ready(tmp_path, logs):
    ready_file = tmp_path / "db-ready"
    started_file = tmp_path / "app-started"
    slow_db = _python(f"import time, pathlib; time.sleep(2); "
                      f"pathlib.Path({str(ready_file)!r}).touch(); time.sleep(600)")
    app = _python(f"import time, pathlib; pathlib.Path({str(started_file)!r}).touch(); "
                  "time.sleep(600)")
    sup = Supervisor([Component("db", slow_db, dict(os.environ), ready=ready_file.exists),
                      Component("app", app, dict(os.environ))], tmp_path, log=logs.append)
    try:
        assert sup.start_all()
        assert started_file.exists()
        assert started_file.stat().st_mtime >= ready_file.stat().st_mtime
        assert [line.split("arf-supervisor: ")[1].split(" (")[0] for line in logs
                if "started " in line or "is ready" in line] == [
            "started db", "db is ready", "started app", "app is ready"]
    finally:
        sup.stop_all()


def test_a_heartbeat_left_by_a_predecessor_does_not_make_a_component_ready(tmp_path, logs):
    """Like the scheduler's job heartbeat in the database: the stale one written before this
    start must not count, only the one the new process writes once its loop runs."""
    beat = tmp_path / "heartbeat"
    beat.write_text(str(time.time()))  # the killed predecessor's last heartbeat
    scheduler = _python(f"import time, pathlib; time.sleep(2); "
                        f"pathlib.Path({str(beat)!r}).write_text(str(time.time())); "
                        "time.sleep(600)")
    app = _python("import time; time.sleep(600)")
    sup = Supervisor([Component("scheduler", scheduler, dict(os.environ),
                                ready_since=lambda since: float(beat.read_text()) >= since),
                      Component("app", app, dict(os.environ))], tmp_path, log=logs.append)
    try:
        t0 = time.monotonic()
        assert sup.start_all()
        assert time.monotonic() - t0 >= 2.0  # waited for the new heartbeat, not the old one
        state = read_state(tmp_path)
        scheduler_start = next(c for c in state["components"] if c["name"] == "scheduler")
        assert float(beat.read_text()) >= scheduler_start["started_at"]
    finally:
        sup.stop_all()


def test_the_stack_probes_a_heartbeat_newer_than_the_start(tmp_path):
    """`arf up` is ready when the api-server's public health report shows each job's heartbeat
    from after its start (a real HTTP server serving Airflow's report format)."""
    import http.server
    import threading

    from arf_training.stack import _heartbeat_probe

    beat = {"value": "2026-01-01T00:00:00+00:00"}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"scheduler": {"status": "healthy",
                                             "latest_scheduler_heartbeat": beat["value"]}})
            self.send_response(200 if self.path == "/api/v2/monitor/health" else 404)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probe = _heartbeat_probe(server.server_address[1], "scheduler")
        started = time.time()
        assert not probe(started)  # an old heartbeat: a predecessor's
        beat["value"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        assert probe(started)
        assert not _heartbeat_probe(server.server_address[1], "triggerer")(started)
    finally:
        server.shutdown()


def test_a_component_that_keeps_exiting_is_restarted_with_growing_backoff(tmp_path, logs):
    sup = Supervisor([Component("flaky", _python("import sys; sys.exit(3)"), dict(os.environ))],
                     tmp_path, backoff_s=(0.2, 0.8), log=logs.append)
    try:
        sup._start(sup.slots[0])
        _wait("four restarts", lambda: sup.slots[0].restarts >= 4, tick=sup.tick)
        exits = [line for line in logs if "exited: exit code 3" in line]
        delays = [line.rsplit(" in ", 1)[1] for line in exits[:4]]
        assert delays == ["0.2 s", "0.4 s", "0.8 s", "0.8 s"], exits  # doubled, then capped
    finally:
        sup.stop_all()


DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from arf_training.supervisor import Component, Supervisor
    family = open(sys.argv[2]).read()
    comps = [Component("db", [sys.executable, "-c", family, sys.argv[1] + "/db.json"],
                       dict(os.environ), stop_last=True),
             Component("app", [sys.executable, "-c", family, sys.argv[1] + "/app.json"],
                       dict(os.environ))]
    sys.exit(Supervisor(comps, Path(sys.argv[1]), grace_s=3).run())
""")


def test_sigterm_stops_every_process_group_and_clears_the_state(tmp_path):
    family = tmp_path / "family.py"
    family.write_text(FAMILY)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), str(family)],
                            env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait("both components", lambda: (tmp_path / "app.json").exists()
              and (read_state(tmp_path) or {}).get("supervisor", {}).get("phase") == "running")
        time.sleep(2.5)
        state = read_state(tmp_path)
        leaders = [c["pid"] for c in state["components"]]
        family_pids = [pid for name in ("db", "app")
                       for pid in json.loads((tmp_path / f"{name}.json").read_text())]
        assert (tmp_path / "supervisor.pid").read_text() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        still = [pid for pid in leaders + family_pids if _alive(pid)]
        assert not still, f"left running after SIGTERM: {still}\n{out}"
        assert "stopped app, db" in out  # the database last
        assert not (tmp_path / "state.json").exists()
        assert not (tmp_path / "supervisor.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_repair_restarts_a_component_waiting_in_backoff_at_once(tmp_path, logs):
    """What a second `arf up` asks for (SIGHUP): no waiting out a long backoff."""
    flag = tmp_path / "may-run"
    code = (f"import pathlib, sys, time; p = pathlib.Path({str(flag)!r})\n"
            "if not p.exists(): sys.exit(1)\ntime.sleep(600)")
    sup = Supervisor([Component("api", _python(code), dict(os.environ))], tmp_path,
                     backoff_s=(60.0, 60.0), log=logs.append)
    try:
        sup._start(sup.slots[0])
        _wait("the first exit", lambda: sup.slots[0].next_start is not None, tick=sup.tick)
        flag.touch()
        sup._on_repair(signal.SIGHUP, None)
        started = time.monotonic()
        _wait("the restart", lambda: sup.slots[0].proc is not None, timeout=10, tick=sup.tick)
        assert time.monotonic() - started < 10  # not the 60 s backoff
        assert sup.state()["components"][0]["restarts"] == 1
    finally:
        sup.stop_all()
