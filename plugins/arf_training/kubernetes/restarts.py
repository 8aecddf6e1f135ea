"""A single-pod step that asks to be resumed gets a new pod, within the same task try.

Exit 75 means "preempted, resume me" (`arf_training.custom_launch`). The local backend starts
such a step again, and a PyTorchJob replica is restarted by the Training Operator (the replica's
wrapper turns it into 143 under `restartPolicy: ExitCode`, `arf_training.kubernetes.jobs`); in
neither case is an Airflow retry spent. A bare Pod has no such policy: its `restartPolicy` is
Never, because Airflow owns the retries of real failures (OnFailure would restart a crash forever,
and a pod on a reclaimed spot node goes away with the node anyway). So the pod operator does it:
when the step container of a finished pod exited 75, the same step is rendered as a new pod (the
next *start*: a name of its own and the `arf.dev/start` label) and the task waits for that one,
in the same try, with the same workspace and checkpoints.

Not a preemption, although the step may exit 75 on the SIGTERM it got: the kubelet stopping the
pod at its `activeDeadlineSeconds` (status reason DeadlineExceeded: the step's timeout) and the
task being killed (the caller checks that). Starts are bounded as the local backend's are, and
share the step's timeout: a new pod's deadline is what is left of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from arf_training.custom_launch import PREEMPTED_EXIT
from arf_training.kubernetes.ownership import resource_name
from arf_training.kubernetes.pod import container_exit_code
from arf_training.stepspec import RunIdentity

START_LABEL = "arf.dev/start"
MAX_RESTARTS = 100  # as the local backend's MAX_PREEMPTIONS
DEADLINE_EXCEEDED = "DeadlineExceeded"  # a pod's status.reason after activeDeadlineSeconds


def next_start(pod: Any) -> int | None:
    """The number of the start that resumes `pod` (a finished V1Pod of a step), or None when
    it was not preempted: its step container did not exit 75, it ran out of its deadline, or
    the starts are used up."""
    if pod is None or container_exit_code(pod) != PREEMPTED_EXIT:
        return None
    if getattr(getattr(pod, "status", None), "reason", None) == DEADLINE_EXCEEDED:
        return None
    labels = getattr(getattr(pod, "metadata", None), "labels", None) or {}
    start = int(labels.get(START_LABEL, "0")) + 1
    return start if start <= MAX_RESTARTS else None


def restarted(pod: dict[str, Any], identity: RunIdentity, start: int,
              elapsed_s: float | None) -> dict[str, Any]:
    """`pod` (a step's rendered first pod) as start number `start`: its own deterministic name
    (the earlier pods are kept, like any finished step pod), the start label, and as deadline
    what is left of the step's timeout after `elapsed_s` (None: unknown, the whole timeout)."""
    name = resource_name(dataclasses.replace(identity, task_id=f"{identity.task_id}:start-{start}"))
    pod["metadata"]["name"] = name
    pod["metadata"]["labels"].update({"app.kubernetes.io/instance": name, START_LABEL: str(start)})
    if elapsed_s is not None:
        deadline = pod["spec"]["activeDeadlineSeconds"]
        pod["spec"]["activeDeadlineSeconds"] = max(1, int(deadline - elapsed_s))
    return pod
