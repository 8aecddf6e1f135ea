"""The `prepare` section of bench/datahub_scale.py (issue 15 item 3): prepare at scale.

Over the table `bench/datahub_scale.py` ingests (robot episodes, FLOAT[7] arrays), per round,
back to back with the order rotating:

  arf          `arf-trainer prepare` as a subprocess with `resources.memory: 1Gi`:
               `dataset.query: SELECT * FROM episodes`, split_by episode_id, order_by
               [episode_id, step], features the joint arrays, target `action`. It runs under
               `--prepare-ceiling`: `backend` (default) the local backend's ceiling
               (MemoryCeiling: RLIMIT_DATA = 1 GiB + the 2 GiB headroom for the runtimes'
               baseline); `cgroup` a memory cgroup limited to 1 GiB, no swap: what a
               Kubernetes pod limit of 1Gi enforces (resident memory, the kernel's OOM killer
               past it; needs root and the cgroup v1 memory controller or cgroup v2); `rlimit`
               a plain 1 GiB RLIMIT_DATA with pyarrow on the system allocator (it counts
               address space the runtimes reserve, not what they use: prepare fails at start).
  copy_sorted  raw DuckDB `COPY (SELECT * FROM episodes ORDER BY episode_id, step) TO ...
               (FORMAT parquet, COMPRESSION zstd)`: the same work without the split, the
               hashing or the sandbox, with the same memory limit, threads and a spill folder.
  copy         raw DuckDB `COPY (SELECT * FROM episodes) TO ...`: the query as written, no
               order (what a user would run by hand; not reproducible byte for byte).

Both DuckDB baselines read the same Delta snapshot through the same Arrow dataset as prepare.
Printed per run: seconds, input MB/s (the table's Parquet bytes / s), rows/s, peak RSS (the
process's ru_maxrss), and per round arf/copy_sorted and arf/copy. Goal: arf >= 0.8x of the raw
COPY, peak RSS under 1 GiB on a dataset >= 3x larger than that.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MEMORY = "1Gi"
DUCKDB_LIMIT = "128MiB"  # what prepare gives DuckDB under resources.memory: 1Gi (an eighth)
THREADS = 1  # and its threads: reach_bc's resources.cpu

COPY_SCRIPT = """
import sys, duckdb
from pathlib import Path
from arf_trainer.datahub.tables import open_table
hub, out, spill, sql = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
con = duckdb.connect(":memory:", config={"memory_limit": sys.argv[5], "temp_directory": spill,
                                         "threads": int(sys.argv[6])})
con.register("episodes", open_table(hub, "episodes").dataset)
con.execute(f"COPY ({sql}) TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
"""


def _spec(hub: Path) -> dict[str, Any]:
    import yaml

    template = yaml.safe_load((REPO / "config_templates" / "reach_bc.yaml").read_text())
    template["metadata"]["name"] = "episodes_bc"
    template["dataset"] = {
        "hub": "default", "query": "SELECT * FROM episodes", "tables": {},
        "allow_query_override": False, "validation_split": 0.1, "split_by": "episode_id",
        "order_by": ["episode_id", "step"],
        "features": ["joint_pos", "joint_vel", "joint_torque", "ee_pose", "gripper_*"],
        "targets": ["action"]}
    template["training"]["resources"]["memory"] = MEMORY
    template["model"].setdefault("base_model", None)
    return {"spec_version": 1, "step": "prepare", "template": template,
            "template_sha256": "0" * 64, "conf": {}, "hyperparameters": {}, "seed": 0,
            "run": {"dag_id": "arf_episodes_bc", "run_id": "bench__1", "task_id": "prepare",
                    "try_number": 1}}


def run_measured(cmd: list[str], env: dict[str, str], limit: Any = None) -> dict[str, Any]:
    """Run `cmd` (under `limit`: a MemoryCeiling or a byte count of RLIMIT_DATA)."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if isinstance(limit, int):
        resource.prlimit(proc.pid, resource.RLIMIT_DATA, (limit, limit))
    elif limit is not None:
        limit.apply(proc.pid)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[:3]} failed (exit {code}): {out[-3000:]}")
    return {"s": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "out": out,
            "load": [round(load, 2), round(os.getloadavg()[0], 2)]}


