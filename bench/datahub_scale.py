"""The data hub at scale: robot-like episodes (>= 20 M rows, >= 5 GB of Parquet) through each
stage of the data path, every stage against its raw library baseline in the same run.

    .venv/bin/python bench/datahub_scale.py                       # the full run (issue 15)
    .venv/bin/python bench/datahub_scale.py --rows 200000 --gb 0  # a dry run in seconds
    .venv/bin/python bench/datahub_scale.py --sections data,ingest --rounds 2

Sections (`--sections`, in this order; each is a function `section_<name>(ctx) -> dict`):
  data    generate the episodes once into --data (outside the repository; reused when present)
  ingest  `arf datahub ingest` vs a raw `deltalake.write_deltalake` of the same files, paired
          back to back (order alternating by round): MB/s, rows/s, the ratio, peak RSS
Further sections (prepare, train) are added the same way: write `section_<name>(ctx)` and add
it to SECTIONS; `ctx.files` are the Parquet files, `ctx.work` a scratch folder, `ctx.hub_table`
ingests them once into a hub (by `arf datahub ingest`) and returns (hub, table name).

The machine is shared: the load average is printed with every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
DEFAULT_DATA = Path("/work/bench-data/datahub_scale")
FILE_ROWS = 262_144
ROW_GROUP_ROWS = 65_536
JOINTS = 7
ARRAYS = ("joint_pos", "joint_vel", "joint_torque", "ee_pose", "action")
SCALARS = ("gripper_pos", "gripper_force", "object_x", "object_y", "object_z", "gripper_cmd",
           "reward")


@dataclass
class Context:
    """What the sections share: the generated files and a scratch folder."""

    args: argparse.Namespace
    data: Path
    work: Path
    files: list[Path] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    _hub: tuple[Path, str] | None = None

    @property
    def parquet(self) -> Path:
        """The folder of the Parquet files (the manifest sits next to it, not in it)."""
        return self.data / "parquet"

    def hub_table(self) -> tuple[Path, str]:
        """The files ingested once (by `arf datahub ingest`) into a hub for later sections."""
        if self._hub is None:
            hub = self.work / "hub_shared"
            if not (hub / "episodes" / "_delta_log").is_dir():
                shutil.rmtree(hub, ignore_errors=True)
                run_measured(arf_ingest_cmd(self.parquet), arf_env(self.work, hub))
            self._hub = (hub, "episodes")
        return self._hub


# --- data -------------------------------------------------------------------------------------


def _episode_file(path: Path, first_episode: int, rows: int, seed: int) -> int:
    """Write one Parquet file of whole episodes (random-walk joints, 100 Hz); return its rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < rows:
        lengths.append(int(rng.integers(200, 800)))
    lengths[-1] -= sum(lengths) - rows
    episode = np.repeat(np.arange(first_episode, first_episode + len(lengths)), lengths)
    starts = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    step = (np.arange(rows) - starts).astype(np.int32)
    start_us = 1_780_000_000_000_000 + episode * 60_000_000
    columns = {
        "episode_id": pa.array(episode, pa.int64()),
        "step": pa.array(step),
        "robot_id": pa.array((episode % 16).astype(np.int32)),
        "timestamp": pa.array(start_us + step.astype(np.int64) * 10_000,
                              pa.timestamp("us", tz="UTC")),
    }
    noise = _noise(rows)  # drawn once per process: generating is then mostly Parquet writing
    for index, name in enumerate(ARRAYS):
        walk = noise[index] + rng.normal(0, 1, JOINTS).astype(np.float32)  # per file offset
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(walk.ravel()), JOINTS)
    for index, name in enumerate(SCALARS):
        columns[name] = pa.array(noise[len(ARRAYS)][:, index] + np.float32(rng.normal()))
    columns["done"] = pa.array(np.r_[step[1:] == 0, True])
    # Dictionary encoding is attempted per column by default: useless on float noise, and slow.
    pq.write_table(pa.table(columns), path, row_group_size=ROW_GROUP_ROWS, compression="snappy",
                   use_dictionary=["robot_id"])
    return rows


_NOISE: dict[int, list] = {}


def _noise(rows: int) -> list:
    """Random walks (one per array column) and scalar noise for `rows` rows, cached."""
    import numpy as np

    if rows not in _NOISE:
        rng = np.random.default_rng(rows)
        walks = [np.cumsum(rng.normal(0, 0.01, (rows, JOINTS)).astype(np.float32), axis=0)
                 for _ in ARRAYS]
        _NOISE[rows] = walks + [rng.normal(0, 1, (rows, len(SCALARS))).astype(np.float32)]
    return _NOISE[rows]


