"""The supervisor of `arf up` under abuse, with small real processes as components: a crash loop
that lasts for days, a run folder that cannot be written, a second supervisor on the same
folder, a pid file copied or reused, a supervisor killed with SIGKILL, a port another program
holds, logs that may quote connection strings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from test_supervisor import _alive, _wait

from arf_training import stack
from arf_training.cli import format_status
from arf_training.procs import start_process
from arf_training.settings import ArfSettings
from arf_training.supervisor import Component, Supervisor, read_state, supervisor_pid

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]

# A supervisor in a process of its own (signals, locks and exits are per process); its
# components sleep, or (argv[2] = "family") leave a worker and a step in its own session.
DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from arf_training.supervisor import Component, Supervisor
    run = Path(sys.argv[1])
    family = ("import json, subprocess, sys, time\\n"
              "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\\n"
              "s = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
              " start_new_session=True)\\n"
              "open(sys.argv[1], 'w').write(json.dumps([w.pid, s.pid]))\\n"
              "time.sleep(600)")
    sleep = ("import os, sys, time; open(sys.argv[1], 'a').write(f'{os.getpid()}\\\\n'); "
             "time.sleep(600)")
    code = family if sys.argv[2] == "family" else sleep
    outside = str(run.parent / (run.name + "-starts"))
    comps = [Component(name, [sys.executable, "-c", code, f"{outside}.{name}"], dict(os.environ),
                       ready=lambda: True, stop_last=name == "db") for name in ("db", "app")]
    sys.exit(Supervisor(comps, run, grace_s=3, backoff_s=(0.2, 1.0)).run())
""")


def _driver(run: Path, kind: str = "sleep") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(run), kind], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _running(run: Path) -> dict:
    return _wait("the supervisor's components", lambda: (
        (read_state(run) or {}).get("supervisor", {}).get("phase") == "running"
        and read_state(run)))


def _kill_all(*pids: int) -> None:
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_crash_loop_that_lasts_for_days_keeps_the_supervisor_and_its_backoff(tmp_path):
    """1024 quick failures (17 hours at the 60 s cap): 2**1024 overflowed a float, the
    supervisor died and took the whole stack down with it."""
    logs: list[str] = []
    sup = Supervisor([Component("api", [str(tmp_path / "no-such-program")], dict(os.environ))],
                     tmp_path, backoff_s=(1e-6, 1e-5), log=logs.append)
    slot = sup.slots[0]
    sup._start(slot)
    for _ in range(1100):
        slot.next_start = 0.0  # due now: no waiting out even the tiny backoff
        sup.tick()
    assert slot.restarts == 1101
    assert "could not start" in logs[-1] and logs[-1].endswith("in 0.0 s")
    assert read_state(tmp_path)["components"][0]["state"] == "backoff"


def test_a_run_folder_that_cannot_be_written_neither_stops_supervision_nor_orphans(tmp_path):
    """The run folder deleted (or the disk full) under a running stack: the supervisor died on
    its state file at the next exit and, failing again in its cleanup, left the rest running."""
    run = tmp_path / "run"
    proc = _driver(run)
    pids = []
    try:
        pids = [c["pid"] for c in _running(run)["components"]]
        shutil.rmtree(run)
        run.write_text("a file where the run folder was")  # nothing can be created there
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(1.5)  # its exit, and a few failed restarts
        assert proc.poll() is None, proc.communicate()[0]
        assert _alive(pids[0]), "the other component was stopped"
        run.unlink()
        run.mkdir()
        _wait("the state written again", lambda: read_state(run), timeout=10)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"cannot write {run / 'state.json'}" in out
        assert out.count("cannot write") <= 2, out  # once per cause, not once per restart
        assert not [pid for pid in pids if _alive(pid)], out
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(*pids)


def test_a_second_supervisor_on_the_same_run_folder_starts_nothing(tmp_path):
    """Two `arf up` at once: both supervisors ran, each with its own copy of every component
    (a second database on the same data, ports taken twice), and `arf down` found only one."""
    run = tmp_path / "run"
    first = _driver(run)
    second = None
    try:
        state = _running(run)
        second = _driver(run)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 1, out
        assert f"another supervisor (pid {first.pid}) already runs the stack of {run}" in out
        assert (tmp_path / "run-starts.db").read_text().split() == [str(state["components"][0]
                                                                        ["pid"])]
        assert (run / "supervisor.pid").read_text() == str(first.pid)
        assert read_state(run)["supervisor"]["pid"] == first.pid
        assert supervisor_pid(run, marker="arf_training.supervisor") == first.pid
    finally:
        first.terminate()
        first.communicate(timeout=30)
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.kill()
        _kill_all(*[int(pid) for starts in tmp_path.glob("run-starts.*")
                    for pid in starts.read_text().split()])


