"""Who an ARF object on Kubernetes belongs to: its name, labels and annotations, and which DagRun
created it.

Names are deterministic per (dag_id, run_id, task_id, try_number) (`resource_name`): a task whose
`execute` runs again for the same try (a restart, a concurrent submission) finds its own job or
pod under that name instead of starting a second one, and the provider's KubernetesPodOperator
finds an earlier try's pod by the run's labels.

A run id does not name one DagRun for good, though. A run deleted in the UI can be triggered
again under its run id (a chosen id; a backfill re-creating a date), and the new DagRun's tasks
would find the deleted run's objects under their own names and adopt them: wait for a training
nobody asked for any more, or take over its finished outcome. So what a task creates also
carries `RUN_START_ANNOTATION`, the start date of the DagRun that created it (`run_start`), and
an object that names another start is deleted and created anew (`stale`).

Why the start date, of what Airflow 3 puts in a task's context (`context["dag_run"]`):

* the DagRun's database id is not there;
* `run_after` is what a generated run id is made of (`DagRun.generate_run_id`), so two runs under
  one generated id share it, and a backfill gives a re-created run the deleted run's;
* the task instance's `id` changes with every try, while a retry must still adopt the running pod
  of an earlier try of its own run (the provider's pod selector leaves the try number out);
* `start_date` is set when the run starts running and stays through its tries and deferrals. It
  changes when a finished run is cleared (its finished tries' pods are deleted or labelled
  already_checked then, and job names change with the try) or when a user sets a running run
  back to queued through the REST API: a task of it that starts its try again then replaces its
  own job or pod, which resumes from its checkpoints.

An object without the annotation was created by an ARF version before it, and is adopted as
before: an upgrade during a training must not restart the training.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from arf_training import __version__
from arf_training.stepspec import RunIdentity, StepSpec

DNS1123_MAX = 63
# Selected by the NetworkPolicy `arf-training-egress` (helm_values/rbac.yaml): a pod with
# "external" may leave the namespace (MLflow, the data hub's store); a site's pods (federation.py)
# get "none" and reach only the namespace's pods and DNS.
EGRESS_LABEL = "arf.dev/egress"
RUN_START_ANNOTATION = "arf.dev/dag-run-start-date"
DEFAULT_GRACE_S = 30  # Kubernetes' terminationGracePeriodSeconds when a pod sets none
# How much longer than its pods' grace period a deleted object may take to be gone, and how
# often to look.
GONE_MARGIN_S = 60.0
GONE_POLL_S = 2.0


def _digest(*parts: object, length: int = 10) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:length]


def resource_name(identity: RunIdentity, max_len: int = DNS1123_MAX) -> str:
    """A DNS-1123 (and DNS-1035: starts with a letter) name, deterministic per task try.

    `<dag>-<task>` made readable, truncated to fit, then a hash of all four identity fields: the
    run id is in the hash only (it holds ':' and '+', and is long), so the suffix is always
    present and two runs never share a name.
    """
    suffix = _digest(identity.dag_id, identity.run_id, identity.task_id, identity.try_number)
    base = re.sub(r"[^a-z0-9]+", "-", f"{identity.dag_id}-{identity.task_id}".lower()).strip("-")
    if not base or not base[0].isalpha():
        base = f"arf-{base}".rstrip("-")
    base = base[: max_len - len(suffix) - 1].rstrip("-")
    return f"{base}-{suffix}"


def label_value(value: str) -> str:
    """A valid label value (<= 63 characters of [A-Za-z0-9_.-]); hashed when it had to change."""
    value = str(value)
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")
    if clean == value and len(clean) <= DNS1123_MAX:
        return clean
    suffix = _digest(value)
    return f"{clean[: DNS1123_MAX - len(suffix) - 1].rstrip('-_.')}-{suffix}".lstrip("-")


def labels_for(identity: RunIdentity, spec: StepSpec, name: str) -> dict[str, str]:
    """Recommended app.kubernetes.io labels plus the run identity, for selectors and `kubectl`."""
    return {
        "app.kubernetes.io/name": "arf-trainer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": label_value(spec.step),
        "app.kubernetes.io/part-of": "arf-training",
        "app.kubernetes.io/managed-by": "arf-training",
        "app.kubernetes.io/version": label_value(__version__),
        "arf.dev/dag-id": label_value(identity.dag_id),
        "arf.dev/run-id": label_value(identity.run_id),
        "arf.dev/task-id": label_value(identity.task_id),
        "arf.dev/try-number": str(identity.try_number),
        EGRESS_LABEL: "external",
    }


def annotations_for(identity: RunIdentity) -> dict[str, str]:
    """The identity verbatim (labels may have been shortened or hashed)."""
    return {"arf.dev/dag-id": identity.dag_id, "arf.dev/run-id": identity.run_id,
            "arf.dev/task-id": identity.task_id}


# -- which DagRun of a run id -----------------------------------------------------------------


def run_start(context: Any) -> str | None:
    """The start date of the task's DagRun (ISO 8601), or None where the context has none."""
    dag_run = context.get("dag_run") if isinstance(context, Mapping) else None
    started = getattr(dag_run, "start_date", None)
    return started.isoformat() if isinstance(started, datetime) else None


def stamped(manifest: dict[str, Any], context: Any) -> dict[str, Any]:
    """`manifest` (a copy where it changes) with the start of the task's DagRun annotated."""
    started = run_start(context)
    if started is None:
        return manifest
    metadata = manifest.get("metadata") or {}
    return {**manifest, "metadata": {**metadata, "annotations": {
        **(metadata.get("annotations") or {}), RUN_START_ANNOTATION: started}}}


def _run_start_of(metadata: Any) -> str | None:
    annotations = (metadata.get("annotations") if isinstance(metadata, Mapping)
                   else getattr(metadata, "annotations", None))
    return (annotations or {}).get(RUN_START_ANNOTATION)


def stale(found: Any, wanted: Any) -> str | None:
    """The run start on `found` (an existing object's metadata: a dict or a V1ObjectMeta) when it
    is not the one on `wanted` (this try's manifest's): `found` belongs to another DagRun of the
    run id. None when they agree, or when either carries none (see the module docstring)."""
    theirs, ours = _run_start_of(found), _run_start_of(wanted)
    # No start on `found`: an ARF version before this check created it, maybe for this very run;
    # adopted as before, so that deploying this version mid-training does not restart training.
    return theirs if theirs and ours and theirs != ours else None


def gone_timeout_s(grace_s: Any) -> float:
    """How long to wait for a deleted object whose pods have `grace_s` to stop."""
    return float(DEFAULT_GRACE_S if grace_s is None else grace_s) + GONE_MARGIN_S


def wait_until_gone(exists: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `exists` until it answers False; False when it still answers True after
    `timeout_s` (a Foreground deletion waits for the pods' grace periods and finalizers)."""
    deadline = time.monotonic() + timeout_s
    while exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(GONE_POLL_S)
    return True
