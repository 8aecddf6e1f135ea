"""Harness overhead: samples/s of the `bc` recipe through `arf-trainer train` vs a bare loop.

Both sides train the reach_bc model (MLP 10 -> 3x256 -> 2, AdamW, batch 256) on the same
prepared shards with the same thread count (OMP_NUM_THREADS=1, one process). Each side times its
own training loop, start-up (imports, MLflow, process launch) excluded on both: the harness
reports `timing.train_seconds` in its result, the bare loop prints its loop time. Inside the
harness' loop is everything it does per step and per epoch: DistributedSampler, the preemption
check, checkpoints at the template's interval, validation, progress logging and metrics to the
tracking spool. The bare loop is the leanest shuffle-and-slice loop, without a DataLoader.

    .venv/bin/python bench/harness_overhead.py [--epochs 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

BARE_LOOP = r'''
import glob, json, sys, time
import numpy as np, pyarrow.parquet as pq, torch
from torch import nn
prepare, epochs = sys.argv[1], int(sys.argv[2])
manifest = json.load(open(f"{prepare}/manifest.json"))
table = pq.read_table([f"{prepare}/{s['path']}" for s in manifest["shards"]["train"]][0])
x = torch.tensor(np.stack([table[c].to_numpy() for c in manifest["features"]], 1), dtype=torch.float32)
y = torch.tensor(np.stack([table[c].to_numpy() for c in manifest["targets"]], 1), dtype=torch.float32)
x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
y = (y - y.mean(0)) / y.std(0).clamp_min(1e-6)
torch.manual_seed(0)
layers, width = [], x.shape[1]
for _ in range(3):
    layers += [nn.Linear(width, 256), nn.ReLU()]; width = 256
model = nn.Sequential(*layers, nn.Linear(width, y.shape[1]))
opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
t0 = time.perf_counter()
for epoch in range(epochs):
    # The leanest shuffle-and-slice loop (no DataLoader): the strictest baseline.
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), 256):
        idx = perm[i:i + 256]
        xb, yb = x[idx], y[idx]
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
print("RESULT" + json.dumps({"seconds": time.perf_counter() - t0, "rows": len(x)}))
'''


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "ARF_HOME": str(root), "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true"}


def _template(epochs: int):
    import yaml

    from arf_training.templates import LoadedTemplate, TrainingTemplate

    path = REPO / "config_templates" / "reach_bc.yaml"
    data = yaml.safe_load(path.read_text())
    data["training"]["distributed"]["procs_per_node"] = 1
    data["training"]["hyperparameters"]["epochs"]["maximum"] = 10_000
    return LoadedTemplate(TrainingTemplate.model_validate(data), path, "bench")


def run_harness(root: Path, prepared: Path, epochs: int, tag: str) -> float:
    """Seconds of the training loop of `arf-trainer train`, as the trainer reports them."""
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    settings = ArfSettings.from_env()
    spec = build_step_spec(_template(epochs), "train",
                           RunIdentity("bench", f"harness-{tag}", "train"), {"epochs": epochs},
                           settings)
    shutil.copytree(prepared, spec.workspace / "prepare")
    return LocalStepRunner().run(spec)["timing"]["train_seconds"]


def run_bare(prepared: Path, epochs: int, env: dict[str, str]) -> tuple[float, int]:
    proc = subprocess.run([sys.executable, "-c", BARE_LOOP, str(prepared), str(epochs)],
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6:])
    return result["seconds"], result["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="arf-harness-bench-"))
    env = _env(root)
    os.environ.update({k: v for k, v in env.items() if k in ("ARF_HOME", "OMP_NUM_THREADS")})
    try:
        subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub",
                        str(root / "datahub")], env=env, check=True, capture_output=True)
        from arf_training.backends.local import LocalStepRunner
        from arf_training.settings import ArfSettings
        from arf_training.stepspec import RunIdentity, build_step_spec

        spec = build_step_spec(_template(1), "prepare", RunIdentity("bench", "prep", "prepare"),
                               {}, ArfSettings.from_env())
        LocalStepRunner().run(spec)
        prepared = spec.workspace / "prepare"
        epochs = args.epochs
        harness, bare = [], []
        rows = 0
        for r in range(args.repeats):  # interleaved, so load changes hit both sides alike
            t_bare, rows = run_bare(prepared, epochs, env)
            t_harness = run_harness(root, prepared, epochs, str(r))
            harness.append(epochs * rows / t_harness)
            bare.append(epochs * rows / t_bare)
        h, b = statistics.median(harness), statistics.median(bare)
        print(f"bc recipe, {rows} training rows, batch 256, {epochs} epochs, 1 process, "
              f"OMP_NUM_THREADS=1; training-loop throughput, median of {args.repeats}")
        print(f"arf-trainer train : {h:10,.0f} samples/s  (runs: "
              f"{', '.join(f'{v:,.0f}' for v in harness)})")
        print(f"bare PyTorch loop : {b:10,.0f} samples/s  (runs: "
              f"{', '.join(f'{v:,.0f}' for v in bare)})")
        print(f"ratio harness / bare: {h / b:.3f}   (goal >= 0.95: {'PASS' if h / b >= 0.95 else 'FAIL'})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
