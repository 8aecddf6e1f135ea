"""Streaming training (issue 15 item 4): samples/s of the streaming loader against the
in-memory one on data that fit, and the train step under a 1 GiB memory ceiling on data >= 3x
larger than the ceiling.

Both sections write prepare-format shards directly (prepare/manifest.json + zstd Parquet
shards of 262,144 rows, like `arf-trainer prepare`), robot-like rows of float64 columns, so the
train step alone is measured.

throughput  `run_train` in this process, `training.data_loading: memory` vs `stream`, paired
            back to back per round (order alternating). Per round: the loop's samples/s
            (steps x batch / timing.train_seconds: the figure the epoch line reports; data
            reading is inside the loop when streaming, before it in memory) and the step's
            wall time including its data loading, each as stream/memory. Goal >= 0.9x.
ceiling     `arf-trainer train` as a subprocess under RLIMIT_DATA (what the local backend sets,
            plugins/arf_training/backends/memory.py) on a dataset of --ceiling-gib x 3.2 of
            decoded columns; /proc is sampled every 50 ms for the peak VmHWM (resident) and
            VmData (what RLIMIT_DATA counts). With `resources.memory: 1Gi` the backend's
            ceiling is 1 GiB + its 2 GiB headroom for the runtimes' baseline; the section runs
            that and a strict 1 GiB RLIMIT_DATA (pyarrow on the system allocator: its
            mimalloc arena alone reserves 1 GiB up front).

    .venv/bin/python bench/train_stream.py --sections throughput [--rows 400000 --rounds 5]
    .venv/bin/python bench/train_stream.py --sections ceiling [--ceiling-gib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from trainer_testkit import (  # noqa: E402
    VENV_BIN,
    fresh_tracking_uri,
    make_env,
    make_spec,
    step_environ,
)

SHARD_ROWS = 262_144
OBS, ACT = 16, 2


def write_dataset(prepare: Path, rows: int, seed: int = 0, val_fraction: float = 0.02) -> dict:
    """Shards of `rows` rows (obs_0..obs_15 -> act_0, act_1), written chunk by chunk."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(OBS, ACT))
    shards: dict[str, list[dict]] = {"train": [], "val": []}
    n_val = int(rows * val_fraction)
    for split, count in (("train", rows - n_val), ("val", n_val)):
        (prepare / split).mkdir(parents=True, exist_ok=True)
        for i, start in enumerate(range(0, count, SHARD_ROWS)):
            n = min(SHARD_ROWS, count - start)
            obs = rng.normal(size=(n, OBS))
            act = np.tanh(obs @ weights / 4) + 0.01 * rng.normal(size=(n, ACT))
            columns = {f"obs_{j}": obs[:, j] for j in range(OBS)}
            columns.update({f"act_{j}": act[:, j] for j in range(ACT)})
            rel = f"{split}/shard-{i:05d}.parquet"
            pq.write_table(pa.table(columns), prepare / rel, compression="zstd",
                           row_group_size=SHARD_ROWS)
            shards[split].append({"path": rel, "rows": n})
    manifest = {"query": "generated", "rows": rows, "train_rows": rows - n_val,
                "val_rows": n_val, "features": [f"obs_{j}" for j in range(OBS)],
                "targets": [f"act_{j}" for j in range(ACT)], "shards": shards,
                "columns": [{"name": f"obs_{j}", "type": "double"} for j in range(OBS)]
                + [{"name": f"act_{j}", "type": "double"} for j in range(ACT)],
                "tables": {}, "fingerprint": f"generated-{rows}-{seed}"}
    (prepare / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _spec(loading: str, hp: dict, memory: str | None = None) -> dict:
    training = {"data_loading": loading, "checkpoint_every_steps": 1_000_000}
    if memory:
        training["resources"] = {"memory": memory}
    return make_spec("reach_bc", run_id=f"manual__{loading}", hyperparameters=hp,
                     training=training)


# -- throughput ----------------------------------------------------------------------------

def _one_run(root: Path, prepare: Path, loading: str, hp: dict, tag: str) -> dict:
    from arf_trainer.trainer.run import run_train

    ws = root / f"ws-{tag}"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    (ws / "prepare").symlink_to(prepare)
    env = make_env(_spec(loading, hp), ws, fresh_tracking_uri(root / f"ml-{tag}"), root / "art")
    started = time.perf_counter()
    result = run_train(env)
    wall = time.perf_counter() - started
    shutil.rmtree(ws, ignore_errors=True)
    samples = result["steps"] * hp["batch_size"]
    assert result["data_loading"] == loading, result
    return {"loop_rate": samples / result["timing"]["train_seconds"], "wall_s": wall,
            "sha": result["weights_sha256"][:12], "val_loss": result["metrics"]["val_loss"]}


def section_throughput(args: argparse.Namespace, root: Path) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    prepare = root / "prepare"
    write_dataset(prepare, args.rows)
    hp = {"epochs": args.epochs, "batch_size": 256, "hidden_size": 256, "num_layers": 3}
    _one_run(root, prepare, "stream", {**hp, "epochs": 1}, "warm")  # first-use costs
    rows = []
    for r in range(args.rounds):
        order = ("memory", "stream") if r % 2 == 0 else ("stream", "memory")
        got = {side: _one_run(root, prepare, side, hp, f"{side}{r}") for side in order}
        ratio = {k: got["stream"][k] / got["memory"][k] for k in ("loop_rate", "wall_s")}
        rows.append(ratio)
        print(f"round {r} ({order[0]} first): loop samples/s memory "
              f"{got['memory']['loop_rate']:,.0f} stream {got['stream']['loop_rate']:,.0f} "
              f"-> {ratio['loop_rate']:.3f}x | wall memory {got['memory']['wall_s']:.1f} s "
              f"stream {got['stream']['wall_s']:.1f} s -> {1 / ratio['wall_s']:.3f}x speed | "
              f"val_loss {got['memory']['val_loss']:.4f} / {got['stream']['val_loss']:.4f} | "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    loop = statistics.median(r["loop_rate"] for r in rows)
    wall = statistics.median(1 / r["wall_s"] for r in rows)
    print(f"median stream/memory: loop samples/s {loop:.3f}x (goal >= 0.9x), step wall-time "
          f"speed {wall:.3f}x ({args.rows:,} rows, {args.epochs} epochs, {args.rounds} rounds)")
    return {"loop_ratio": loop, "wall_speed_ratio": wall, "rounds": rows}


# -- ceiling ---------------------------------------------------------------------------------

def _sample(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    while not done.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmData"):
                    peaks[key] = max(peaks.get(key, 0), int(rest.split()[0]) // 1024)
        except OSError:
            return
        time.sleep(0.05)


def _ceiling_run(root: Path, prepare: Path, limit: int, extra_env: dict, tag: str,
                 memory: str) -> dict:
    ws = root / f"ws-{tag}"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    (ws / "prepare").symlink_to(prepare)
    spec = _spec("auto", {"epochs": 1, "batch_size": 32768, "hidden_size": 32,
                          "num_layers": 2, "lr": 1e-3}, memory=memory)
    spec_path = root / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**step_environ(spec_path, ws, fresh_tracking_uri(root / f"ml-{tag}"), root / "art",
                          "manual__ceiling"), **extra_env}

    def limit_data() -> None:  # the bench is single-threaded here: preexec_fn is safe
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    started, peaks, done = time.perf_counter(), {}, threading.Event()
    proc = subprocess.Popen([str(VENV_BIN / "arf-trainer"), "train"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=limit_data)
    sampler = threading.Thread(target=_sample, args=(proc.pid, peaks, done), daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    result_path = ws / "train" / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    lines = [ln for ln in output.splitlines() if "data loading" in ln or "epoch 1/1" in ln]
    return {"exit": proc.returncode, "seconds": time.perf_counter() - started,
            "peak_rss_mib": peaks.get("VmHWM"), "peak_vmdata_mib": peaks.get("VmData"),
            "loading": result.get("data_loading"), "steps": result.get("steps"),
            "lines": lines, "tail": output[-1500:] if proc.returncode else ""}


def section_ceiling(args: argparse.Namespace, root: Path) -> dict:
    ceiling = int(args.ceiling_gib * 2**30)
    row_bytes = 8 * (OBS + ACT)
    rows = int(3.2 * ceiling / row_bytes)
    prepare = root / "prepare-big"
    started = time.perf_counter()
    write_dataset(prepare, rows, val_fraction=0.001)
    on_disk = sum(p.stat().st_size for p in prepare.rglob("*.parquet"))
    print(f"dataset: {rows:,} rows, {rows * row_bytes / 2**30:.2f} GiB decoded "
          f"({rows * row_bytes / ceiling:.1f}x the {args.ceiling_gib} GiB ceiling), "
          f"{on_disk / 2**30:.2f} GiB of Parquet, written in {time.perf_counter() - started:.0f} s",
          flush=True)
    runs = {
        f"backend ceiling ({args.ceiling_gib:g} GiB + 2 GiB headroom)": (ceiling + 2 * 2**30, {}),
        f"strict {args.ceiling_gib:g} GiB RLIMIT_DATA, pyarrow system allocator":
            (ceiling, {"ARROW_DEFAULT_MEMORY_POOL": "system"}),
    }
    out = {}
    for i, (name, (limit, extra)) in enumerate(runs.items()):
        got = _ceiling_run(root, prepare, limit, extra, f"c{i}", f"{ceiling >> 20}Mi")
        out[name] = got
        print(f"{name}: exit {got['exit']} in {got['seconds']:.0f} s, loading {got['loading']}, "
              f"steps {got['steps']}, peak RSS {got['peak_rss_mib']} MiB, peak VmData "
              f"{got['peak_vmdata_mib']} MiB | load {os.getloadavg()[0]:.1f}", flush=True)
        for line in got["lines"]:
            print("   ", line.split("arf_trainer.", 1)[-1])
        if got["tail"]:
            print(got["tail"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="throughput,ceiling")
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ceiling-gib", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = Path(tempfile.mkdtemp(prefix="arf-train-stream-", dir=args.work))
    figures = {}
    try:
        for name in args.sections.split(","):
            figures[name] = {"throughput": section_throughput,
                             "ceiling": section_ceiling}[name](args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
