"""Container side of arf-training: the `arf-trainer` steps (prepare, train, register, evaluate).

Never imports Airflow. Runs identically as a local process (embedded default) and in a pod.
"""

__version__ = "0.1.0"
