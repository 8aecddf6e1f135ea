"""Everything one local step started, including what left its process group.

The local backend starts each node of a step as the leader of a new session, so that one
`killpg()` reaches torchrun and its workers. That misses a process that the step moved into a
session of its own (`setsid`, `start_new_session=True`: the federated launcher's Flower
processes, a framework's background service): a timeout or a killed task left it running,
still writing into the run's workspace beside the retry. And a leftover that kept the step's
stdout open (a process started in the background) kept the task waiting for the end of the
output until the step's timeout, then failed a step that had finished.

`StepTree` closes both: it snapshots the leaders' descendants while they run (pid + start
time, `arf_training.procs.Descendants`), so that a process which left the group is still found
when the step is stopped; and once a leader has exited, whatever still holds its output a
moment later is killed, as the end of a pod's main process ends the pod. The cgroup ceiling
(`ARF_LOCAL_MEMORY_CEILING=cgroup`) catches even a process started and detached between two
snapshots; this covers the default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from arf_training.procs import Descendants

if TYPE_CHECKING:
    from arf_training.stepspec import StepSpec

# What a step creates is its user's alone (0600 files, 0700 folders), whatever the worker's
# umask: a run's workspace holds the store URIs with the database password (custom-setup's
# custom_env.sh), the job spec with the trigger conf, the data and the weights.
STEP_UMASK = 0o077
SNAPSHOT_EVERY_S = 1.0
# After a leader exited: how long the rest of its output may take before what still holds the
# stream (a leftover in the background) is killed.
DRAIN_S = 2.0


def step_folder(spec: "StepSpec") -> Path:
    """The step's workspace made ready, its job spec written there (the path returned).

    First the run's folder is made this DagRun's, before anything is written there (files of
    a deleted run under the same run id are moved aside: arf_trainer.dag_run_dir); then the
    workspace is closed to others (custom_env.sh holds store URIs).
    """
    from arf_trainer.dag_run_dir import DIR_ENV, claim  # stdlib only

    run = spec.job_spec["run"]
    if spec.env.get(DIR_ENV):
        claim(Path(spec.env[DIR_ENV]), run.get("run_after"), dag_id=run["dag_id"],
              run_id=run["run_id"])
    private_dir(spec.workspace)
    path = spec.workspace / "jobspec" / f"{spec.step}-try{run['try_number']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.job_spec, indent=2, sort_keys=True))
    return path


def private_dir(path: Path) -> None:
    """Create `path` (and its parents) with the folder itself 0700; an existing one of ours
    that others could enter is closed to them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        path.chmod(0o700)


class StepTree:
    """The process groups of one start of a step and every descendant seen."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs
        self.descendants = [Descendants() for _ in procs]
        self._last = 0.0
        self._exited_at: dict[int, float] = {}

    def snapshot(self, force: bool = False) -> None:
        """Record the descendants of every live leader (at most once a second unless forced)."""
        now = time.monotonic()
        if not force and now - self._last < SNAPSHOT_EVERY_S:
            return
        self._last = now
        for proc, known in zip(self.procs, self.descendants):
            if proc.poll() is None:
                known.snapshot(proc.pid)

    def drain(self, open_nodes: set[int]) -> list[int]:
        """Kill what holds the output of a node whose leader exited more than DRAIN_S ago
        (the nodes killed now); their streams then end."""
        now = time.monotonic()
        stale = []
        for node in sorted(open_nodes):
            if self.procs[node].poll() is None:
                continue
            exited = self._exited_at.setdefault(node, now)
            if now - exited >= DRAIN_S:
                self.kill_node(node)
                stale.append(node)
        return stale

    def kill_node(self, node: int) -> None:
        """SIGKILL a node's process group and every descendant recorded for it (with theirs)."""
        try:
            os.killpg(self.procs[node].pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.descendants[node].kill(signal.SIGKILL)

    def kill_all(self) -> None:
        for node in range(len(self.procs)):
            self.kill_node(node)
