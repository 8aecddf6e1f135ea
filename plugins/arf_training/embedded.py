"""The embedded default: Airflow + MLflow + data hub on one machine, state under `.arf/`.

`environment()` is the single definition of how Airflow is configured here; `arf airflow ...`,
`arf demo`, `arf up` and the tests all use it. `ensure_migrated()` migrates the metadata DB on
first use. The supervisor of `arf up` lives in `arf_training.stack`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from arf_training.errors import ArfError
from arf_training.settings import (REPO_ROOT, ArfSettings, database_backend, templates_dir,
                                   venv_bin)


def environment(settings: ArfSettings | None = None, *, api_port: int = 8080,
                start_database: bool = True) -> dict[str, str]:
    """The process environment for every Airflow command of the embedded default.

    With the PostgreSQL backend (the default, see `settings.database_backend`) the home's
    server is started detached unless it runs already; a supervisor that runs the server itself
    passes ``start_database=False``."""
    settings = settings or ArfSettings.from_env()
    if start_database and database_backend() == "postgres":
        from arf_training.postgres import EmbeddedPostgres

        EmbeddedPostgres(settings.home).ensure_running()
    metadata_db = settings.database_uri("airflow")
    home = settings.home
    airflow_home = home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    secret_file = _jwt_secret(airflow_home)
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
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
        # psycopg 3 is sync and async; Airflow would otherwise derive asyncpg for postgresql.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": _async_uri(metadata_db),
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


def _jwt_secret(airflow_home: Path) -> Path:
    """`<airflow home>/jwt_secret`, created once: 0600 from its first byte (never readable by
    others, not even until a chmod), and one secret for racing creators (`arf up` beside
    `arf airflow ...` on a fresh home), since every component must sign and verify task
    tokens with the same one."""
    secret_file = airflow_home / "jwt_secret"
    if not secret_file.exists():
        tmp = airflow_home / f".jwt_secret.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
        try:
            os.link(tmp, secret_file)  # fails if another process won the race: theirs stays
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if secret_file.stat().st_mode & 0o077:  # one an older version left readable
        secret_file.chmod(0o600)
    return secret_file


def _async_uri(sync_uri: str) -> str:
    """Airflow's async engine URL for `sync_uri` (aiosqlite for SQLite, as Airflow derives)."""
    if sync_uri.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + sync_uri.split(":", 1)[1]
    return sync_uri


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
    env = env or environment()
    airflow(["db", "migrate"], env=env, capture=True)
    _migration_stamp(env).write_text(_migration_key(env))


def ensure_migrated(env: dict[str, str] | None = None) -> bool:
    """Migrate the metadata DB unless this Airflow version already migrated this database
    (a fresh `ARF_HOME` works without `arf airflow db migrate`); True if it migrated now."""
    env = env or environment()
    stamp = _migration_stamp(env)
    conn = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    db_file = Path(conn.removeprefix("sqlite:///")) if conn.startswith("sqlite:///") else None
    current = (stamp.exists() and stamp.read_text() == _migration_key(env)
               and (db_file is None or db_file.exists()))
    if not current:
        migrate(env)
    return not current


def _migration_stamp(env: dict[str, str]) -> Path:
    return Path(env["AIRFLOW_HOME"]) / ".arf-migrated"


def _migration_key(env: dict[str, str]) -> str:
    """Airflow version + database, hashed (the database URI may carry a password)."""
    import hashlib
    from importlib.metadata import version

    key = f"{version('apache-airflow-core')} {env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}"
    return hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The Airflow components (started by the supervisor of `arf up`, see `arf_training.stack`)

def airflow_components(api_port: int, host: str = "127.0.0.1") -> dict[str, list[str]]:
    """The long-running Airflow 3 components of one deployment.

    `--skip-serve-logs`: the scheduler's and the triggerer's log servers bind every interface
    (Airflow has no setting for their address); on one machine the api-server reads task logs
    from the local files instead.
    """
    airflow_bin = venv_bin("airflow")
    return {
        "api-server": [airflow_bin, "api-server", "--host", host, "--port", str(api_port)],
        "scheduler": [airflow_bin, "scheduler", "--skip-serve-logs"],
        "dag-processor": [airflow_bin, "dag-processor"],
        "triggerer": [airflow_bin, "triggerer", "--skip-serve-logs"],
    }
