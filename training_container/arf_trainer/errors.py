"""One exception root for the container side; each subclass names a kind of failure.

The CLI turns any `TrainerError` into a one-paragraph message on stderr and its exit code, so
the Airflow task log ends with the reason:

===  ==============================================================================
0    done (the result JSON is written)
1    runtime failure (retrying may help)
2    bad input: job spec, query, hyperparameters (retrying will not help)
75   preempted: stopped on SIGTERM (see arf_trainer.preemption); the train step wrote a
     checkpoint if it had trained anything; rerun the same command to resume
99   nothing to do: prepare with dataset.skip_if_empty found no rows; the task and the
     later ones are skipped, the run is not failed (arf_training.errors.SKIP_EXIT)
===  ==============================================================================

Under torchrun the workers exit 75 but torchrun itself, once it was sent SIGTERM, exits 1
(it re-raises the signal as an exception after its workers stopped); so each rank of the train
step also writes its code to `$ARF_EXIT_DIR/rank-$RANK`, which the backends read.
"""

PREEMPTED_EXIT = 75
"""EX_TEMPFAIL from sysexits.h: "temporary failure, try again later"."""

SKIP_EXIT = 99
"""Nothing to do: the backends skip the task (and the tasks after it) instead of failing it.
The Airflow side defines the same code (arf_training.errors.SKIP_EXIT)."""


class TrainerError(Exception):
    """Root of every error `arf-trainer` raises on purpose."""

    exit_code = 1


class SpecError(TrainerError):
    """The job spec or the ARF_* environment is missing or malformed."""

    exit_code = 2


class QueryError(TrainerError):
    """The dataset query is not allowed, is invalid, or exceeded its limits."""

    exit_code = 2


class DataHubError(TrainerError):
    """A data hub table is missing, or a pinned table version does not exist."""

    exit_code = 2


class DecodeError(DataHubError):
    """A `dataset.decode` column holds a value that is not an image of the declared format and
    size (arf_trainer.datahub.decode)."""


class WorkspaceError(TrainerError):
    """The run's workspace folder cannot be claimed or written (arf_trainer.dag_run_dir)."""


class TrainingError(TrainerError):
    """Training could not run (bad hyperparameters for the recipe, empty data, ...)."""


class DataMismatchError(TrainingError):
    """The prepared rows cannot train the template's recipe as asked (a column's type, shape or
    values): bad input, which a retry would meet again."""

    exit_code = 2


class RegistryError(TrainerError):
    """The model registry (MLflow) refused or could not complete an operation."""


class EvaluationError(TrainerError):
    """Evaluation could not run (unknown environment, model cannot be loaded, ...)."""


class Preempted(TrainerError):
    """The step stopped on SIGTERM after saving what it had; rerunning it resumes."""

    exit_code = PREEMPTED_EXIT


class SpoolError(TrainerError):
    """The tracking spool in the run workspace is held by another process or is damaged."""


class NothingToDo(TrainerError):
    """The step found no work (no new rows in the data interval): skip, do not fail."""

    exit_code = SKIP_EXIT
