"""The local backend's hard memory ceiling on step processes, from `resources.memory`.

On Kubernetes the pod's memory limit bounds a step. Locally nothing did: the query
`SELECT *, repeat('x', 200000000) FROM digits` grew past 8 GiB in 18 s (DuckDB's own
`memory_limit` covers its buffer manager only, not values such as repeat()'s strings) until a
watchdog killed it. So every step process now runs under an OS limit, set by the backend.

Why this mechanism (measured on the shipped templates, bench/step_memory.py):
- A cgroup would count resident memory exactly, but creating one needs root or a delegated
  hierarchy (systemd), which an embedded install cannot count on; an rlimit needs neither, and
  torchrun's workers inherit it.
- RLIMIT_AS counts every address-space reservation, and the runtimes reserve far more than
  they use: a digits prepare maps 2.8 GB for a resident peak of 240 MB, a DDP train rank
  2.6 GB for 540 MB (CUDA reserves tens of GB more). An AS limit near resources.memory breaks
  normal steps: at 1 GiB the prepare step aborts while importing deltalake.
- RLIMIT_DATA counts only private writable memory (heap, anonymous maps, thread stacks), not
  code or PROT_NONE reservations, so CUDA's reservations pass. Its baseline is still 1.4-1.5 GB
  per process (1 GiB of it pyarrow's mimalloc arena, reserved up front), nearly independent of
  the data. Hence the ceiling is `resources.memory` shared by the node's processes, plus a
  fixed headroom for that baseline (`ARF_STEP_MEMORY_HEADROOM`, default 2Gi).

The ceiling applies per process: each torchrun worker (and torchrun itself) gets
`resources.memory / procs_per_node + headroom`, so one node's workers together stay near the
pod limit they would share on Kubernetes. It is set with prlimit() on the child right after it
started (the interpreter has not imported anything yet; its own children inherit the limit),
not in a preexec_fn, which is unsafe in a multi-threaded Airflow worker.

Where root (or a delegated cgroup) is available, `ARF_LOCAL_MEMORY_CEILING=cgroup` runs each
node of a step in a memory cgroup of exactly `resources.memory` instead (`CgroupCeiling`,
backends/cgroup.py): resident memory of all its processes together, no swap, the kernel's OOM
killer past it, as in a pod. No RLIMIT_DATA then: the cgroup is the limit. Asked for and not
possible, the step fails before it starts; it never falls back to the rlimit silently.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import uuid
from collections.abc import Iterable
from typing import Any

from arf_training.backends.cgroup import (PARENT_ENV, CgroupUnavailable, CgroupUsage,
                                          MemoryCgroup, resolve_parent, sweep_stale)
from arf_training.errors import StepFailed

CEILING_ENV = "ARF_LOCAL_MEMORY_CEILING"
CEILING_MODES = ("rlimit", "cgroup")
HEADROOM_ENV = "ARF_STEP_MEMORY_HEADROOM"
DEFAULT_HEADROOM = "2Gi"
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(k|M|G|T|Ki|Mi|Gi|Ti)?$")
# How an allocation failure shows in a step's output: Python, DuckDB, torch, glibc, Rust.
_OUT_OF_MEMORY = re.compile(r"MemoryError|out of memory|bad allocation|bad_alloc|"
                            r"can't allocate memory|cannot allocate memory|"
                            r"memory allocation of \d+ bytes failed", re.IGNORECASE)
# Deaths an allocation failure causes: the kernel's OOM killer, abort() in native code
# (Rust's allocator, std::terminate), or a crash on a NULL it did not check.
_FATAL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS})


def quantity_bytes(text: str, field: str = "resources.memory") -> int:
    """Bytes of a Kubernetes memory quantity (512Mi, 2Gi, 1G, 1500000000)."""
    match = _QUANTITY.match(str(text).strip())
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{field}={text!r} is not a positive memory quantity; write e.g. "
                         "512Mi or 2Gi")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f}".rstrip("0").rstrip(".") + " GiB"


class MemoryCeiling:
    """The RLIMIT_DATA each process of one local step runs under."""

    def __init__(self, memory: str, procs_per_node: int, headroom: str | None = None):
        self.memory = memory
        self.procs = max(1, procs_per_node)
        self.headroom_text = headroom or os.environ.get(HEADROOM_ENV) or DEFAULT_HEADROOM
        try:
            self.headroom = quantity_bytes(self.headroom_text, HEADROOM_ENV)
            self.bytes = quantity_bytes(memory) // self.procs + self.headroom
        except ValueError as exc:  # bad input: a retry would fail the same way
            raise StepFailed(str(exc), retryable=False) from None
        self.inherited: int | None = None  # a lower hard limit the worker already had

    def describe(self) -> str:
        share = f" / {self.procs} processes" if self.procs > 1 else ""
        lowered = (f", lowered to {_gib(self.inherited)} (the worker's own hard limit)"
                   if self.inherited else "")
        return (f"{_gib(self.bytes)} of data memory per process (RLIMIT_DATA) = resources.memory:"
                f" {self.memory}{share} + {self.headroom_text} headroom ({HEADROOM_ENV}){lowered}")

    def apply(self, pid: int) -> bool:
        """Limit process `pid` (and the children it starts later); False where the OS cannot."""
        if not hasattr(resource, "prlimit"):  # Linux only; elsewhere the step runs unlimited
            return False
        try:
            # Never above a hard limit the worker already runs under (only root may raise it).
            _, hard = resource.prlimit(pid, resource.RLIMIT_DATA)
            limit = self.bytes if hard == resource.RLIM_INFINITY else min(self.bytes, hard)
            resource.prlimit(pid, resource.RLIMIT_DATA, (limit, limit))
            self.inherited = limit if limit < self.bytes else None
        except ProcessLookupError:  # it has already exited: nothing left to limit
            pass
        return True

    def wrap(self, command: list[str], node: int) -> list[str]:
        return command  # the limit is set on the started process (apply)

    def close(self, log: Any) -> None:
        pass  # an rlimit ends with its process

    def failure_note(self, codes: Iterable[int], tail: Iterable[str]) -> str:
        """A note for a failed step that looks like it ran out of memory, else ''."""
        return _looks_out_of_memory(codes, tail, self.describe())


def _looks_out_of_memory(codes: Iterable[int], tail: Iterable[str], ceiling: str) -> str:
    killed = any(code < 0 and -code in _FATAL_SIGNALS for code in codes)
    if not killed and not any(_OUT_OF_MEMORY.search(line) for line in tail):
        return ""
    how = "died from a signal" if killed else "reported a failed memory allocation"
    return (f"\nThe step {how}; it ran under a memory ceiling of {ceiling}. If it needs more, "
            "raise training.resources.memory in the template (or make the query or batch "
            "smaller).")


def ceiling_mode() -> str:
    """`ARF_LOCAL_MEMORY_CEILING`: "rlimit" (default) or "cgroup"."""
    value = os.environ.get(CEILING_ENV, "").strip().lower() or "rlimit"
    if value not in CEILING_MODES:
        raise StepFailed(f"{CEILING_ENV}={os.environ[CEILING_ENV]!r} is not a memory ceiling; "
                         f"use one of {list(CEILING_MODES)} (or unset it for rlimit)",
                         retryable=False)
    return value


def step_ceiling(step: str, memory: str, procs_per_node: int,
                 nodes: int = 1) -> MemoryCeiling | CgroupCeiling:
    """The ceiling one local step runs under, by `ARF_LOCAL_MEMORY_CEILING`; in cgroup mode
    its cgroups exist from here on (`close` removes them)."""
    if ceiling_mode() == "cgroup":
        return CgroupCeiling(step, memory, nodes)
    return MemoryCeiling(memory, procs_per_node)


class CgroupCeiling:
    """One memory cgroup of `resources.memory` per node of a local step (a node is a pod on
    Kubernetes, each with that limit): all of a node's processes share it."""

    def __init__(self, step: str, memory: str, nodes: int = 1):
        self.step, self.memory = step, memory
        try:
            self.bytes = quantity_bytes(memory)
        except ValueError as exc:
            raise StepFailed(str(exc), retryable=False) from None
        # The step's name and the worker's pid make a leftover cgroup traceable to its task.
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", step)
        prefix = f"arf-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.groups: list[MemoryCgroup] = []
        try:
            sweep_stale(resolve_parent())  # what a SIGKILLed worker could not remove
            for node in range(nodes):
                self.groups.append(MemoryCgroup(self.bytes, f"{prefix}-node{node}").create())
        except (CgroupUnavailable, OSError) as exc:
            self.close(None)
            raise StepFailed(
                f"{CEILING_ENV}=cgroup: {exc}. This ceiling needs a writable memory cgroup "
                "hierarchy: run the Airflow worker as root, or delegate a cgroup to its user "
                f"(systemd: Delegate=yes) and set {PARENT_ENV} to it; or set {CEILING_ENV}="
                "rlimit (the default: a per-process RLIMIT_DATA ceiling, no root needed)",
                retryable=False) from exc
        self.usage: list[CgroupUsage] = []

    def wrap(self, command: list[str], node: int) -> list[str]:
        return self.groups[node].wrap(command)

    def apply(self, pid: int) -> bool:
        return True  # the process joined its cgroup before it ran (wrap)

    def describe(self) -> str:
        where = self.groups[0].path if len(self.groups) == 1 else \
            f"{self.groups[0].path.parent}/{self.groups[0].path.name[:-1]}*"
        per = " per node" if len(self.groups) > 1 else ""
        return (f"a memory cgroup of resources.memory: {self.memory}{per} ({self.bytes} bytes) "
                f"for all the step's processes together: resident memory and page cache, no "
                f"swap, the kernel's OOM killer past it, as in a pod ({CEILING_ENV}=cgroup, "
                f"{where})")

    def close(self, log: Any) -> None:
        """Stop what is left in the cgroups, keep what they counted, remove them."""
        for group in self.groups:
            try:
                usage = group.usage()
            except OSError:  # not created, or unreadable: removing it matters more
                usage = None
            if usage is not None:
                self.usage.append(usage)
                if log is not None:  # how close the step came to its pod's limit
                    log.info("memory cgroup %s: peak %s of resources.memory %s, %d OOM kill(s)",
                             group.path.name, _peak(usage), self.memory, usage.oom_kills)
            if not group.remove() and log is not None:
                log.warning("memory cgroup %s still holds processes after SIGKILL; left in "
                            "place", group.path)

    def failure_note(self, codes: Iterable[int], tail: Iterable[str]) -> str:
        """Why a failed step failed, when its cgroup saw the kernel's OOM killer (else as for
        the rlimit: a note when it looks like a failed allocation)."""
        # After close() its counts are kept; before (a failed setup command), read them live.
        usages = self.usage or self._live_usage()
        kills = sum(usage.oom_kills for usage in usages)
        if not kills:
            return _looks_out_of_memory(codes, tail, self.describe())
        peak = max(usages, key=lambda usage: usage.peak or 0)
        return (f"\nStep {self.step!r} exceeded resources.memory={self.memory}: the kernel "
                f"OOM-killed it in its memory cgroup ({kills} OOM kill(s), peak {_peak(peak)}; "
                f"{CEILING_ENV}=cgroup). Raise training.resources.memory in the template, or "
                "reduce the batch size or the data (the query).")

    def _live_usage(self) -> list[CgroupUsage]:
        usages = []
        for group in self.groups:
            try:
                usages.append(group.usage())
            except OSError:
                pass
        return usages


def _peak(usage: CgroupUsage) -> str:
    return "unknown" if usage.peak is None else f"{usage.peak / 2**20:.0f} MiB"


# How a local step's memory is bounded: one of the two, by ARF_LOCAL_MEMORY_CEILING.
Ceiling = MemoryCeiling | CgroupCeiling
