"""A training job (= an Airflow DAG run) as the adapters show it, and its id `TEMPLATE/RUN_ID`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arf_training.client_errors import BadInput
from arf_training.limits import MAX_JOB_ID, check_length, check_name, quote

FINISHED = frozenset({"success", "failed"})
# Airflow DAG run state -> the job status of the seed API (protos/arf/cloud/v1/training.proto).
STATUS = {"queued": "PENDING", "running": "RUNNING", "success": "SUCCEEDED", "failed": "FAILED"}
CANCEL_NOTE = "cancelled via arf"


@dataclass
class Job:
    """One training job (= DAG run) as the adapters show it."""

    template: str
    run_id: str
    state: str
    display_name: str = ""
    note: str = ""
    conf: dict[str, Any] = field(default_factory=dict)
    queued_at: str | None = None
    start_date: str | None = None
    end_date: str | None = None
    tasks: dict[str, str] = field(default_factory=dict)
    model_version: str | None = None
    model_name: str | None = None

    @property
    def job_id(self) -> str:
        return f"{self.template}/{self.run_id}"

    @property
    def status(self) -> str:
        return STATUS.get(self.state, "PENDING")

    @property
    def cancelled(self) -> bool:
        return self.state == "failed" and self.note.endswith(CANCEL_NOTE)

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "template": self.template, "run_id": self.run_id,
                "state": self.state, "status": self.status, "cancelled": self.cancelled,
                "display_name": self.display_name, "conf": self.conf,
                "queued_at": self.queued_at, "start_date": self.start_date,
                "end_date": self.end_date, "tasks": self.tasks,
                "model_name": self.model_name, "model_version": self.model_version}


def split_job_id(job_id: str) -> tuple[str, str]:
    check_length("job_id", job_id, MAX_JOB_ID)
    template, sep, run_id = job_id.partition("/")
    if not sep or not template or not run_id:
        raise BadInput(f"job id {quote(job_id)} is not of the form TEMPLATE/RUN_ID (as printed by "
                       "`arf training start` and `arf training list`)", field="job_id")
    check_name("job_id", template)
    check_name("job_id", run_id)
    return template, run_id
