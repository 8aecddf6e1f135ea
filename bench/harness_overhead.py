"""Harness overhead: samples/s of the `bc` recipe through `arf-trainer train` vs a bare loop.

Both sides train the reach_bc model (MLP 10 -> 3x256 -> 2, AdamW, batch 256) on the same
prepared shards with the same thread count (OMP_NUM_THREADS=1, one process). Each side times its
own training loop, start-up (imports, MLflow, process launch) excluded on both: the harness
reports `timing.train_seconds` (and the process' CPU seconds, all threads) in its result, the
bare loop prints the same two figures. Inside the
harness' loop is everything it does per step and per epoch: DistributedSampler, the preemption
check, checkpoints at the template's interval, validation, progress logging and metrics to the
tracking spool. The bare loop is the leanest shuffle-and-slice loop, without a DataLoader.

The harness validates on the validation split after every epoch (the template's
validation_split; ~3 % of this small model's epoch). That is training work a hand-written loop
for the same job does too, not harness overhead, so the headline ratio is against the bare loop
plus the same per-epoch validation loss; the ratio against the bare loop without validation is
printed as well. The sides run in rounds, back to back, rotating which goes first; each figure
is the median of the rounds' ratios. On a shared VM the speed of one loop drifts by up to
+-25 % within minutes, which a ratio of medians over separate runs reads as "overhead"; a round
sees about the same machine state on every side.

    .venv/bin/python bench/harness_overhead.py [--epochs 10] [--repeats 9]

Other machines (a lent GPU without Airflow, duckdb or an MLflow server): `--save-inputs DIR`
writes the prepared shards and the train job spec there (here, where the prepare step runs);
`--prepared DIR/prepare --job-spec DIR/train-jobspec.json` then runs the same comparison with
`python -m arf_trainer.cli train` started directly (the environment the local backend sets),
without arf_training. `--device cuda` runs both sides on the GPU (the trainer takes CUDA
whenever it is available; the bare loop then holds the data and model on the GPU and
synchronizes before it stops its clock); `--device cpu`, the default, hides GPUs from both
sides. `--tracking none` points the trainer at an unreachable MLflow (http://127.0.0.1:9):
training goes on, the tracking stays in the spool (an MLflow outage, as the trainer handles it).

    python3 bench/harness_overhead.py --device cuda --tracking none \
        --prepared .devcheck/prepare --job-spec .devcheck/train-jobspec.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
sys.path.insert(0, str(REPO / "bench"))

from _mlflow_server import mlflow_server  # noqa: E402

BARE_LOOP = r'''
import json, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
from torch import nn
prepare, epochs, validate = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "val"
device = torch.device(sys.argv[4] if len(sys.argv) > 4 else "cpu")
manifest = json.load(open(f"{prepare}/manifest.json"))
def split(name):
    table = pa.concat_tables([pq.read_table(f"{prepare}/{s['path']}")
                              for s in manifest["shards"][name]])
    cols = lambda names: torch.tensor(np.stack([table[c].to_numpy() for c in names], 1),
                                      dtype=torch.float32)
    return cols(manifest["features"]), cols(manifest["targets"])
x, y = split("train")
x_val, y_val = split("val")
x_mean, x_std, y_mean, y_std = x.mean(0), x.std(0).clamp_min(1e-6), y.mean(0), y.std(0).clamp_min(1e-6)
x, y = (x - x_mean) / x_std, (y - y_mean) / y_std
x_val, y_val = (x_val - x_mean) / x_std, (y_val - y_mean) / y_std
x, y, x_val, y_val = (t.to(device) for t in (x, y, x_val, y_val))  # no-ops on the CPU
torch.manual_seed(0)
layers, width = [], x.shape[1]
for _ in range(3):
    layers += [nn.Linear(width, 256), nn.ReLU()]; width = 256
model = nn.Sequential(*layers, nn.Linear(width, y.shape[1])).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
t0, c0 = time.perf_counter(), time.process_time()
for epoch in range(epochs):
    # The leanest shuffle-and-slice loop (no DataLoader): the strictest baseline.
    model.train()
    perm = torch.randperm(len(x), generator=g).to(device)
    for i in range(0, len(x), 256):
        idx = perm[i:i + 256]
        xb, yb = x[idx], y[idx]
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if validate:  # the per-epoch validation loss that the harness reports too
        model.eval()
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(model(x_val), y_val).item()
if device.type == "cuda":
    torch.cuda.synchronize()  # the queued steps are part of the loop's time
print("RESULT" + json.dumps({"seconds": time.perf_counter() - t0,
                            "cpu_seconds": time.process_time() - c0, "rows": len(x)}))
'''


UNREACHABLE_TRACKING_URI = "http://127.0.0.1:9"  # the discard port: connection refused


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


def run_harness(root: Path, prepared: Path, epochs: int, tag: str) -> tuple[float, float]:
    """(wall, CPU) seconds of the training loop of `arf-trainer train`, as it reports them."""
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    settings = ArfSettings.from_env()
    spec = build_step_spec(_template(epochs), "train",
                           RunIdentity("bench", f"harness-{tag}", "train"), {"epochs": epochs},
                           settings)
    shutil.copytree(prepared, spec.workspace / "prepare")
    timing = LocalStepRunner().run(spec)["timing"]
    return timing["train_seconds"], timing["train_cpu_seconds"]


def run_harness_direct(root: Path, prepared: Path, job_spec: dict, epochs: int,
                       tag: str) -> tuple[float, float]:
    """`run_harness` without arf_training: `python -m arf_trainer.cli train` with the
    environment the local backend sets, on a job spec saved by --save-inputs."""
    spec = copy.deepcopy(job_spec)
    spec["hyperparameters"]["epochs"] = epochs
    spec["conf"] = {**spec.get("conf", {}), "epochs": epochs}  # the trigger conf, as saved
    spec["run"] = {**spec["run"], "run_id": f"harness-{tag}", "try_number": 1}
    workspace = root / "direct" / f"harness-{tag}"
    shutil.copytree(prepared, workspace / "prepare")
    (workspace / "jobspec").mkdir()
    (workspace / "jobspec" / "train-try1.json").write_text(json.dumps(spec, sort_keys=True))
    proc = subprocess.run([sys.executable, "-m", "arf_trainer.cli", "train"],
                          env=trainer_env(workspace, workspace / "jobspec" / "train-try1.json",
                                          spec, os.environ["ARF_TRACKING_URI"], root),
                          cwd=workspace, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arf-trainer train exited {proc.returncode}:\n"
                         f"{(proc.stdout + proc.stderr)[-4000:]}")
    timing = json.loads((workspace / "train" / "result.json").read_text())["timing"]
    return timing["train_seconds"], timing["train_cpu_seconds"]


def trainer_env(workspace: Path, job_spec_path: Path, spec: dict, tracking_uri: str,
                root: Path) -> dict[str, str]:
    """The ARF_* environment of a single-process train step (as LocalStepRunner sets it),
    over this process' environment (PYTHONPATH, CUDA_VISIBLE_DEVICES, ...)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ARF_", "MLFLOW_")) and k not in ("RANK", "WORLD_SIZE",
                                                                 "LOCAL_RANK")}
    env.update({
        "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
        "ARF_JOB_SPEC": str(job_spec_path), "ARF_WORKSPACE": str(workspace),
        "ARF_RESULT_PATH": str(workspace / "train" / "result.json"),
        "ARF_TRACKING_URI": tracking_uri, "ARF_ARTIFACT_ROOT": str(root / "artifacts"),
        "ARF_DATAHUB_URI": str(root / "datahub"), "ARF_DAG_ID": spec["run"]["dag_id"],
        "ARF_RUN_ID": spec["run"]["run_id"], "ARF_TASK_ID": "train", "ARF_TRY_NUMBER": "1",
    })
    return env


