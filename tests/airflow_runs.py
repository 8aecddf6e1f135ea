"""Read DAG runs and task states from the session's Airflow metadata DB (after `airflow dags
test`), for the end-to-end tests of tests/integration and tests/k8s: the same readers `arf demo`
and the failure loop use."""

from __future__ import annotations

from arf_training.demo import latest_run, task_states

__all__ = ["latest_run", "task_states"]