def test_a_pid_file_copied_with_the_home_is_not_a_running_supervisor(tmp_path):
    """`cp -r .arf backup` under a running stack, then `ARF_HOME=backup arf down`: the copied
    pid file named the live supervisor of the original, and down would have stopped it."""
    run = tmp_path / "run"
    proc = _driver(run)
    try:
        _running(run)
        copy = tmp_path / "copy"
        shutil.copytree(run, copy)
        assert supervisor_pid(run, marker="arf_training.supervisor") == proc.pid
        assert supervisor_pid(copy, marker="arf_training.supervisor") is None
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_the_stack_entry_point_exits_before_building_anything_when_one_runs(tmp_path):
    """A second `python -m arf_training.stack` built its components first, which stops the home's
    running database (the other supervisor's); it must leave at once instead."""
    from arf_training.supervisor import take_run_lock

    home = tmp_path / "home"
    lock = take_run_lock(home / "run")
    # No database server, no MLflow server: only the supervisor's own process group.
    env = {**os.environ, "ARF_HOME": str(home), "ARF_DB": "sqlite",
           "ARF_TRACKING_URI": "http://127.0.0.1:1"}
    proc = subprocess.Popen([sys.executable, "-m", "arf_training.stack", "--api-port",
                             str(_free_port()), "--mlflow-port", str(_free_port())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1, out
        assert f"another supervisor (pid {os.getpid()}) already runs" in out
        assert not (home / "airflow").exists(), "it built the Airflow environment first"
    finally:
        _kill_all(proc.pid)
        lock.close()


def test_the_leftovers_of_a_sigkilled_supervisor_include_steps_in_their_own_sessions(tmp_path,
                                                                                    monkeypatch):
    """The next `arf up` / `arf down` stopped the dead supervisor's groups, but a step its
    scheduler started in a session of its own (the local backend's torchrun) ran on."""
    run = tmp_path / "run"
    proc = _driver(run, "family")
    family = []
    try:
        _running(run)
        files = [tmp_path / f"run-starts.{name}" for name in ("db", "app")]
        _wait("the families", lambda: all(f.exists() and f.read_text() for f in files))
        family = [pid for f in files for pid in json.loads(f.read_text())]
        proc.kill()
        proc.wait()
        # `arf status` says what still runs (it said "not running"), and how to stop it.
        monkeypatch.setenv("ARF_HOME", str(run.parent))
        report = stack.status()
        assert not report["running"] and sorted(report["leftovers"]) == ["app", "db"]
        assert "the supervisor is gone, but" in format_status(report)
        assert sorted(stack._stop_leftovers(run)) == ["app", "db"]
        assert stack.status()["leftovers"] == []
        _wait("the step's exit", lambda: not any(_alive(pid) for pid in family), timeout=15)
    finally:
        _kill_all(*family)


def test_a_legacy_pid_file_naming_a_reused_pid_leaves_that_process_alone(tmp_path):
    """An old `arf up`'s `scheduler.pid`, its pid since reused by an unrelated session leader:
    that program was killed (its whole group) as a leftover."""
    run = tmp_path / "run"
    run.mkdir()
    ours = subprocess.Popen(SLEEPER, start_new_session=True)
    (run / "mlflow.pid").write_text(str(ours.pid))  # written as its process started
    stranger = subprocess.Popen(SLEEPER, start_new_session=True)
    (run / "scheduler.pid").write_text(str(stranger.pid))
    an_hour_ago = time.time() - 3600
    os.utime(run / "scheduler.pid", (an_hour_ago, an_hour_ago))
    try:
        assert stack._stop_leftovers(run) == ["mlflow"]
        assert ours.wait(timeout=15) is not None
        time.sleep(0.5)
        assert stranger.poll() is None, "an unrelated process was killed"
        assert not list(run.glob("*.pid"))
    finally:
        _kill_all(ours.pid, stranger.pid)
        for proc in (ours, stranger):
            proc.wait()


def test_a_component_that_exits_on_a_taken_port_names_the_holder(tmp_path):
    """A port taken while the api-server was down: `arf status` said only 'exit code 1' on
    every restart, with the reason buried in the component's log."""
    port = _free_port()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket, time
        s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen(); time.sleep(600)""")])
    serve = [sys.executable, "-c", f"import socket; socket.socket().bind(('127.0.0.1', {port}))"]
    logs: list[str] = []
    sup = Supervisor([Component("api-server", serve, dict(os.environ), port=port)], tmp_path,
                     backoff_s=(60.0, 60.0), log=logs.append)
    try:
        _wait("the holder", lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0)
        sup._start(sup.slots[0])
        _wait("the exit", lambda: sup.slots[0].next_start is not None, tick=sup.tick)
        why = f"its port {port} is in use by pid {holder.pid} ("
        assert why in read_state(tmp_path)["components"][0]["last_exit"]
        assert any(why in line and "exit code 1" in line for line in logs), logs
    finally:
        sup.stop_all()
        holder.kill()
        holder.wait()


def test_component_logs_and_the_run_folder_are_private(tmp_path):
    """Logs in run/ were 0644 in a 0755 folder: any local user could read what a component
    printed (its configuration, a connection string in a traceback)."""
    settings = ArfSettings(home=tmp_path / "home", tracking_uri="http://127.0.0.1:1",
                           datahub_uri=str(tmp_path / "hub"), artifact_root=str(tmp_path / "a"))
    run = stack.run_dir(settings)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    old = run / "scheduler.log"
    old.write_text("left readable by an older version\n")
    old.chmod(0o644)
    for log in (run / "api-server.log", old):
        start_process(["true"], dict(os.environ), log).wait()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, log
    assert old.read_text().startswith("left readable")  # appended to, not truncated
    run.chmod(0o755)
    assert stat.S_IMODE(stack.run_dir(settings).stat().st_mode) == 0o700



def test_down_during_an_up_that_is_still_preparing_stops_the_stack_it_starts(tmp_path,
                                                                             monkeypatch):
    """`arf down` while the first `arf up` seeded the data hub said 'nothing was running', and
    the stack came up a minute later anyway. Here the `up` is the test: it holds up's lock
    while it starts a supervisor (stand-in components), as `up()` does."""
    import threading

    home = tmp_path / "home"
    monkeypatch.setenv("ARF_HOME", str(home))
    monkeypatch.setenv("ARF_DB", "sqlite")  # no detached database server to look for
    run = stack.run_dir(ArfSettings.from_env())
    # `down` knows a supervisor by this marker in its command line.
    driver = tmp_path / "arf_training.stack-stand-in.py"
    driver.write_text(DRIVER)
    holding, supervisor = threading.Event(), {}

    def preparing_up():
        with stack._up_lock(run):
            holding.set()
            time.sleep(1.0)  # seeding the hub
            supervisor["proc"] = subprocess.Popen(
                [sys.executable, str(driver), str(run), "sleep"], env=dict(os.environ),
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            _wait("its lock", lambda: supervisor_pid(run) == supervisor["proc"].pid)

    up = threading.Thread(target=preparing_up)
    up.start()
    try:
        holding.wait(10)
        stack.down(grace_s=30)
        up.join(30)
        assert supervisor["proc"].wait(timeout=30) == 0, "the supervisor outlived `arf down`"
        assert not (run / "state.json").exists()
        assert not [pid for starts in home.glob("run-starts.*")
                    for pid in map(int, starts.read_text().split()) if _alive(pid)]
    finally:
        up.join(30)
        if supervisor.get("proc") and supervisor["proc"].poll() is None:
            supervisor["proc"].kill()
        _kill_all(*[int(pid) for starts in home.glob("run-starts.*")
                    for pid in starts.read_text().split()])


def test_status_of_a_supervisor_that_has_just_started_says_it_runs(tmp_path, monkeypatch):
    """A second `arf up` right after the first printed 'already running' and then 'the stack is
    not running': the new supervisor held the run folder but had no state file yet."""
    home = tmp_path / "home"
    monkeypatch.setenv("ARF_HOME", str(home))
    run = stack.run_dir(ArfSettings.from_env())
    holder = tmp_path / "arf_training.stack-holder.py"  # the marker `status` looks for
    holder.write_text("import sys, time\nfrom pathlib import Path\n"
                      "from arf_training.supervisor import take_run_lock\n"
                      "lock = take_run_lock(Path(sys.argv[1]))\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(holder), str(run)], env=dict(os.environ))
    try:
        _wait("its lock", lambda: supervisor_pid(run) == proc.pid)
        report = stack.status()
        assert report["running"] and report["phase"] == "starting", report
        assert "supervisor pid" in format_status(report)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_two_ups_at_once_start_one_stack_and_down_stops_all_of_it():
    """For real, on a fresh home (its hub seeded first, which widened the race): both `arf up`
    succeed, one says it found the stack, one supervisor runs, nothing restarts, the logs are
    private; `arf down` leaves no process of the home behind."""
    import tempfile

    # Not under pytest's 0700 tmp root: the database server runs as an unprivileged user.
    home = Path(tempfile.mkdtemp(prefix="arf-review-stack-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ARF_", "MLFLOW"))}
    env.update({"ARF_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"})
    arf = str(Path(sys.executable).parent / "arf")
    api_port = _free_port()
    up = [arf, "up", "--port", str(api_port), "--mlflow-port", str(_free_port())]

    def ours() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "environ"]):
            text = " ".join(proc.info["cmdline"] or []) + str(proc.info["environ"] or {})
            if str(home) in text and proc.pid != os.getpid():
                found.append(proc)
        return found

    try:
        ups = [subprocess.Popen(up, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
        outs = [proc.communicate(timeout=600)[0] for proc in ups]
        assert [proc.returncode for proc in ups] == [0, 0], outs
        assert sum("already running" in out for out in outs) == 1, outs
        assert not any("is not running" in out for out in outs), outs
        supervisors = [p for p in ours() if "arf_training.stack" in " ".join(p.cmdline())]
        assert len(supervisors) == 1, supervisors
        state = read_state(home / "run")
        assert {c["state"] for c in state["components"]} == {"running"}, state
        assert sum(c["restarts"] for c in state["components"]) == 0, state
        assert {oct(stat.S_IMODE(log.stat().st_mode)) for log in (home / "run").glob("*.log")} \
            == {"0o600"}
        down = subprocess.run([arf, "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
        time.sleep(1)
        assert not [p for p in ours() if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        subprocess.run([arf, "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)
