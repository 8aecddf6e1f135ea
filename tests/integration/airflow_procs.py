"""A real Airflow 3 deployment for tests and benchmarks: api-server, scheduler, dag-processor and
triggerer (LocalExecutor) on a free localhost port, serving this repo's DAGs.

It has its own Airflow home (metadata DB, logs) under `<arf home>/stack-<port>`, so that it never
shares a SQLite DB with the `airflow dags test` runs of other tests, and the session's data hub
and MLflow store. Authentication is real: the simple auth manager with one admin user and a known
password (no all-admins shortcut), so clients go through `/auth/token`.

`stop()` stops every process group it started (SIGTERM, then SIGKILL), also after a failure;
the pytest fixture in `conftest.py` calls it in a `finally`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from arf_training.embedded import airflow_components, environment
from arf_training.procs import start_process, stop_groups
from arf_training.settings import ArfSettings, venv_bin

USERNAME = "arf-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AirflowProcesses:
    """Start with `start()`, always `stop()`. `url`, `username`, `password` for clients."""

    settings: ArfSettings
    port: int = field(default_factory=free_port)
    password: str = "arf-test-password"
    username: str = USERNAME
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:
        return self.settings.home

    def env(self) -> dict[str, str]:
        env = environment(self.settings, api_port=self.port)
        passwords = self.home / "airflow" / "passwords.json"
        passwords.write_text(json.dumps({self.username: self.password}))
        env.update({
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            # New and changed DAG files within seconds (the default is 300 s).
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",  # step output is logged at INFO
            "AIRFLOW__API__WORKERS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        })
        return env

    def start(self, timeout_s: float = 180) -> "AirflowProcesses":
        env = self.env()
        log_dir = self.home / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([venv_bin("airflow"), "db", "migrate"], env=env, check=True,
                       capture_output=True, timeout=600)
        self.procs = {name: start_process(command, env, log_dir / f"{name}.log")
                      for name, command in airflow_components(self.port).items()}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                self.stop()
                raise RuntimeError(f"Airflow component(s) exited early: {dead}; logs in {log_dir}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/version", timeout=2):
                    return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"the api-server did not answer within {timeout_s} s; see {log_dir}")

    def wait_for_dags(self, dag_ids: list[str], timeout_s: float = 180) -> None:
        """Until the dag-processor has parsed these DAGs (the REST API knows them)."""
        from arf_training.client import NotFound, TrainingClient

        client = TrainingClient(self.client_settings())
        deadline = time.monotonic() + timeout_s
        missing = list(dag_ids)
        while time.monotonic() < deadline:
            for dag_id in list(missing):
                try:
                    client.param_schemas(dag_id)
                    missing.remove(dag_id)
                except NotFound:
                    pass
            if not missing:
                return
            time.sleep(2)
        raise RuntimeError(f"DAGs {missing} were not parsed within {timeout_s} s; see "
                           f"{self.home / 'logs' / 'dag-processor.log'}")

    def client_settings(self):
        from arf_training.client import ClientSettings

        return ClientSettings(url=self.url, username=self.username, password=self.password)

    def client_env(self) -> dict[str, str]:
        """Environment for an `arf training ...` subprocess pointed at this deployment."""
        import os

        env = dict(os.environ)
        env.update({"ARF_AIRFLOW_URL": self.url, "ARF_AIRFLOW_USERNAME": self.username,
                    "ARF_AIRFLOW_PASSWORD": self.password})
        return env

    def stop(self) -> list[str]:
        # Short grace: nothing of a test deployment needs a clean shutdown, and SIGKILL follows.
        stopped = stop_groups({n: p.pid for n, p in self.procs.items()}, grace_s=5)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = {}
        return stopped
