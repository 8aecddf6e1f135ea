"""The embedded default: Airflow + MLflow + data hub on one machine, state under `.arf/`.

`environment()` is the single definition of how Airflow is configured here; `arf airflow ...`,
`arf demo`, `arf up` and the tests all use it. `up()`/`down()` start and stop the long-running
components with pid files, and stop each process group (Airflow's own `standalone` leaves its
children running on SIGTERM).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from arf_training.errors import ArfError
from arf_training.settings import REPO_ROOT, ArfSettings, templates_dir, venv_bin


def environment(settings: ArfSettings | None = None, *, api_port: int = 8080) -> dict[str, str]:
    """The process environment for every Airflow command of the embedded default."""
    settings = settings or ArfSettings.from_env()
    home = settings.home
    airflow_home = home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    secret_file = airflow_home / "jwt_secret"
    if not secret_file.exists():
        # Every component must sign and verify task tokens with the same secret.
        secret_file.write_text(secrets.token_urlsafe(32))
        secret_file.chmod(0o600)
    env = dict(os.environ)
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": env.get(
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home}/airflow.db",
        "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text().strip(),
        "AIRFLOW__API__PORT": str(api_port),
        # New templates show up within seconds instead of Airflow's default 5 minutes.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": env.get(
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL", "15"),
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "ARF_HOME": str(home),
        "ARF_TEMPLATES_DIR": str(templates_dir()),
        "ARF_TRACKING_URI": settings.tracking_uri,
        "ARF_DATAHUB_URI": settings.datahub_uri,
        "ARF_ARTIFACT_ROOT": settings.artifact_root,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
    })
    return env


def airflow(args: list[str], *, env: dict[str, str] | None = None, check: bool = True,
            capture: bool = False) -> subprocess.CompletedProcess:
    """Run one `airflow` CLI command in the embedded environment."""
    proc = subprocess.run([venv_bin("airflow"), *args], env=env or environment(), text=True,
                          capture_output=capture)
    if check and proc.returncode != 0:
        detail = (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:] if capture else ""
        raise ArfError(f"`airflow {' '.join(args)}` failed with exit code {proc.returncode}"
                       + (f":\n{detail}" if detail else ""))
    return proc


def migrate(env: dict[str, str] | None = None) -> None:
    airflow(["db", "migrate"], env=env, capture=True)


# ---------------------------------------------------------------------------------------------
# make up / make down

def _run_dir(settings: ArfSettings) -> Path:
    path = settings.home / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_http(url: str, timeout: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (localhost only)
                if resp.status < 500:
                    return True
        except OSError:
            time.sleep(1)
    return False


def airflow_components(api_port: int) -> dict[str, list[str]]:
    """The long-running Airflow 3 components of one deployment."""
    return {
        "api-server": [venv_bin("airflow"), "api-server", "--port", str(api_port)],
        "scheduler": [venv_bin("airflow"), "scheduler"],
        "dag-processor": [venv_bin("airflow"), "dag-processor"],
        "triggerer": [venv_bin("airflow"), "triggerer"],
    }


def start_processes(components: dict[str, list[str]], env: dict[str, str],
                    log_dir: Path) -> dict[str, subprocess.Popen]:
    """Start each command in its own process group (so that stopping it stops its children),
    output appended to `<log_dir>/<name>.log`."""
    started = {}
    for name, command in components.items():
        with open(log_dir / f"{name}.log", "ab") as log:
            started[name] = subprocess.Popen(command, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
    return started


def stop_process_groups(pids: dict[str, int], grace_s: float = 15) -> list[str]:
    """SIGTERM every process group, SIGKILL what is left after `grace_s`; names stopped.

    Airflow components do not stop their children on SIGTERM (task runners, gunicorn/uvicorn
    workers), hence whole groups, and SIGKILL for whatever lingers.
    """
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    stopped = []
    for name, pid in pids.items():
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.3)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:  # reap our own child, if it is one (no zombie left behind)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        stopped.append(name)
    return stopped


def up(api_port: int = 8080, mlflow_port: int = 5000) -> dict[str, str]:
    """Start api-server, scheduler, dag-processor, triggerer and an MLflow server."""
    settings = ArfSettings.from_env()
    run_dir = _run_dir(settings)
    env = environment(settings, api_port=api_port)
    for port in (api_port, mlflow_port):
        if not _port_free(port):
            raise ArfError(f"port {port} is already in use; stop what holds it (`make down` if it "
                           f"is a previous `make up`) or pass another port")
    migrate(env)
    components = {
        **airflow_components(api_port),
        "mlflow": [venv_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                   "--backend-store-uri", settings.tracking_uri,
                   "--default-artifact-root", settings.artifact_root, "--workers", "1"],
    }
    started = {}
    for name, proc in start_processes(components, env, run_dir).items():
        (run_dir / f"{name}.pid").write_text(str(proc.pid))
        started[name] = str(proc.pid)
    if not _wait_http(f"http://127.0.0.1:{api_port}/api/v2/version", 120):
        down()
        raise ArfError(f"the Airflow api-server did not answer within 120 s; see "
                       f"{run_dir / 'api-server.log'}")
    _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 60)
    return started


def down() -> list[str]:
    """Stop every process group `up` started (SIGTERM, then SIGKILL after 15 s)."""
    settings = ArfSettings.from_env()
    run_dir = _run_dir(settings)
    pids = {}
    for pid_file in sorted(run_dir.glob("*.pid")):
        try:
            pids[pid_file.stem] = int(pid_file.read_text())
        except ValueError:
            pass
    stopped = stop_process_groups(pids)
    for pid_file in run_dir.glob("*.pid"):
        pid_file.unlink(missing_ok=True)
    return stopped
