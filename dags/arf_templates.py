"""One Airflow DAG per training template in config_templates/ (plus `arf_evaluate`).

Invalid templates are reported by `arf_template_errors.py` as an import error, so that a broken
template is visible in the UI without hiding the DAGs of the valid ones.
"""

from arf_training.factory import build_dags

globals().update(build_dags())
