"""Reading a job's logs and waiting for it: the part of `client.TrainingClient` that follows
a running job (`arf training logs --follow`, `arf training start --wait`, the gRPC streams).

A mixin: it calls the client's `status`, `_call` and `_api`.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterator

from arf_training.client_errors import BadInput, ClientError, NotFound, airflow_client
from arf_training.client_jobs import FINISHED, Job, split_job_id
from arf_training.limits import check_name, quote

PROGRESS_LINE = re.compile(r"epoch \d+/\d+ \| step \d+/\d+")
# Reads of a finished job's train log before `wait` returns without its last progress lines.
FINAL_LOG_TRIES = 3


class JobLogs:
    """Log lines and progress of jobs (`TrainingClient` mixes it in)."""

    def log_chunk(self, template: str, run_id: str, task_id: str, try_number: int,
                  token: str | None = None) -> tuple[list[str], str | None]:
        """New log lines of one task try since `token`, and the token to continue from."""
        ac = airflow_client()
        resp = self._call(lambda: ac.TaskInstanceApi(self._api()).get_log(
            template, run_id, task_id, try_number, token=token, accept="application/json"),
            what=f"reading the log of {task_id}", not_found=f"no log of {task_id} yet")
        content = getattr(resp.content, "actual_instance", resp.content) or []
        lines = []
        for item in content if isinstance(content, list) else [content]:
            event = getattr(item, "event", item)
            if isinstance(event, str):
                lines.extend(event.splitlines() or [""])
        return lines, resp.continuation_token

    def logs(self, job_id: str, *, task: str | None = None, follow: bool = False,
             poll_s: float = 2.0, stop: Any = None) -> Iterator[tuple[str, str]]:
        """(task_id, line) of every task's latest try; with `follow`, until the job finishes or
        `stop` (a `threading.Event`: the gRPC caller left) is set."""
        template, run_id = split_job_id(job_id)
        check_name("task", task)
        ac = airflow_client()
        offsets: dict[tuple[str, int], int] = {}
        while True:
            job = self.status(job_id, tasks=False)
            tis = self._call(lambda: ac.TaskInstanceApi(self._api()).get_task_instances(
                template, run_id), what="reading tasks").task_instances
            if task and task not in {ti.task_id for ti in tis}:
                raise BadInput(f"job {job_id} has no task {quote(task)}; its tasks: "
                               f"{', '.join(ti.task_id for ti in tis)}", field="task")
            for ti in tis:
                if (task and ti.task_id != task) or not ti.try_number:
                    continue
                key = (ti.task_id, ti.try_number)
                try:
                    lines, _ = self.log_chunk(template, run_id, ti.task_id, ti.try_number)
                except NotFound:
                    continue
                for line in lines[offsets.get(key, 0):]:
                    yield ti.task_id, line
                offsets[key] = len(lines)
            if not follow or job.state in FINISHED:
                return
            if stop is None:
                time.sleep(poll_s)
            elif stop.wait(poll_s):  # the caller left while we waited
                return

    def wait(self, job_id: str, *, on_task: Callable[[str, str], None] | None = None,
             on_line: Callable[[str, str], None] | None = None, poll_s: float = 2.0,
             timeout_s: float | None = None) -> Job:
        """Poll until the job finishes; report task state changes and the train step's progress
        lines as they appear. Returns the final `Job` (with the model version on success)."""
        template, run_id = split_job_id(job_id)
        seen: dict[str, str] = {}
        shown: set[str] = set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.status(job_id, tasks=True)
            for task_id, state in job.tasks.items():
                if seen.get(task_id) != state:
                    seen[task_id] = state
                    if on_task:
                        on_task(task_id, state)
            if on_line and job.tasks.get("train") in ("running", "success", "failed"):
                tries = FINAL_LOG_TRIES if job.state in FINISHED else 1  # its last chance
                while not self._progress(job, shown, on_line) and (tries := tries - 1):
                    time.sleep(1.0)
            if job.state in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {job_id} still {job.state} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def _progress(self, job: Job, shown: set[str],
                  on_line: Callable[[str, str], None]) -> bool:
        """Report the train log's progress lines not reported yet (by content: a running
        task's log, served by the worker, and the finished one's file need not line up, so
        an offset could skip the last epochs); False when the log could not be read."""
        try:
            lines, _ = self.log_chunk(job.template, job.run_id, "train",
                                      self._try(job, "train"))
        except ClientError:
            return False
        for line in lines:
            found = PROGRESS_LINE.search(line)
            if found:  # from "epoch ..." on: the logger's prefix is noise here
                text = line[found.start():].strip()
                if text not in shown:
                    shown.add(text)
                    on_line("train", text)
        return True

    def _try(self, job: Job, task_id: str) -> int:
        ac = airflow_client()
        ti = self._call(lambda: ac.TaskInstanceApi(self._api()).get_task_instance(
            job.template, job.run_id, task_id), what=f"reading task {task_id}")
        return max(int(ti.try_number or 1), 1)