def save_inputs(target: Path, prepared: Path, epochs: int) -> None:
    """--save-inputs: the prepared shards and a train job spec, for --prepared/--job-spec."""
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    spec = build_step_spec(_template(epochs), "train", RunIdentity("bench", "harness", "train"),
                           {"epochs": epochs}, ArfSettings.from_env())
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target / "prepare", ignore_errors=True)
    shutil.copytree(prepared, target / "prepare")
    (target / "train-jobspec.json").write_text(json.dumps(spec.job_spec, indent=2,
                                                          sort_keys=True))
    print(f"saved {target / 'prepare'} and {target / 'train-jobspec.json'}")


def run_bare(prepared: Path, epochs: int, env: dict[str, str],
             validate: bool, device: str = "cpu") -> tuple[float, float, int]:
    argv = [sys.executable, "-c", BARE_LOOP, str(prepared), str(epochs),
            "val" if validate else "noval"]
    if device != "cpu":
        argv.append(device)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6:])
    return result["seconds"], result["cpu_seconds"], result["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tracking", choices=("server", "sqlite", "none"), default="server",
                        help="server: a real `mlflow server` process, as in production and "
                        "`arf up` (default); sqlite: the in-process store that `airflow dags "
                        f"test` uses; none: an unreachable URI ({UNREACHABLE_TRACKING_URI}), "
                        "tracking stays in the spool (machines without MLflow)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides train (default cpu: GPUs are hidden from both)")
    parser.add_argument("--prepared", type=Path,
                        help="a prepared folder (manifest.json + shards) saved by "
                        "--save-inputs: skip seeding and prepare, run the trainer directly")
    parser.add_argument("--job-spec", type=Path,
                        help="with --prepared: the train job spec saved by --save-inputs")
    parser.add_argument("--save-inputs", type=Path, metavar="DIR",
                        help="seed and prepare, save DIR/prepare and DIR/train-jobspec.json "
                        "for --prepared/--job-spec elsewhere, and stop")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if (args.prepared is None) != (args.job_spec is None):
        parser.error("--prepared and --job-spec go together")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here")
    root = Path(tempfile.mkdtemp(prefix="arf-harness-bench-"))
    env = _env(root)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer would take a GPU if it saw one
    os.environ.update({k: v for k, v in env.items()
                       if k in ("ARF_HOME", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")})
    try:
        with contextlib.ExitStack() as stack:
            if args.tracking == "server" and args.save_inputs is None:
                os.environ["ARF_TRACKING_URI"] = stack.enter_context(mlflow_server(root))
            elif args.tracking == "none":
                os.environ["ARF_TRACKING_URI"] = UNREACHABLE_TRACKING_URI
            elif args.prepared is not None:  # sqlite, without arf_training's settings
                os.environ["ARF_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
            _measure(args, root, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _prepare(root: Path, env: dict[str, str]) -> Path:
    subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub",
                    str(root / "datahub")], env=env, check=True, capture_output=True)
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    spec = build_step_spec(_template(1), "prepare", RunIdentity("bench", "prep", "prepare"),
                           {}, ArfSettings.from_env())
    LocalStepRunner().run(spec)
    return spec.workspace / "prepare"


def _measure(args: argparse.Namespace, root: Path, env: dict[str, str]) -> None:
    epochs = args.epochs
    if args.save_inputs is not None:
        save_inputs(args.save_inputs.resolve(), _prepare(root, env), epochs)
        return
    if args.prepared is not None:
        prepared = args.prepared.resolve()
        job_spec = json.loads(args.job_spec.read_text())

        def harness(tag: str) -> tuple[float, float]:
            return run_harness_direct(root, prepared, job_spec, epochs, tag)
    else:
        prepared = _prepare(root, env)

        def harness(tag: str) -> tuple[float, float]:
            return run_harness(root, prepared, epochs, tag)
    sides: dict[str, list[tuple[float, float]]] = {"harness": [], "bare+val": [], "bare": []}
    rows = 0
    for r in range(args.repeats):
        def bare_side(validate: bool) -> tuple[float, float]:
            nonlocal rows
            seconds, cpu, rows = run_bare(prepared, epochs, env, validate, args.device)
            return seconds, cpu

        runs = {"harness": lambda: harness(str(r)),
                "bare+val": lambda: bare_side(True), "bare": lambda: bare_side(False)}
        order = list(runs)[r % 3:] + list(runs)[:r % 3]  # rotate who goes first
        for name in order:
            sides[name].append(runs[name]())
            if args.prepared is not None:  # progress, for runs cut short by a time limit
                n = json.loads((prepared / "manifest.json").read_text())["train_rows"]
                print(f"round {r + 1}/{args.repeats} {name}: "
                      f"{epochs * n / sides[name][-1][0]:,.0f} samples/s", flush=True)
    where = "" if args.device == "cpu" else f", device {args.device}"
    print(f"bc recipe, {rows} training rows, batch 256, {epochs} epochs, 1 process, "
          f"OMP_NUM_THREADS=1{where}; training-loop throughput, {args.repeats} back-to-back "
          "rounds")
    for name, label in (("harness", "arf-trainer train"),
                        ("bare+val", "bare loop + per-epoch validation"),
                        ("bare", "bare loop, no validation")):
        rates = [epochs * rows / wall for wall, _ in sides[name]]
        print(f"{label:33}: {statistics.median(rates):8,.0f} samples/s median  (runs: "
              f"{', '.join(f'{v:,.0f}' for v in rates)})")

    def ratio(baseline: str, index: int) -> float:
        # harness samples/s over baseline samples/s, per round, then the median
        return statistics.median(b[index] / h[index]
                                 for h, b in zip(sides["harness"], sides[baseline]))

    def best(baseline: str) -> float:
        # timeit's estimator: interference only ever slows a run, so the fastest run of
        # each side is its closest reading of the intrinsic cost
        return (min(w for w, _ in sides[baseline]) / min(w for w, _ in sides["harness"]))

    for baseline, what in (("bare+val", "same work (bare loop validates each epoch too)"),
                           ("bare", "strict (bare loop skips validation)")):
        print(f"ratio harness / {baseline:8} {what}: wall {ratio(baseline, 0):.3f}, "
              f"CPU seconds {ratio(baseline, 1):.3f}, best run vs best run "
              f"{best(baseline):.3f}")
    headline = ratio("bare+val", 0)
    print(f"harness overhead ratio (same work, wall, median of rounds): {headline:.3f}   "
          f"(goal >= 0.95: {'PASS' if headline >= 0.95 else 'FAIL'})")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "device": args.device, "tracking": args.tracking, "epochs": epochs,
            "repeats": args.repeats, "rows": rows,
            "samples_per_s": {name: [epochs * rows / wall for wall, _ in runs]
                              for name, runs in sides.items()},
            "seconds": sides,
            "ratio_wall": {b: ratio(b, 0) for b in ("bare+val", "bare")},
            "ratio_cpu": {b: ratio(b, 1) for b in ("bare+val", "bare")},
            "best_vs_best": {b: best(b) for b in ("bare+val", "bare")},
            "headline_ratio": headline}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
