"""What `arf up` runs, without starting it: loopback by default, real users beyond it, steps
tracking through the MLflow server, worker counts from the core count."""

from __future__ import annotations

import json
import stat

import pytest

from arf_training import stack
from arf_training.errors import ArfError
from arf_training.settings import ArfSettings


@pytest.fixture
def settings(tmp_path, monkeypatch) -> ArfSettings:
    monkeypatch.setenv("ARF_DB", "sqlite")  # no database server for these
    monkeypatch.delenv("AIRFLOW__CORE__PARALLELISM", raising=False)
    return ArfSettings(home=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                       datahub_uri=str(tmp_path / "datahub"),
                       artifact_root=str(tmp_path / "mlartifacts"))


def _by_name(components) -> dict:
    return {c.name: c for c in components}


def test_every_component_listens_on_loopback_by_default(settings):
    comps = _by_name(stack.components(settings, stack.StackOptions(api_port=18080)))
    api = comps["api-server"].command
    assert api[api.index("--host") + 1] == "127.0.0.1"
    mlflow = comps["mlflow"].command
    assert mlflow[mlflow.index("--host") + 1] == "127.0.0.1"
    # Their log servers would bind every interface (Airflow has no setting for the address).
    assert "--skip-serve-logs" in comps["scheduler"].command
    assert "--skip-serve-logs" in comps["triggerer"].command
    assert comps["scheduler"].env["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "False"


def test_start_order_puts_the_scheduler_after_the_api_server(settings):
    names = [c.name for c in stack.components(settings, stack.StackOptions())]
    assert names == ["mlflow", "api-server", "dag-processor", "triggerer", "scheduler",
                     "log-janitor"]


@pytest.mark.parametrize("days", [pytest.param(None, id="default-15"),
                                  pytest.param("0", id="forever"), pytest.param("30", id="30")])
def test_the_log_janitor_cleans_airflows_log_folder_without_the_stacks_secrets(settings,
                                                                               monkeypatch, days):
    if days is None:
        monkeypatch.delenv("ARF_LOG_RETENTION_DAYS", raising=False)
    else:
        monkeypatch.setenv("ARF_LOG_RETENTION_DAYS", days)
    secrets = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    for name in secrets:  # the session's Airflow settings: not what `arf up` is started with
        monkeypatch.delenv(name, raising=False)
    comps = _by_name(stack.components(settings, stack.StackOptions()))
    janitor = comps["log-janitor"]
    assert janitor.command[-3:] == ["--retention-days", days or "15",
                                    str(settings.home / "airflow" / "logs")]
    assert janitor.ready() and janitor.port is None
    for name in secrets:
        assert name in comps["scheduler"].env and name not in janitor.env


def test_a_bad_log_retention_stops_the_stack_before_it_is_built(settings, monkeypatch):
    monkeypatch.setenv("ARF_LOG_RETENTION_DAYS", "2w")
    with pytest.raises(ArfError, match=r"^ARF_LOG_RETENTION_DAYS='2w' is not a number of days"):
        stack.components(settings, stack.StackOptions())


def test_a_public_host_gets_real_users_with_a_generated_password_never_all_admins(settings):
    comps = _by_name(stack.components(settings, stack.StackOptions(host="0.0.0.0")))
    env = comps["api-server"].env
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
    passwords = settings.home / "airflow" / "passwords.json"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(passwords)
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600
    password = json.loads(passwords.read_text())["admin"]
    assert len(password) >= 20
    # Generated once: later starts keep it (and do not print it again).
    assert stack.ensure_public_password(settings) == (passwords, None)
    assert json.loads(passwords.read_text())["admin"] == password
    # MLflow has no authentication here: it stays on loopback even then.
    mlflow = comps["mlflow"].command
    assert mlflow[mlflow.index("--host") + 1] == "127.0.0.1"


def test_loopback_keeps_all_admins(settings):
    env = stack.stack_environment(settings, stack.StackOptions(host="127.0.0.1"))
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "True"
    assert not (settings.home / "airflow" / "passwords.json").exists()


@pytest.mark.parametrize("host, public", [pytest.param("127.0.0.1", False, id="ipv4-loopback"),
                                          pytest.param("::1", False, id="ipv6-loopback"),
                                          pytest.param("localhost", False, id="localhost"),
                                          pytest.param("0.0.0.0", True, id="any-ipv4"),
                                          pytest.param("192.168.1.5", True, id="lan")])
def test_which_hosts_are_public(host, public):
    assert stack.StackOptions(host=host).public is public


def test_a_host_name_is_a_clear_error():
    with pytest.raises(ArfError, match=r"--host 'myhost' is not an IP address.*0\.0\.0\.0"):
        stack.StackOptions(host="myhost").public


def test_steps_track_through_the_mlflow_server_which_owns_the_store(settings):
    comps = _by_name(stack.components(settings, stack.StackOptions(mlflow_port=15000)))
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert comps[name].env["ARF_TRACKING_URI"] == "http://127.0.0.1:15000"
        assert comps[name].env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:15000"
    # The store's URI may hold the database password: never in argv (ps, the supervisor log).
    assert comps["mlflow"].env["MLFLOW_BACKEND_STORE_URI"] == settings.tracking_uri
    assert settings.tracking_uri not in " ".join(comps["mlflow"].command)


@pytest.mark.parametrize("cpus, parallelism, workers", [pytest.param(2, 4, 1, id="2-cores"),
                                                        pytest.param(8, 16, 4, id="8-cores"),
                                                        pytest.param(64, 128, 4, id="64-cores")])
def test_worker_counts_follow_the_core_count(cpus, parallelism, workers):
    size = stack.sizing(cpus)
    assert size["parallelism"] == parallelism  # Airflow's default: 32 on any machine
    assert size["api_workers"] == workers and size["mlflow_workers"] == workers


def test_the_stack_is_sized_to_this_machine_unless_the_user_says_otherwise(settings,
                                                                          monkeypatch):
    comps = _by_name(stack.components(settings, stack.StackOptions()))
    expected = stack.sizing()
    assert comps["scheduler"].env["AIRFLOW__CORE__PARALLELISM"] == str(expected["parallelism"])
    assert comps["api-server"].env["AIRFLOW__API__WORKERS"] == str(expected["api_workers"])
    mlflow = comps["mlflow"].command
    assert mlflow[mlflow.index("--workers") + 1] == str(expected["mlflow_workers"])
    monkeypatch.setenv("AIRFLOW__CORE__PARALLELISM", "7")
    env = stack.stack_environment(settings, stack.StackOptions())
    assert env["AIRFLOW__CORE__PARALLELISM"] == "7"


def test_tasks_wait_for_a_slow_api_server_instead_of_failing_before_they_start(settings):
    """Airflow's 5 s Execution API timeout failed tasks on a loaded 2-core machine (the retry of
    the non-idempotent 'running' call conflicts): the stack's tasks get 30 s, and the setting
    reaches the scheduler, whose LocalExecutor workers run the task supervisors."""
    comps = _by_name(stack.components(settings, stack.StackOptions()))
    assert comps["scheduler"].env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"] == "30"


def test_a_dead_supervisors_components_are_stopped_by_the_next_up(tmp_path):
    """`arf up` after a crashed supervisor: its components still hold the ports; they are
    stopped (a pid that was reused by another program is left alone)."""
    import subprocess
    import sys
    import time

    import psutil

    run = tmp_path / "run"
    run.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                start_new_session=True)
    try:
        created = psutil.Process(orphan.pid).create_time()
        (run / "state.json").write_text(json.dumps({"supervisor": {"pid": 1}, "components": [
            {"name": "scheduler", "pid": orphan.pid, "started_at": created},
            # recorded long before the process with this pid started: not ours any more
            {"name": "api-server", "pid": stranger.pid, "started_at": created - 3600}]}))
        assert stack._stop_leftovers(run) == ["scheduler"]
        assert orphan.wait(timeout=30) is not None
        time.sleep(0.5)
        assert stranger.poll() is None
        assert not (run / "state.json").exists()
    finally:
        for proc in (orphan, stranger):
            proc.kill()
            proc.wait()


def test_down_stops_a_database_started_detached(tmp_path, monkeypatch):
    """`arf demo` / `arf airflow` leave their PostgreSQL running; `make down` (and `make clean`
    after it) must stop it rather than delete a home under a live server."""
    from arf_training.postgres import EmbeddedPostgres

    monkeypatch.setenv("ARF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ARF_DB", raising=False)
    server = EmbeddedPostgres(tmp_path / "home")
    server.ensure_running()
    try:
        pid = server.server_pid()
        assert pid is not None
        assert "postgres (detached)" in stack.down()
        assert server.server_pid() is None
    finally:
        server.stop()
        import shutil

        shutil.rmtree(server.root, ignore_errors=True)


def test_the_api_server_is_ready_once_the_execution_api_answers_too(settings):
    """The Execution API's app is built on its first request (80 s at load 32 on 2 cores, 0.5 s
    after): readiness makes that request, so the first task does not (it failed on it)."""
    import http.server
    import threading

    served = {"/api/v2/version"}

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path in served else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        opts = stack.StackOptions(api_port=server.server_address[1])
        api = _by_name(stack.components(settings, opts))["api-server"]
        assert not api.ready()
        served.add("/execution/health")
        assert api.ready()
    finally:
        server.shutdown()
