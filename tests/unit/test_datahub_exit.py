"""A process that read data hub tables exits cleanly.

delta-rs's default filesystem is a Python handler: a scan's read-ahead ended on Arrow's worker
threads after the read returned, and the last buffer freed there needed the GIL. During
interpreter exit that aborted the process (SIGABRT, "terminate called without an active
exception") after its work was done: 19 % of such processes here, and `arf-trainer evaluate`
failed its try once it had recorded everything (`bench/datahub_exit_abort.py`). The tables are
now read through Arrow's own filesystem (`tables.local_filesystem`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from arf_trainer.datahub.tables import open_table, write_table

CHILD = """
import sys
import pyarrow.compute as pc
from pathlib import Path
from arf_trainer.datahub.tables import open_table
hub = Path(sys.argv[1])
for _ in range(3):
    dataset = open_table(hub, "failures").dataset
    dataset.to_table()
    dataset.to_table(columns=["episode"])
    dataset.to_table(filter=pc.field("seed") > 100)
"""

PROCESSES, AT_ONCE = 16, 2  # with the Python handler: all 16 clean about once in 30 runs


def test_processes_that_read_tables_exit_cleanly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for part in range(4):  # several files, as the failure loop's appends leave them
        n = 5_000
        write_table(tmp_path, "failures", pa.table({
            "episode": np.arange(part * n, (part + 1) * n) // 20,
            "seed": rng.integers(0, 200, n),
            "obs": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(n * 10).astype("float32")), 10),
        }))
    assert open_table(tmp_path, "failures").dataset.count_rows() == 20_000
    failed = []
    for _ in range(PROCESSES // AT_ONCE):
        children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                                     stderr=subprocess.PIPE, text=True) for _ in range(AT_ONCE)]
        for child in children:
            err = child.communicate(timeout=120)[1]
            if child.returncode:
                failed.append((child.returncode, err.strip()[-300:]))
    assert not failed, f"{len(failed)} of {PROCESSES} reading processes failed: {failed}"
