"""`training.data_loading: auto` against `training.resources.memory`: what it picks, and the
train step's peak resident memory next to both forced choices, on the same prepared data.

Writes prepare-format shards directly (float64 columns, robot-like), then runs `arf-trainer
train` (reach_bc's bc recipe, 1 epoch) three times as a subprocess: `auto`, `memory`, `stream`;
each peak is the child's ru_maxrss. The ceiling holds when auto's peak is below `--memory`; the
ratios are peak / ceiling. (The local backend's own ceiling adds 2 GiB headroom for the
runtimes, backends/memory.py; on Kubernetes `resources.memory` is the container's limit.)

    .venv/bin/python bench/auto_loading.py [--rows 620000] [--features 50] [--memory 1Gi]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from trainer_testkit import _write_prepare, make_spec, step_environ  # noqa: E402

from arf_trainer.spec import memory_bytes  # noqa: E402

# Peak resident memory of one child command, in KiB (Linux ru_maxrss).
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True,"
         " text=True); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
         " print(r.stdout + r.stderr)")


def _run(root: Path, ws: Path, loading: str, memory: str, features: list[str]) -> dict:
    spec = make_spec("reach_bc", run_id=f"manual__{loading}",
                     hyperparameters={"epochs": 1, "hidden_size": 32, "batch_size": 1024},
                     training={"resources": {"memory": memory}, "checkpoint_every_steps": 0,
                               "data_loading": loading})
    spec["template"]["dataset"]["features"] = features
    spec["inputs"]["train_dir"] = f"train-{loading}"  # one workspace, one training per folder
    path = root / f"spec-{loading}.json"
    path.write_text(json.dumps(spec))
    env = step_environ(path, ws, f"sqlite:///{root}/mlflow-{loading}.db", root / "art", spec[
        "run"]["run_id"])
    env["ARF_RESULT_PATH"] = str(root / f"result-{loading}.json")
    out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "arf_trainer.cli",
                          "train"], env=env, capture_output=True, text=True, check=True).stdout
    head, _, log = out.partition("\n")
    code, peak_kib = (int(x) for x in head.split())
    chose = next((line.split("data loading: ", 1)[1] for line in log.splitlines()
                  if "data loading: " in line), "?")
    if code != 0:
        raise SystemExit(f"train ({loading}) exited {code}:\n{log[-3000:]}")
    return {"peak_mib": peak_kib / 1024, "chose": chose}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=620_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--memory", default="1Gi")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="arf-auto-loading-"))
    ws = root / "ws"
    rng = np.random.default_rng(0)
    names = [f"obs_{i}" for i in range(args.features)]
    columns = {n: rng.normal(size=args.rows) for n in names}
    columns.update({"act_0": rng.normal(size=args.rows), "act_1": rng.normal(size=args.rows)})
    _write_prepare(ws, columns, names, ["act_0", "act_1"], 0.05, shards=4, seed=0)
    del columns
    ceiling = memory_bytes(args.memory) / 2**20
    print(f"{args.rows:,} rows x {args.features + 2} float64 columns; resources.memory "
          f"{args.memory} ({ceiling:.0f} MiB)")
    for loading in ("auto", "memory", "stream"):
        r = _run(root, ws, loading, args.memory, names)
        print(f"  {loading:7} peak {r['peak_mib']:7.0f} MiB = {r['peak_mib'] / ceiling:.2f}x the "
              f"ceiling  ({r['chose']})")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
