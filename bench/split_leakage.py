"""Leakage check (issue 15): validation loss of an episode split against a row split.

On the reach demonstrations (`seed_demo`, 200 episodes by default), the real steps run as
subprocesses, `arf-trainer prepare` then `arf-trainer train`, with the reach_bc template as
shipped (`dataset.split_by: episode`) and with the row split (`split_by` removed), for each
seed. A row split puts steps of nearly every validation episode into training too, and the
steps of one episode are close to each other, so its validation loss is optimistic; the
episode split measures the loss on episodes the model has not seen.

    .venv/bin/python bench/split_leakage.py [--episodes 200] [--epochs 15] [--seeds 0,1]

Printed per run: rows, validation rows, validation episodes also in training, final
train_loss and val_loss; then per seed val_loss(episode split) / val_loss(row split).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from trainer_testkit import VENV_BIN, make_spec, step_environ  # noqa: E402


def _episodes(prepared: Path, split: str) -> set[int]:
    manifest = json.loads((prepared / "manifest.json").read_text())
    return {e for s in manifest["shards"][split]
            for e in pq.read_table(prepared / s["path"], columns=["episode"])["episode"]
            .to_pylist()}


def _step(root: Path, hub: Path, work: Path, step: str, split_by: str | None, seed: int,
          epochs: int) -> dict:
    spec = make_spec("reach_bc", step, run_id=f"{work.name}", hyperparameters={"epochs": epochs})
    spec["seed"] = seed
    if split_by is None:
        spec["template"]["dataset"].pop("split_by", None)
    spec_path = work / f"{step}.json"
    spec_path.write_text(json.dumps(spec))
    env = step_environ(spec_path, work, f"sqlite:///{root}/mlflow.db", root / "artifacts",
                       work.name, step)
    env["ARF_DATAHUB_URI"] = str(hub)  # one process: no RANK/WORLD_SIZE (step_environ drops them)
    done = subprocess.run([str(VENV_BIN / "arf-trainer"), step], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"arf-trainer {step} failed: {done.stderr[-3000:]}")
    return json.loads((work / step / "result.json").read_text()) if step == "train" else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)
    from arf_trainer.datahub.seed import seed_demo

    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()}", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="split-leakage-") as tmp:
        root = Path(tmp)
        hub = root / "hub"
        seed_demo(hub, episodes=args.episodes, seed=0, force=False)
        for seed in (int(s) for s in args.seeds.split(",")):
            losses = {}
            for name, split_by in (("episode", "episode"), ("row", None)):
                work = root / f"{name}-{seed}"
                work.mkdir()
                started = time.perf_counter()
                _step(root, hub, work, "prepare", split_by, seed, args.epochs)
                result = _step(root, hub, work, "train", split_by, seed, args.epochs)
                manifest = json.loads((work / "prepare" / "manifest.json").read_text())
                val = _episodes(work / "prepare", "val")
                shared = val & _episodes(work / "prepare", "train")
                metrics = result["metrics"]
                losses[name] = metrics["val_loss"]
                print(json.dumps({
                    "split": name, "seed": seed, "rows": manifest["rows"],
                    "val_rows": manifest["val_rows"], "val_episodes": len(val),
                    "val_episodes_also_in_train": len(shared),
                    "train_loss": round(metrics["train_loss"], 5),
                    "val_loss": round(metrics["val_loss"], 5),
                    "s": round(time.perf_counter() - started, 1)}), flush=True)
            ratios.append(losses["episode"] / losses["row"])
            print(f"seed {seed}: val_loss episode split {losses['episode']:.5f} / row split "
                  f"{losses['row']:.5f} = {ratios[-1]:.2f}x", flush=True)
    print("SUMMARY " + json.dumps({"val_loss_episode_over_row": [round(r, 3) for r in ratios]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
