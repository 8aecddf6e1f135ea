"""One exception root for the Airflow side; each subclass names a kind of failure."""

from __future__ import annotations

from dataclasses import dataclass

BAD_INPUT_EXIT = 2
"""A step's exit code for bad input (job spec, query, hyperparameter): retrying cannot help.
The container side defines the same code (arf_trainer.errors); this side must not import it."""

SKIP_EXIT = 99
"""A step's exit code for "nothing to do" (prepare with dataset.skip_if_empty and no new rows):
the task is skipped, and so are the later ones; the run is not failed. The container side
defines the same code (arf_trainer.errors.SKIP_EXIT)."""


class ArfError(Exception):
    """Root of every error arf-training raises on purpose on the Airflow side."""


@dataclass(frozen=True)
class TemplateIssue:
    """One problem in one template file, located as precisely as the YAML allows."""

    file: str
    message: str
    field: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class TemplateError(ArfError):
    """A template file is invalid. Carries every issue found, not only the first."""

    def __init__(self, issues: list[TemplateIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class ConfError(ArfError):
    """A trigger conf (UI form, REST API, CLI --set) is invalid for the template's Params."""


class StepFailed(ArfError):
    """A step process (local) or pod/job (Kubernetes) ended unsuccessfully.

    `retryable` is False when the step said its input was bad (exit code 2): a retry would fail
    the same way, so the task fails at once instead of burning its retries.
    """

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class StepTimeout(StepFailed):
    """A step ran past its template timeout and was stopped."""


class StepSkipped(ArfError):
    """A step exited with `SKIP_EXIT`: it found nothing to do. Operators turn it into
    AirflowSkipException (see `arf_training.runtime.fail_fast_on_bad_input`)."""
