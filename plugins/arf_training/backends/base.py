"""The backend contract.

A backend turns one step of one template into an Airflow operator. At task run time that
operator must:

1. build the step's `StepSpec` with `arf_training.stepspec.build_step_spec` (this validates the
   trigger conf, so a bad conf fails the first task before anything runs);
2. run `spec.command` with exactly `spec.env` (+ its own plumbing such as ARF_JOB_SPEC and the
   rank variables of torchrun/PyTorchJob) and `spec.job_spec`, honouring `spec.resources`,
   `spec.nodes` x `spec.procs_per_node` and `spec.timeout_s`;
3. stream the step's output into the task log, fail the task with the tail of that output when
   the step fails, and stop every process/pod of the step when the task is killed;
4. return the step's result JSON (the file at ARF_RESULT_PATH) as the task's XCom value.

Retries re-run the same step with the same workspace (keyed by dag_id and run_id); steps are
written to resume or reuse what a previous try completed.

A template with an `hpo:` section also needs `trial_task`: the train step mapped over the
study's trials (`Operator.partial(...).expand(trial=...)`), each instance honouring the
contract above with `build_step_spec(..., trial=trial)`; instances of one task must not share
the names of what they create (Pods, jobs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator

    from arf_training.templates import LoadedTemplate, TrainingTemplate


class Backend(ABC):
    """Creates the operator that runs one step. See the module docstring for the contract."""

    name: ClassVar[str]

    @abstractmethod
    def step_task(self, *, task_id: str, loaded: "LoadedTemplate", step: str,
                  **operator_kwargs: Any) -> "BaseOperator":
        """An operator that runs `step` of `loaded` (prepare, train or register)."""

    def trial_task(self, *, task_id: str, loaded: "LoadedTemplate", trials: Any,
                   **operator_kwargs: Any) -> Any:
        """The mapped train step of an `hpo:` template: one task instance per trial.

        `trials` is the ask task's output (a list of ``{"number", "params", "label"}``); each
        mapped instance runs the train step like `step_task` does, with `trial=` one element
        (passed on to `build_step_spec`), so it trains that trial in its own folder. Returns
        the mapped operator (``Operator.partial(...).expand(trial=trials)``).
        """
        raise NotImplementedError(f"backend {self.name!r} cannot run hyperparameter-search "
                                  "trials (no trial_task)")

    @abstractmethod
    def evaluate_task(self, *, task_id: str, templates: dict[str, "LoadedTemplate"],
                      **operator_kwargs: Any) -> "BaseOperator":
        """An operator that evaluates the model versions named by the triggering Asset events
        (or by the run's `model_name`/`model_version` params). `templates` maps model names to
        the template that trains them (its `evaluation` section says how)."""

    @staticmethod
    def evaluable(templates: list["LoadedTemplate"]) -> dict[str, "LoadedTemplate"]:
        """Model name -> the template whose `evaluation` section scores its versions.

        A fine-tune registers under the name of the model it starts from (`load_folder` checks
        that both evaluate alike); the template that trains the model from scratch is the one
        named here, whichever file comes first.
        """
        from arf_training.templates import fine_tunes_own_model

        chosen: dict[str, "LoadedTemplate"] = {}
        for t in sorted(templates, key=lambda t: fine_tunes_own_model(t.template)):
            if t.template.evaluation:
                chosen.setdefault(t.template.model.name, t)
        return chosen

    def describe(self, template: "TrainingTemplate") -> str:
        return self.name