def _arf(ctx: Any, hub: Path, target: Path) -> dict[str, Any]:
    from arf_training.backends.cgroup import CgroupUnavailable, MemoryCgroup
    from arf_training.backends.memory import MemoryCeiling

    spec = _spec(hub)
    env = {**os.environ, "ARF_JOB_SPEC_JSON": json.dumps(spec), "ARF_WORKSPACE": str(target),
           "ARF_TRACKING_URI": f"sqlite:///{target}/unused.db", "ARF_DATAHUB_URI": str(hub),
           "ARF_DAG_ID": spec["run"]["dag_id"], "ARF_RUN_ID": spec["run"]["run_id"]}
    cmd = [str(REPO / ".venv" / "bin" / "arf-trainer"), "prepare"]
    mode = ctx.args.prepare_ceiling
    if mode == "cgroup":
        try:
            group = MemoryCgroup(2**30, name=f"arf-bench-{os.getpid()}").create()
        except CgroupUnavailable as exc:
            raise SystemExit(f"--prepare-ceiling cgroup needs root and a writable memory "
                             f"cgroup: {exc}") from exc
        try:
            try:
                result = run_measured(group.wrap(cmd), env)
            except SystemExit as exc:
                raise SystemExit(f"{exc} [{_cgroup_report(group)}]") from None
            result.update(_cgroup_report(group))
        finally:
            group.remove()
        ceiling = f"memory cgroup {group.path} limit 1 GiB, no swap"
    else:
        limit: Any = MemoryCeiling(MEMORY, 1)
        ceiling = limit.describe()
        if mode == "rlimit":
            env["ARROW_DEFAULT_MEMORY_POOL"] = "system"
            limit, ceiling = 2**30, "RLIMIT_DATA 1 GiB, pyarrow system allocator"
        result = run_measured(cmd, env, limit)
    manifest = json.loads((target / "prepare" / "manifest.json").read_text())
    result.update(rows=manifest["rows"], val_rows=manifest["val_rows"],
                  shards=sum(len(s) for s in manifest["shards"].values()),
                  fingerprint=manifest["fingerprint"][:12], ceiling=ceiling)
    return result


def _cgroup_report(group: Any) -> dict[str, Any]:
    """The cgroup's peak (page cache included, so near the limit on a large read) and OOM kills
    (the MemoryCgroup of the local backend's cgroup ceiling, backends/cgroup.py)."""
    usage = group.usage()
    return {"cgroup_peak_mib": round((usage.peak or 0) / 2**20),
            "cgroup_oom_kills": usage.oom_kills}


def _copy(hub: Path, target: Path, sql: str) -> dict[str, Any]:
    target.mkdir(parents=True)
    (target / "spill").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO / "training_container")}
    return run_measured([sys.executable, "-c", COPY_SCRIPT, str(hub),
                         str(target / "out.parquet"), str(target / "spill"), sql, DUCKDB_LIMIT,
                         str(THREADS)], env)


SIDES = {
    "arf": None,
    "copy_sorted": "SELECT * FROM episodes ORDER BY episode_id, step",
    "copy": "SELECT * FROM episodes",
}


def _one(ctx: Any, hub: Path, side: str, round_: int) -> dict[str, Any]:
    target = ctx.work / f"prepare_{side}_{round_}"
    shutil.rmtree(target, ignore_errors=True)
    result = _arf(ctx, hub, target) if side == "arf" else _copy(hub, target, SIDES[side])
    out_bytes = sum(p.stat().st_size for p in target.rglob("*.parquet"))
    shutil.rmtree(target, ignore_errors=True)
    result.pop("out")
    mb = ctx.bytes / 1e6
    return {"side": side, "round": round_, **{k: v for k, v in result.items() if k != "s"},
            "s": round(result["s"], 1), "mb_per_s": round(mb / result["s"], 1),
            "rows_per_s": round(ctx.rows / result["s"]),
            "peak_rss_mib": round(result["peak_rss_mib"]), "output_gb": round(out_bytes / 1e9, 2)}


def section_prepare(ctx: Any) -> dict[str, Any]:
    """arf-trainer prepare vs raw DuckDB COPY of the same query, paired; peak RSS (1Gi)."""
    hub, _ = ctx.hub_table()
    sides = list(SIDES)
    runs: list[dict[str, Any]] = []
    for round_ in range(ctx.args.rounds):
        order = sides[round_ % 3:] + sides[:round_ % 3]
        results = {side: _one(ctx, hub, side, round_) for side in order}
        for side in order:
            print("  " + json.dumps(results[side]), flush=True)
        runs.append(results)
    ratio = {base: [round(r[base]["s"] / r["arf"]["s"], 3) for r in runs]
             for base in ("copy_sorted", "copy")}
    return {"arf_over_copy_sorted_per_round": ratio["copy_sorted"],
            "arf_over_copy_per_round": ratio["copy"],
            "arf_over_copy_sorted_median": round(statistics.median(ratio["copy_sorted"]), 3),
            "arf_over_copy_median": round(statistics.median(ratio["copy"]), 3),
            "arf_peak_rss_mib": max(r["arf"]["peak_rss_mib"] for r in runs),
            **({"arf_cgroup_peak_mib": max(r["arf"]["cgroup_peak_mib"] for r in runs),
                "arf_cgroup_oom_kills": sum(r["arf"]["cgroup_oom_kills"] for r in runs)}
               if "cgroup_peak_mib" in runs[0]["arf"] else {}),
            "ceiling": runs[0]["arf"]["ceiling"],
            "input_gb": round(ctx.bytes / 1e9, 2), "rows": ctx.rows,
            "input_over_1gib": round(ctx.bytes / 2**30, 2)}
