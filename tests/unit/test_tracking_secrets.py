"""A tracking URI's password never reaches a step's error output (task logs).

The embedded stack hands steps a store URI with the database password in it
(`postgresql+psycopg://arf:...@/mlflow?host=...`), and MLflow's own messages quote the URL they
called, credentials included: `arf-trainer lineage` printed `API request to http://u:s3cret@...`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from arf_trainer import tracking
from arf_trainer.errors import RegistryError


@pytest.mark.parametrize("uri, shown", [
    ("postgresql+psycopg://arf:s3cret@/mlflow?host=/tmp/arf-pg", "postgresql+psycopg://***@/mlflow"),
    ("http://u:p%40ss@mlflow:5000/x?token=t0k", "http://***@mlflow:5000/x"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/m.db", "sqlite:////tmp/m.db"),
])
def test_shown_uri_drops_user_info_and_query(uri: str, shown: str) -> None:
    assert tracking.shown_uri(uri) == shown


@pytest.fixture
def _restore_mlflow_uris():
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.mark.usefixtures("_restore_mlflow_uris")
def test_an_mlflow_failure_names_the_store_without_its_password() -> None:
    uri = "http://arf:s3cret%21@127.0.0.1:9"  # nothing listens on port 9
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    try:
        with pytest.raises(RegistryError) as caught:
            with tracking.mlflow_errors(uri, "read run abc"):
                tracking.configure(uri).get_run("abc")
    finally:
        for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            os.environ.pop(name, None)
    message = str(caught.value)
    assert "MLflow at http://***@127.0.0.1:9 failed to read run abc" in message
    assert "s3cret" not in message and "127.0.0.1:9" in message


def test_the_cli_error_line_hides_the_password_mlflow_quoted() -> None:
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-m", "arf_trainer.cli", "lineage", "abc",
                          "--tracking-uri", "http://u:s3cret@127.0.0.1:9"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "not found at http://***@127.0.0.1:9" in out.stderr
    assert "API request to http://u:***@127.0.0.1:9" in out.stderr  # MLflow's own words
    assert "s3cret" not in out.stderr + out.stdout
