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

Stdlib only: the Airflow side (local backend) calls it before it writes the job spec, and the
step container calls it too (on Kubernetes the folder is on a volume only the pods see).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

MARKER = "dag_run.json"
DIR_ENV = "ARF_DAG_RUN_DIR"
ASIDE = "%dagrun-"  # `%` + lowercase never comes out of stepspec._safe: no run id's folder
ATTEMPTS = 20

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
    to, or None. `run_after` None (a job spec from before it was recorded) claims nothing.

    Safe for several steps of one DagRun at once (mapped trials, a distributed job's pods):
    the marker is linked in whole or not at all, and only one rename of a folder succeeds.
    """
    if not run_after:
        return None
    moved = None
    for _ in range(ATTEMPTS):
        if _mark(folder, run_after, dag_id, run_id):
            return moved
        found = owner(folder)
        if found == run_after:
            return moved
        if found is None:
            continue  # a marker being written, or one unreadable: look again
        aside = _aside(folder, found)
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            continue  # another step of this DagRun moved it first
        log.warning("workspace %s belonged to another DagRun of run id %r (run_after %s, this "
                    "one's is %s: the run was deleted and triggered again); its files are kept "
                    "in %s and this run starts afresh", folder, run_id or folder.name, found,
                    run_after, aside)
        moved = aside
    raise RuntimeError(f"could not claim workspace {folder} for the DagRun with run_after "
                       f"{run_after}: its {MARKER} kept changing or cannot be read; check the "
                       "file (another DagRun of this run id may be running)")


def _mark(folder: Path, run_after: str, dag_id: str, run_id: str) -> bool:
    """Write the marker if `folder` has none (created, or adopted when it predates markers)."""
    marker = folder / MARKER
    if marker.exists():
        return False
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MARKER}.")
    except FileNotFoundError:  # the folder was moved away meanwhile
        return False
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"run_after": run_after, "dag_id": dag_id, "run_id": run_id}, out)
        try:
            os.link(tmp, marker)  # whole or not at all, and never over another's
        except FileExistsError:
            return False
        except FileNotFoundError:  # the folder was moved away meanwhile
            return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


def _aside(folder: Path, run_after: str) -> Path:
    stamp = re.sub(r"[^0-9A-Za-z]+", "", run_after)[:26]
    aside = folder.with_name(f"{folder.name}{ASIDE}{stamp}")
    n = 1
    while aside.exists():  # the same DagRun's files moved aside before (a third DagRun)
        n += 1
        aside = folder.with_name(f"{folder.name}{ASIDE}{stamp}-{n}")
    return aside
