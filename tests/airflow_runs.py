"""Read DAG runs and task states from the session's Airflow metadata DB (after `airflow dags
test`), for the end-to-end tests of tests/integration and tests/k8s."""

from __future__ import annotations


def latest_run(dag_id: str):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)
                              .order_by(DagRun.id.desc()).limit(1)).first()
        session.expunge(run)
        return run


def task_states(dag_id: str, run_id: str) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id,
                                                         TaskInstance.run_id == run_id)).all()
        return {ti.task_id: str(ti.state) for ti in tis}
