"""Shows invalid training templates as an import error of this file in the Airflow UI.

Kept apart from arf_templates.py: an exception there would hide every template's DAG.
(The word DAG appears here so that Airflow's safe-mode scan parses this file.)
"""

from arf_training.factory import raise_template_issues

raise_template_issues()
