"""Which DagRun a run's workspace folder belongs to.

The folder of a run is named by its run id (`<workspace root>/<dag_id>/<run_id>`), and a run id
does not name one DagRun for good: a run deleted in the Airflow UI or REST API can be triggered
again under its id (a CI system's chosen id, a re-created backfill date). Without a check, the
new DagRun's steps would take the deleted run's prepared rows, checkpoints and results for
their own: a model trained on data the user has since corrected, registered as new.

So the folder holds `dag_run.json`, naming the DagRun that owns it by its `run_after`: set
when the DagRun is created, kept when it is cleared or set back to queued (its tries must find
their checkpoints), and different for a run triggered again (the time of the new trigger).
Every step claims the folder before it writes there (`claim`): the owner finds its own marker;
a folder without one was made before markers existed and is adopted; a folder owned by another
DagRun is moved aside whole, to `<run_id>%dagrun-<its run_after>`, and the step starts afresh.

Where two DagRuns share a run id and a `run_after` (a scheduled date deleted and re-created
by a backfill), they cannot be told apart here and the second continues the first: both
stand for the same data interval. The MLflow run (`tracking.find_or_create_run`) and the
Optuna study of the run are told apart by the same `run_after`.

Steps of one DagRun often start together (mapped trials, a job's pods, a federation's sites):
a claim that changes anything holds a lock file beside the folder (`<run_id>%claim`, kept)
exclusively, so that one step's check and rename cannot interleave with another's; one that
finds its own marker holds it shared while it reads the marker and touches it (the workspace
janitor, which deletes folders nothing changed in for days, takes it exclusively).

Stdlib only: the Airflow side (local backend) calls it before it writes the job spec, and the
step container calls it too (on Kubernetes the folder is on a volume only the pods see).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from arf_trainer.errors import WorkspaceError

MARKER = "dag_run.json"
DIR_ENV = "ARF_DAG_RUN_DIR"
# `%` + lowercase never comes out of stepspec._safe: no run id's folder has these names.
ASIDE = "%dagrun-"
LOCK = "%claim"

log = logging.getLogger(__name__)


def owner(folder: Path) -> str | None:
    """The `run_after` of the DagRun that owns `folder`; None when it has no (readable) marker."""
    try:
        value = json.loads((folder / MARKER).read_text()).get("run_after")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def claim(folder: Path, run_after: str | None, *, dag_id: str = "", run_id: str = "") -> Path | None:
    """Make `folder` the DagRun's of `run_after`; the folder another DagRun's files were moved
    to, or None. `run_after` None (a job spec from before it was recorded) claims nothing."""
    if not run_after:
        return None
    try:
        with locked(folder, shared=True):  # steps of one DagRun share it; a change waits
            if owner(folder) == run_after:
                # Fresh from now on: the workspace janitor, which checks the age under the
                # exclusive lock, keeps a folder a step has just claimed.
                os.utime(folder / MARKER)
                return None
        return _claim(folder, run_after, dag_id, run_id)
    except OSError as exc:
        raise WorkspaceError(
            f"cannot claim the run's workspace folder {folder} for this DagRun: {exc}; the "
            "workspace must be a writable folder (ARF_WORKSPACE_ROOT on this machine, the "
            "workspace volume on Kubernetes)") from exc


def _claim(folder: Path, run_after: str, dag_id: str, run_id: str) -> Path | None:
    with locked(folder):
        found = owner(folder)
        if found == run_after:
            return None  # another step of this DagRun claimed it meanwhile
        aside = None
        if found is not None:
            aside = _aside(folder, found)
            os.rename(folder, aside)
            log.warning("workspace %s belonged to another DagRun of run id %r (run_after %s, "
                        "this one's is %s: the run was deleted and triggered again); its files "
                        "are kept in %s and this run starts afresh", folder,
                        run_id or folder.name, found, run_after, aside)
        # No marker: a new folder, or one from before markers, adopted as it is.
        _mark(folder, {"run_after": run_after, "dag_id": dag_id, "run_id": run_id})
        return aside


@contextlib.contextmanager
def locked(folder: Path, *, shared: bool = False) -> Iterator[None]:
    """`folder`'s claim lock held: shared by steps that find the folder theirs, exclusive to
    change it (a claim that marks or moves it, the workspace janitor before it deletes it)."""
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder.parent / f"{folder.name}{LOCK}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _mark(folder: Path, record: dict[str, str]) -> None:
    """The marker written whole (a reader never sees half of it)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MARKER}.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(tmp, folder / MARKER)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _aside(folder: Path, run_after: str) -> Path:
    stamp = re.sub(r"[^0-9A-Za-z]+", "", run_after)[:26]
    aside = folder.with_name(f"{folder.name}{ASIDE}{stamp}")
    n = 1
    while aside.exists():  # the same DagRun's files moved aside before (a third DagRun)
        n += 1
        aside = folder.with_name(f"{folder.name}{ASIDE}{stamp}-{n}")
    return aside
