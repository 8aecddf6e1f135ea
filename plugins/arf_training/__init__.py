"""Airflow side of arf-training: templates, the DAG factory, backends and the `arf` CLI.

Nothing here imports torch, MLflow, DuckDB or pandas at module level: this package is imported
on every DAG parse.
"""

__version__ = "0.1.0"
