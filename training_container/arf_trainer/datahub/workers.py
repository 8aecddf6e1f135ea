"""Threads for per-row image work (decoding in prepare, encoding at ingest).

Pillow's PNG/JPEG codecs and zlib run without the GIL, so a thread per core decodes or encodes
frames side by side. Each row's result lands in its own place, so the output is the same for
any number of threads. How many: the step's CPU budget, `OMP_NUM_THREADS`, which both backends
set from `training.resources.cpu` (a pod's CPU limit is not visible as cores), else the cores
this process may run on; at most `MAX_THREADS`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

MAX_THREADS = 8
_pool: ThreadPoolExecutor | None = None


def worker_threads() -> int:
    budget = os.environ.get("OMP_NUM_THREADS", "")
    cores = int(budget) if budget.isdigit() and int(budget) > 0 \
        else len(os.sched_getaffinity(0))
    return max(1, min(MAX_THREADS, cores))


def runs(rows: int) -> list[range]:
    """`range(rows)` in consecutive runs, four a thread: a run per task keeps the handing out
    cheap next to small frames (a task per 64x64 frame cost more than it saved), and four a
    thread even out runs of unequal cost."""
    size = max(1, -(-rows // (4 * worker_threads())))
    return [range(start, min(start + size, rows)) for start in range(0, rows, size)]


def pool() -> ThreadPoolExecutor:
    """The process's pool for such work (created on first use, with `worker_threads()`)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=worker_threads(), thread_name_prefix="images")
    return _pool
