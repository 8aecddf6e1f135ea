"""Memory of real steps of the shipped templates, next to the local backend's ceiling.

Runs the prepare and train steps of each template through `LocalStepRunner` (so under the
ceiling, `arf_training.backends.memory`) in a scratch ARF_HOME with a freshly seeded hub, and
samples /proc of every process of the step every 50 ms: peak VmPeak (address space, what
RLIMIT_AS would count), VmData (private writable memory, what RLIMIT_DATA counts) and VmHWM
(resident). The ceiling must sit above VmData with room to spare; the gap between VmPeak and
VmHWM is why RLIMIT_AS is not used.

    .venv/bin/python bench/step_memory.py [--templates digits_smoke,reach_bc]
                                          [--steps prepare,train]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
FIELDS = ("VmPeak", "VmData", "VmHWM")


def _status(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) // 1024  # MiB
    return values


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _measured(spec) -> tuple[str, dict[tuple[int, str], dict[str, int]]]:
    from arf_training.backends.local import LocalStepRunner

    peaks: dict[tuple[int, str], dict[str, int]] = {}
    runner = LocalStepRunner(logging.getLogger("bench"))
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for proc in list(runner._procs):
                for pid in _tree(proc.pid):
                    values = _status(pid)
                    if not values:  # gone, or a kernel thread
                        continue
                    try:
                        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[1:3]
                    except OSError:
                        continue
                    peak = peaks.setdefault((pid, " ".join(Path(a).name for a in argv)), {})
                    for key, value in values.items():
                        peak[key] = max(peak.get(key, 0), value)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        runner.run(spec)
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, the bench goes on
        outcome = f"FAILED: {str(exc).splitlines()[0]}"
    finally:
        stop.set()
        thread.join()
    return outcome, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", default="digits_smoke,reach_bc")
    parser.add_argument("--steps", default="prepare,train")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="arf-bench-memory-"))
    os.environ.update({"ARF_HOME": str(home), "ARF_DATAHUB_URI": str(home / "hub"),
                       "MLFLOW_DISABLE_TELEMETRY": "true"})
    subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub", str(home / "hub"),
                    "--episodes", "20"], check=True, capture_output=True)
    from arf_training.backends.memory import MemoryCeiling
    from arf_training.settings import REPO_ROOT, ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec
    from arf_training.templates import load_template

    for name in args.templates.split(","):
        loaded = load_template(REPO_ROOT / "config_templates" / f"{name}.yaml")
        run_id = f"bench__{int(time.time())}"
        for step in args.steps.split(","):
            spec = build_step_spec(loaded, step, RunIdentity(name, run_id, step), {},
                                   ArfSettings.from_env())
            ceiling = MemoryCeiling(str(spec.resources.memory), spec.procs_per_node)
            started = time.monotonic()
            outcome, peaks = _measured(spec)
            print(f"{name} {step}: {outcome} in {time.monotonic() - started:.0f} s; ceiling "
                  f"{ceiling.bytes >> 20} MiB of VmData per process ({ceiling.describe()})")
            for (pid, what), peak in sorted(peaks.items()):
                print(f"    {what[:40]:40} " + "  ".join(f"{k} {peak.get(k, 0):5d} MiB"
                                                        for k in FIELDS))


if __name__ == "__main__":
    main()
