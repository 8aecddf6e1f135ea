"""A memory cgroup of a fixed size for a command and its children: a pod's memory limit, locally.

On Kubernetes a pod's `resources.memory` limit is a cgroup: the kernel counts the resident
memory of every process in the pod together, reclaims page cache at the limit and OOM-kills a
process past it. `MemoryCgroup` makes the same thing for a local command (cgroup v1's memory
controller, or cgroup v2), without swap, so that the limit cannot be met by swapping out:

- it is created as a child of the worker's own memory cgroup (or of `ARF_LOCAL_CGROUP_PARENT`,
  a delegated one), so the worker's own limit still holds above it;
- the command joins it before it runs (`wrap`: `sh` writes its pid into `cgroup.procs`, then
  execs the command), so every process it starts later is charged from its first byte; moving
  a pid in after Popen would miss children forked before the move;
- `remove` SIGKILLs whatever is still inside (a process that left the step's session cannot
  hide from its cgroup), then deletes it, after `usage` has read the OOM kills and the peak;
- `sweep_stale` deletes the empty ones a killed worker could not remove (their names carry
  the creating process' pid).

Creating one needs root or a delegated hierarchy; `CgroupUnavailable` says which path failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from arf_training.errors import ArfError

log = logging.getLogger(__name__)

PARENT_ENV = "ARF_LOCAL_CGROUP_PARENT"
V1_ROOT = Path("/sys/fs/cgroup/memory")  # the v1 memory controller's usual mount
V2_ROOT = Path("/sys/fs/cgroup")  # the unified (v2) hierarchy's usual mount
# Per version: the limit, the peak usage, the file with the "oom_kill N" counter, no swap.
_FILES = {
    "v1": {"limit": "memory.limit_in_bytes", "peak": "memory.max_usage_in_bytes",
           "events": "memory.oom_control", "swap": "memory.memsw.limit_in_bytes"},
    "v2": {"limit": "memory.max", "peak": "memory.peak", "events": "memory.events",
           "swap": "memory.swap.max"},
}


class CgroupUnavailable(ArfError):
    """No memory cgroup could be made here (not root, no memory controller, a bad parent)."""


@dataclass(frozen=True)
class CgroupUsage:
    """What a memory cgroup counted: the kernel's OOM kills in it, its peak usage in bytes
    (resident memory and page cache; None where the kernel does not report it)."""

    oom_kills: int
    peak: int | None


def default_parent() -> Path:
    """The memory cgroup this process runs in (its children stay under its limit too)."""
    if not Path("/proc/self/cgroup").exists():
        raise CgroupUnavailable("this OS has no /proc/self/cgroup (cgroups are Linux only)")
    own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    if V1_ROOT.is_dir():
        paths = [path for _, controllers, path in own if "memory" in controllers.split(",")]
        root = V1_ROOT
    elif (V2_ROOT / "cgroup.controllers").exists():
        paths = [path for hierarchy, _, path in own if hierarchy == "0"]
        root = V2_ROOT
    else:
        raise CgroupUnavailable(f"no memory cgroup hierarchy is mounted (neither the v1 memory "
                                f"controller at {V1_ROOT} nor cgroup v2 at {V2_ROOT})")
    if not paths:
        raise CgroupUnavailable(f"this process is in no memory cgroup under {root} "
                                "(/proc/self/cgroup)")
    return root / paths[0].lstrip("/")


def resolve_parent(parent: Path | str | None = None) -> Path:
    """Where the cgroups go: `parent`, else `ARF_LOCAL_CGROUP_PARENT`, else this process' own."""
    return Path(parent or os.environ.get(PARENT_ENV) or default_parent())


# The names this module gives: arf-[<step>-]<creating pid>-<8 hex>[-node<N>]
_OURS = re.compile(r"^arf-(?:.+-)?(\d+)-[0-9a-f]{8}(?:-node\d+)?$")


def sweep_stale(parent: Path, min_age_s: float = 600.0) -> list[Path]:
    """Delete the empty cgroups under `parent` that this module made for a process that is gone
    (an Airflow worker SIGKILLed before it could remove them) and that are older than
    `min_age_s`; returns them. One that still holds processes is left alone: they may be a live
    step of a worker in another pid namespace, where its creator's pid means nothing here; the
    age keeps a cgroup just made by such a worker, not yet joined, from being taken."""
    removed: list[Path] = []
    try:
        children = list(parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for child in children:
        match = _OURS.match(child.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            if now - child.stat().st_mtime < min_age_s or \
                    (child / "cgroup.procs").read_text().strip():
                continue
            child.rmdir()
        except OSError:  # not a cgroup, gone meanwhile, or busy: leave it
            continue
        log.info("removed the stale memory cgroup %s (its creator is gone)", child)
        removed.append(child)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class MemoryCgroup:
    """A memory cgroup of `limit` bytes, no swap; `with` creates it and removes it."""

    def __init__(self, limit: int, name: str | None = None,
                 parent: Path | str | None = None) -> None:
        self.limit = limit
        self.parent = resolve_parent(parent)
        # v1 cgroups, the root included, have memory.limit_in_bytes; v2 ones never do.
        self.version = "v1" if (self.parent / _FILES["v1"]["limit"]).exists() else "v2"
        self.files = _FILES[self.version]
        self.path = self.parent / (name or f"arf-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def create(self) -> MemoryCgroup:
        try:
            self.path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create the memory cgroup {self.path}: "
                                    f"{exc.strerror or exc}") from exc
        try:
            self._configure()
        except BaseException:
            with contextlib.suppress(OSError):  # empty: nothing ran in it, no file was made
                self.path.rmdir()
            raise
        return self

    def _configure(self) -> None:
        # A plain directory takes the mkdir too: writing the limit there would only make a file.
        if not (self.path / "cgroup.procs").exists():
            raise CgroupUnavailable(f"{self.parent} is not a cgroup: {self.path} got no "
                                    "cgroup.procs")
        limit = self.path / self.files["limit"]
        if not limit.exists():  # v2: the parent does not pass the memory controller on
            raise CgroupUnavailable(f"{self.path} has no {limit.name}: the memory controller is "
                                    f"not enabled in {self.parent / 'cgroup.subtree_control'}")
        try:
            limit.write_text(str(self.limit))
            swap = self.path / self.files["swap"]  # absent without swap accounting
            if swap.exists():  # v1 counts memory+swap (set after the memory limit), v2 swap
                swap.write_text(str(self.limit) if self.version == "v1" else "0")
        except OSError as exc:
            raise CgroupUnavailable(f"cannot set the limit of the memory cgroup {self.path}: "
                                    f"{exc.strerror or exc}") from exc

    def wrap(self, command: list[str]) -> list[str]:
        """`command`, joining this cgroup before it execs (same pid, same session)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"),
                *command]

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def usage(self) -> CgroupUsage:
        events = (self.path / self.files["events"]).read_text().split()
        counters = dict(zip(events[::2], events[1::2]))
        peak = self.path / self.files["peak"]  # v2's memory.peak: Linux 5.19 and later
        return CgroupUsage(oom_kills=int(counters.get("oom_kill", 0)),
                           peak=int(peak.read_text()) if peak.exists() else None)

    def remove(self, timeout_s: float = 10.0) -> bool:
        """SIGKILL what is left inside, then delete the cgroup; False if it outlived timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.path.exists():
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: a killed process has not exited yet
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
        return True

    def __enter__(self) -> MemoryCgroup:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()
