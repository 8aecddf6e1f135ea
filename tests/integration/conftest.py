"""Fixtures shared by the integration tests that need a running Airflow."""

from __future__ import annotations

import pytest

from airflow_procs import AirflowProcesses


@pytest.fixture(scope="session")
def airflow_stack(embedded, arf_home):
    """ONE real Airflow deployment (api-server, scheduler, dag-processor, triggerer) for every
    CLI / gRPC / browser test of the session; every process it started is stopped at the end,
    also when a test fails. Uses the session's seeded data hub and MLflow store."""
    from arf_training.settings import ArfSettings

    base = ArfSettings.from_env()
    home = arf_home / "stack"
    home.mkdir(exist_ok=True)
    stack = AirflowProcesses(ArfSettings(home=home, tracking_uri=base.tracking_uri,
                                         datahub_uri=base.datahub_uri,
                                         artifact_root=base.artifact_root))
    stack.start()
    try:
        stack.wait_for_dags(["digits_smoke", "reach_bc"])
        yield stack
    finally:
        stopped = stack.stop()
        assert set(stopped) == {"api-server", "scheduler", "dag-processor", "triggerer"}
