"""One exception root for the container side; each subclass names a kind of failure.

The CLI turns any `TrainerError` into a one-paragraph message on stderr and exit code 2
(bad input) or 1 (runtime failure), so the Airflow task log ends with the reason.
"""


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


class TrainingError(TrainerError):
    """Training could not run (bad hyperparameters for the recipe, empty data, ...)."""


class RegistryError(TrainerError):
    """The model registry (MLflow) refused or could not complete an operation."""


class EvaluationError(TrainerError):
    """Evaluation could not run (unknown environment, model cannot be loaded, ...)."""
