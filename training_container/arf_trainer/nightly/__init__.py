"""The nightly choice of a fine-tune template with a `nightly:` section: fine-tune the
champion on tonight's corrections, or retrain on the aggregate, within a compute budget.

`policy` is the pure rule (tested on known cases); `history` reads what it needs from MLflow
(the champion's evaluation, the nights already run and the samples they trained, the
from-scratch run that sizes the budget); `step` is `arf-trainer choose`, the first task of such
a DAG, whose result carries the trigger conf the rest of the run uses.
"""