def section_data(ctx: Context) -> dict:
    """Generate (or reuse) >= --rows rows and >= --gb GB of episode Parquet files in ctx.data."""
    manifest = ctx.data / "manifest.json"
    if manifest.exists():
        done = json.loads(manifest.read_text())
        ctx.files = [ctx.parquet / name for name in done["files"]]
        ctx.rows, ctx.bytes = done["rows"], done["bytes"]
        return {**done, "files": len(done["files"]), "reused": True}
    ctx.parquet.mkdir(parents=True, exist_ok=True)
    started, episodes = time.perf_counter(), 0
    while ctx.rows < ctx.args.rows or ctx.bytes < ctx.args.gb * 1e9:
        path = ctx.parquet / f"episodes-{len(ctx.files):05d}.parquet"
        left = ctx.args.rows - ctx.rows
        rows = min(FILE_ROWS, left) if left >= 1000 else FILE_ROWS
        ctx.rows += _episode_file(path, episodes, rows, seed=len(ctx.files))
        episodes += rows // 200 + 1  # ids unique across files (an episode has >= 200 steps)
        ctx.files.append(path)
        ctx.bytes += path.stat().st_size
    done = {"rows": ctx.rows, "bytes": ctx.bytes, "files": [f.name for f in ctx.files],
            "generate_s": round(time.perf_counter() - started, 1)}
    manifest.write_text(json.dumps(done))
    return {**done, "files": len(ctx.files), "reused": False}


# --- ingest -----------------------------------------------------------------------------------

RAW_WRITE = """
import sys, pyarrow.dataset as pads
from deltalake import write_deltalake
files = sys.argv[2:]
reader = pads.dataset(files, format="parquet").scanner(batch_size=65536).to_reader()
write_deltalake(sys.argv[1], reader, mode="append")
"""


def arf_env(work: Path, hub: Path) -> dict[str, str]:
    return {**os.environ, "ARF_HOME": str(work / "arf_home"), "ARF_DATAHUB_URI": str(hub)}


def arf_ingest_cmd(data: Path) -> list[str]:
    return [str(VENV_BIN / "arf"), "datahub", "ingest", "episodes", str(data), "--json"]


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; wall seconds, peak RSS (MiB, of the process tree's largest process), load."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}): {out[-2000:]}")
    return {"s": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": out,
            "load_before": load, "load_after": os.getloadavg()[0]}


def _one_ingest(ctx: Context, side: str, round_: int) -> dict:
    target = ctx.work / f"ingest_{side}_{round_}"
    shutil.rmtree(target, ignore_errors=True)
    if side == "arf":
        result = run_measured(arf_ingest_cmd(ctx.parquet), arf_env(ctx.work, target))
        rows = json.loads(result["stdout"].strip().splitlines()[-1])["rows"]
    else:
        cmd = [sys.executable, "-c", RAW_WRITE, str(target / "episodes")]
        result = run_measured(cmd + [str(f) for f in ctx.files], dict(os.environ))
        rows = None
    if rows is not None and rows != ctx.rows:
        raise SystemExit(f"arf ingested {rows} rows, expected {ctx.rows}")
    shutil.rmtree(target, ignore_errors=True)
    mb = ctx.bytes / 1e6
    return {"side": side, "round": round_, "s": round(result["s"], 3),
            "mb_per_s": round(mb / result["s"], 1), "rows_per_s": round(ctx.rows / result["s"]),
            "peak_rss_mib": round(result["peak_rss_mib"]),
            "load": [round(result["load_before"], 2), round(result["load_after"], 2)]}


def section_ingest(ctx: Context) -> dict:
    """`arf datahub ingest` vs raw write_deltalake of the same files, paired, order alternating."""
    pairs = []
    for round_ in range(ctx.args.rounds):
        sides = ("arf", "raw") if round_ % 2 == 0 else ("raw", "arf")
        results = {side: _one_ingest(ctx, side, round_) for side in sides}
        for side in sides:
            print("  " + json.dumps(results[side]), flush=True)
        # Same bytes on both sides: the throughput ratio is the inverse of the time ratio.
        pairs.append(results["raw"]["s"] / results["arf"]["s"])
    return {"ratio_arf_over_raw_per_round": [round(r, 3) for r in pairs],
            "ratio_median": round(statistics.median(pairs), 3),
            "input_gb": round(ctx.bytes / 1e9, 2), "rows": ctx.rows}


from datahub_prepare import section_prepare  # noqa: E402 (bench/ is on sys.path)

SECTIONS = {"data": section_data, "ingest": section_ingest, "prepare": section_prepare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000, help="at least this many rows")
    parser.add_argument("--gb", type=float, default=5.0, help="and at least this many GB")
    parser.add_argument("--data", type=Path, help="data folder (default: "
                        f"{DEFAULT_DATA}/rows<R>_gb<G>, reused when complete)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: <data>-work)")
    parser.add_argument("--rounds", type=int, default=2, help="paired rounds per measurement")
    parser.add_argument("--prepare-ceiling", choices=("backend", "rlimit", "cgroup"),
                        default="backend", help="how prepare's 1 GiB is enforced: the local "
                        "backend's ceiling, a plain RLIMIT_DATA, or a memory cgroup as a "
                        "Kubernetes pod limit (root; see bench/datahub_prepare.py)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from {', '.join(SECTIONS)} (data always runs)")
    args = parser.parse_args(argv)
    data = args.data or DEFAULT_DATA / f"rows{args.rows}_gb{args.gb:g}"
    ctx = Context(args=args, data=data, work=args.work or data.with_name(data.name + "-work"))
    ctx.work.mkdir(parents=True, exist_ok=True)
    wanted = ["data"] + [s for s in args.sections.split(",") if s and s != "data"]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()}", flush=True)
    summary = {}
    for name in wanted:
        print(f"== {name}", flush=True)
        summary[name] = SECTIONS[name](ctx)
        print(json.dumps(summary[name], indent=2), flush=True)
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
