"""Read-check-append sequences on the failure tables, from two real processes at once.

Delta's optimistic commits let two blind appends both land: two corrections started together
each relabelled every open failure episode (twice the rows, under the same episode ids), and two
evaluations of one version each recorded its failures.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

from arf_trainer.datahub.tables import list_tables, open_table

SCRIPT = """
import datetime as dt, sys, time
import numpy as np
from pathlib import Path
from arf_trainer.datahub.failures import correct_failures, record_failures
from arf_trainer.sim.reach import Rollout

what, hub, start = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
rng = np.random.default_rng(0)
episodes = [(seed, Rollout(rng.normal(size=(20, 10)).astype(np.float32),
                           rng.normal(size=(20, 2)).astype(np.float32), 0.5, False))
            for seed in range(100, 130)]
at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
if what == "setup":
    record_failures(hub, model_name="m", model_version=1, eval_run_id="r", episodes=episodes,
                    recorded_at=at)
    sys.exit(0)
while time.time() < start:
    time.sleep(0.001)
if what == "record":
    print(record_failures(hub, model_name="m", model_version=1, eval_run_id="r",
                          episodes=episodes, recorded_at=at)["episodes"])
else:
    print(correct_failures(hub, collected_at=at)["episodes"])
"""


def _together(what: str, hub: Path) -> list[int]:
    """Start two processes that begin `what` at the same instant; their episode counts."""
    start = time.time() + 3.0  # past both interpreters' imports
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, what, str(hub), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    return sorted(int(out.strip().splitlines()[-1]) for out in outs)


def test_two_corrections_at_once_relabel_each_episode_once(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    subprocess.run([sys.executable, "-c", SCRIPT, "setup", str(hub), "0"], check=True)
    assert _together("correct", hub) == [0, 30]
    corrections = open_table(hub, "corrections").dataset.to_table()
    assert corrections.num_rows == 30 * 20
    assert len(set(corrections["seed"].to_pylist())) == 30
    assert pc.count_distinct(corrections["episode"]).as_py() == 30
    assert ".locks" not in list_tables(hub)


def test_two_evaluations_of_one_version_record_each_failure_once(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    assert _together("record", hub) == [0, 30]
    assert open_table(hub, "failures").dataset.to_table().num_rows == 30 * 20
