"""Harness overhead: samples/s of the built-in recipes through `arf-trainer train` vs a bare
loop, for the MLP (`bc`, reach_bc) and the CNN (`bc_pixels`, reach_pixels_bc).

Both sides train the template's model (bc: MLP 10 -> 3x256 -> 2, batch 256; bc_pixels: the
conv encoder + 2x256 head on 64x64 frames, batch 64; AdamW) on the same prepared shards with
the same thread count (OMP_NUM_THREADS=1, one process) and precision (`--precision bf16`: the
template's training.precision on one side, torch.autocast in the bare loop). Each side times
its own training loop, start-up (imports, MLflow, process launch) excluded on both: the harness
reports `timing.train_seconds` (and the process' CPU seconds, all threads) in its result, the
bare loop prints the same two figures. Inside the harness' loop is everything it does per step
and per epoch: its sampler, the preemption check, checkpoints at the template's interval,
validation, progress logging and metrics to the tracking spool. The bare loops
(bench/_bare_loops.py) are the leanest shuffle-and-slice loops a PyTorch user writes, without
a DataLoader, data and model on the device.

The harness validates on the validation split after every epoch (the template's
validation_split). That is training work a hand-written loop for the same job does too, not
harness overhead, so the headline ratio is against the bare loop plus the same per-epoch
validation loss; the ratio against the bare loop without validation is printed as well. The
sides run in rounds, back to back, rotating which goes first; each figure is the median of the
rounds' ratios. On a shared VM the speed of one loop drifts by up to +-25 % within minutes,
which a ratio of medians over separate runs reads as "overhead"; a round sees about the same
machine state on every side.

    .venv/bin/python bench/harness_overhead.py [--recipe all] [--epochs N] [--repeats 9]

`--recipe bc|bc_pixels|all` (all: both, one after the other); `--epochs` defaults to 10 for bc
and 2 for bc_pixels; bc_pixels renders `--pixel-episodes` (40: ~2,000 frames) expert episodes
at `--frame-size` (64) into the data hub first (`arf-trainer datahub seed --pixels`).

Other machines (a lent GPU without Airflow, duckdb or an MLflow server): `--save-inputs DIR`
writes the prepared shards and the train job spec there (here, where the prepare step runs):
DIR/prepare + DIR/train-jobspec.json for bc, DIR/pixels/... for bc_pixels;
`--prepared DIR/prepare --job-spec DIR/train-jobspec.json` then runs the same comparison (for
the job spec's recipe) with `python -m arf_trainer.cli train` started directly (the
environment the local backend sets), without arf_training. `--device cuda` runs both sides on
the GPU (the trainer takes CUDA whenever it is available and keeps data that fits on it: the
MLflow param data_placement; the bare loop holds the data and model on the GPU and
synchronizes before it stops its clock); `--device cpu`, the default, hides GPUs from both
sides. `--tracking none` points the trainer at an unreachable MLflow (http://127.0.0.1:9):
training goes on, the tracking stays in the spool (an MLflow outage, as the trainer handles it).
`--nondeterministic-side` adds a side to every round: the trainer with
`training.deterministic: false`, as free of determinism switches as the bare loop (which sets
none), so the harness' own overhead and the switches' cost (harness-nondet / harness) are read
apart (on a CPU they cost little; on CUDA, see bench/gpu/). `--async-checkpoint-side` adds one
with `training.async_checkpoint: true` (harness-async / harness: what writing the periodic
checkpoints in a thread saves).

    python3 bench/harness_overhead.py --device cuda --tracking none \
        --prepared .devcheck/pixels/prepare --job-spec .devcheck/pixels/train-jobspec.json
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

from _bare_loops import SCRIPTS as BARE_LOOPS  # noqa: E402


UNREACHABLE_TRACKING_URI = "http://127.0.0.1:9"  # the discard port: connection refused
# Optional sides: name -> (the flag that adds it, the template's training overrides, label)
EXTRA_SIDES = {
    "harness-nondet": ("nondeterministic_side", {"deterministic": False},
                       "deterministic: false"),
    "harness-async": ("async_checkpoint_side", {"async_checkpoint": True},
                      "async_checkpoint: true"),
}


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "ARF_HOME": str(root), "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true"}


# recipe -> (template, default epochs, folder under --save-inputs)
RECIPES = {"bc": ("reach_bc", 10, ""), "bc_pixels": ("reach_pixels_bc", 2, "pixels")}


def _template(epochs: int, recipe: str = "bc", precision: str = "fp32",
              frame_size: int | None = None, training: dict | None = None):
    import yaml

    from arf_training.templates import LoadedTemplate, TrainingTemplate

    path = REPO / "config_templates" / f"{RECIPES[recipe][0]}.yaml"
    data = yaml.safe_load(path.read_text())
    data["training"]["distributed"]["procs_per_node"] = 1
    # One thread like the bare loop (the local backend sets OMP_NUM_THREADS from resources.cpu;
    # reach_pixels_bc asks for 2).
    data["training"]["resources"]["cpu"] = 1
    data["training"]["hyperparameters"]["epochs"]["maximum"] = 10_000
    data["training"]["precision"] = precision
    data["training"].update(training or {})
    if frame_size is not None and recipe == "bc_pixels":  # the seed's PNG frames: decode them
        data["dataset"]["decode"]["image"]["shape"] = [frame_size, frame_size, 3]
    return LoadedTemplate(TrainingTemplate.model_validate(data), path, "bench")


def run_harness(root: Path, prepared: Path, epochs: int, tag: str, recipe: str = "bc",
                precision: str = "fp32", training: dict | None = None,
                batch_size: int | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of the training loop of `arf-trainer train`, as it reports them."""
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    settings = ArfSettings.from_env()
    spec = build_step_spec(_template(epochs, recipe, precision, training=training),
                           "train", RunIdentity("bench", f"harness-{recipe}-{tag}", "train"),
                           _conf(epochs, batch_size), settings)
    shutil.copytree(prepared, spec.workspace / "prepare")
    timing = LocalStepRunner().run(spec)["timing"]
    return timing["train_seconds"], timing["train_cpu_seconds"]


def run_harness_direct(root: Path, prepared: Path, job_spec: dict, epochs: int,
                       tag: str, precision: str | None = None,
                       training: dict | None = None,
                       batch_size: int | None = None) -> tuple[float, float]:
    """`run_harness` without arf_training: `python -m arf_trainer.cli train` with the
    environment the local backend sets, on a job spec saved by --save-inputs."""
    spec = copy.deepcopy(job_spec)
    spec["hyperparameters"]["epochs"] = epochs
    if batch_size is not None:
        spec["hyperparameters"]["batch_size"] = batch_size
    if precision is not None:
        spec["template"]["training"]["precision"] = precision
    spec["template"]["training"].update(training or {})
    spec["conf"] = {**spec.get("conf", {}), **_conf(epochs, batch_size)}  # the trigger conf
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


def _conf(epochs: int, batch_size: int | None) -> dict[str, int]:
    """The trigger conf of a harness run."""
    return {"epochs": epochs, **({} if batch_size is None else {"batch_size": batch_size})}


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


def save_inputs(target: Path, prepared: Path, epochs: int, recipe: str = "bc",
                precision: str = "fp32") -> None:
    """--save-inputs: the prepared shards and a train job spec, for --prepared/--job-spec."""
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    spec = build_step_spec(_template(epochs, recipe, precision), "train",
                           RunIdentity("bench", f"harness-{recipe}", "train"),
                           {"epochs": epochs}, ArfSettings.from_env())
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target / "prepare", ignore_errors=True)
    shutil.copytree(prepared, target / "prepare")
    (target / "train-jobspec.json").write_text(json.dumps(spec.job_spec, indent=2,
                                                          sort_keys=True))
    print(f"saved {target / 'prepare'} and {target / 'train-jobspec.json'}")


def run_bare(prepared: Path, epochs: int, env: dict[str, str], validate: bool,
             device: str = "cpu", recipe: str = "bc", precision: str = "fp32",
             batch_size: int | None = None) -> tuple[float, float, int]:
    argv = [sys.executable, "-c", BARE_LOOPS[recipe], str(prepared), str(epochs),
            "val" if validate else "noval", device, precision,
            *([] if batch_size is None else [str(batch_size)])]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the bare {recipe} loop exited {proc.returncode}:\n"
                         f"{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6:])
    return result["seconds"], result["cpu_seconds"], result["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=(*RECIPES, "all"), default="all",
                        help="which recipe's template to measure (all: bc, then bc_pixels); "
                        "with --prepared, the job spec's recipe")
    parser.add_argument("--epochs", type=int,
                        help="epochs per run (default: 10 for bc, 2 for bc_pixels)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both sides: the template's training.precision, the bare loop's "
                        "autocast")
    parser.add_argument("--pixel-episodes", type=int, default=40,
                        help="bc_pixels: expert episodes rendered into the data hub (50 frames "
                        "each)")
    parser.add_argument("--frame-size", type=int, default=64, help="bc_pixels: frame size")
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
                        "(bc_pixels: DIR/pixels/...) for --prepared/--job-spec elsewhere, "
                        "and stop")
    parser.add_argument("--batch-size", type=int,
                        help="both sides: this batch size instead of the template's (bc 256, "
                        "bc_pixels 64); a small one makes a CPU step launch-bound like a small "
                        "model's step on a GPU, so per-step overhead shows")
    parser.add_argument("--async-checkpoint-side", action="store_true",
                        help="also run the trainer with training.async_checkpoint: true in "
                        "every round (side 'harness-async')")
    parser.add_argument("--nondeterministic-side", action="store_true",
                        help="also run the trainer with training.deterministic: false in every "
                        "round (side 'harness-nondet'): the harness without the determinism "
                        "switches the bare loop does not set either")
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
            figures = {recipe: _measure(args, root, env, recipe) for recipe in _recipes(args)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json is not None and args.save_inputs is None:
        args.json.write_text(json.dumps({
            "device": args.device, "tracking": args.tracking, "precision": args.precision,
            "repeats": args.repeats, "recipes": figures}, indent=2))
    return 0


def _recipes(args: argparse.Namespace) -> list[str]:
    if args.prepared is not None:
        return [json.loads(args.job_spec.read_text())["template"]["training"]["recipe"]]
    return list(RECIPES) if args.recipe == "all" else [args.recipe]


def _prepare(root: Path, env: dict[str, str], recipe: str = "bc",
             args: argparse.Namespace | None = None) -> Path:
    seed = [str(BIN / "arf-trainer"), "datahub", "seed", "--hub", str(root / "datahub")]
    if recipe == "bc_pixels":  # reach_demos stays as seeded (idempotent); reach_pixels is new
        seed += ["--pixels", "--episodes", str(args.pixel_episodes),
                 "--frame-size", str(args.frame_size)]
    subprocess.run(seed, env=env, check=True, capture_output=True)
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    spec = build_step_spec(_template(1, recipe, frame_size=args.frame_size if args else None),
                           "prepare",
                           RunIdentity("bench", f"prep-{recipe}", "prepare"), {},
                           ArfSettings.from_env())
    LocalStepRunner().run(spec)
    return spec.workspace / "prepare"


def _measure(args: argparse.Namespace, root: Path, env: dict[str, str],
             recipe: str) -> dict | None:
    epochs = args.epochs or RECIPES[recipe][1]
    if args.save_inputs is not None:
        target = args.save_inputs.resolve() / RECIPES[recipe][2]
        save_inputs(target, _prepare(root, env, recipe, args), epochs, recipe, args.precision)
        return None
    if args.prepared is not None:
        prepared = args.prepared.resolve()
        job_spec = json.loads(args.job_spec.read_text())

        def harness(tag: str, training: dict | None = None) -> tuple[float, float]:
            return run_harness_direct(root, prepared, job_spec, epochs, tag, args.precision,
                                      training, args.batch_size)
    else:
        prepared = _prepare(root, env, recipe, args)

        def harness(tag: str, training: dict | None = None) -> tuple[float, float]:
            return run_harness(root, prepared, epochs, tag, recipe, args.precision,
                               training, args.batch_size)
    sides: dict[str, list[tuple[float, float]]] = {"harness": [], "bare+val": [], "bare": []}
    for side, wanted in EXTRA_SIDES.items():
        if getattr(args, wanted[0]):
            sides[side] = []
    rows = json.loads((prepared / "manifest.json").read_text())["train_rows"]
    for r in range(args.repeats):
        def bare_side(validate: bool) -> tuple[float, float]:
            seconds, cpu, bare_rows = run_bare(prepared, epochs, env, validate, args.device,
                                               recipe, args.precision, args.batch_size)
            assert bare_rows == rows, (bare_rows, rows)  # the same training split
            return seconds, cpu

        runs = {"harness": lambda: harness(str(r)),
                "bare+val": lambda: bare_side(True), "bare": lambda: bare_side(False),
                **{side: lambda side=side: harness(f"{r}-{side}", EXTRA_SIDES[side][1])
                   for side in EXTRA_SIDES}}
        runs = {name: run for name, run in runs.items() if name in sides}
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]  # rotate who goes first
        for name in order:
            sides[name].append(runs[name]())
            # progress, for runs cut short by a time limit
            print(f"{recipe} round {r + 1}/{args.repeats} {name}: "
                  f"{epochs * rows / sides[name][-1][0]:,.0f} samples/s", flush=True)
    return _report(args, recipe, epochs, rows, sides)


def _report(args: argparse.Namespace, recipe: str, epochs: int, rows: int,
            sides: dict[str, list[tuple[float, float]]]) -> dict:
    batch = args.batch_size or {"bc": 256, "bc_pixels": 64}[recipe]
    print(f"\n{recipe} recipe, {rows} training rows, batch {batch}, {epochs} epochs, 1 process, "
          f"OMP_NUM_THREADS=1, device {args.device}, {args.precision}; training-loop "
          f"throughput, {args.repeats} back-to-back rounds")
    labels = {"harness": "arf-trainer train",
              **{side: f"arf-trainer train, {label}" for side, (_, _, label)
                 in EXTRA_SIDES.items()},
              "bare+val": "bare loop + per-epoch validation",
              "bare": "bare loop, no validation"}
    for name, label in labels.items():
        if name in sides:
            rates = [epochs * rows / wall for wall, _ in sides[name]]
            print(f"{label:40}: {statistics.median(rates):8,.0f} samples/s median  (runs: "
                  f"{', '.join(f'{v:,.0f}' for v in rates)})")

    def ratios(side: str, baseline: str, index: int) -> list[float]:
        # side's samples/s over baseline's samples/s, per round
        return [b[index] / h[index] for h, b in zip(sides[side], sides[baseline])]

    def best(side: str, baseline: str) -> float:
        # timeit's estimator: interference only ever slows a run, so the fastest run of
        # each side is its closest reading of the intrinsic cost
        return (min(w for w, _ in sides[baseline]) / min(w for w, _ in sides[side]))

    pairs = [(side, baseline) for side in ("harness", *EXTRA_SIDES) if side in sides
             for baseline in ("bare+val", "bare")]
    pairs += [(side, "harness") for side in EXTRA_SIDES if side in sides]
    what = {"bare+val": "same work (bare loop validates each epoch too)",
            "bare": "strict (bare loop skips validation)",
            "harness": "vs the default trainer"}
    for side, baseline in pairs:
        print(f"ratio {side} / {baseline:8} {what[baseline]}: wall "
              f"{statistics.median(ratios(side, baseline, 0)):.3f} (rounds: "
              f"{', '.join(f'{v:.3f}' for v in ratios(side, baseline, 0))}), CPU seconds "
              f"{statistics.median(ratios(side, baseline, 1)):.3f}, best run vs best run "
              f"{best(side, baseline):.3f}")
    headline = statistics.median(ratios("harness", "bare+val", 0))
    print(f"{recipe}: harness overhead ratio (same work, wall, median of rounds): "
          f"{headline:.3f}   (goal >= 0.95: {'PASS' if headline >= 0.95 else 'FAIL'})")
    figures = {"epochs": epochs, "rows": rows,
               "samples_per_s": {name: [epochs * rows / wall for wall, _ in runs]
                                 for name, runs in sides.items()},
               "seconds": sides,
               "ratio_rounds": {b: ratios("harness", b, 0) for b in ("bare+val", "bare")},
               "ratio_wall": {b: statistics.median(ratios("harness", b, 0))
                              for b in ("bare+val", "bare")},
               "ratio_cpu": {b: statistics.median(ratios("harness", b, 1))
                             for b in ("bare+val", "bare")},
               "best_vs_best": {b: best("harness", b) for b in ("bare+val", "bare")},
               "headline_ratio": headline}
    for side in EXTRA_SIDES:
        if side not in sides:
            continue
        key = "nondet_ratio_wall" if side == "harness-nondet" else f"{side}_ratio_wall"
        figures[key] = {b: statistics.median(ratios(side, b, 0))
                                        for b in ("bare+val", "bare", "harness")}
    return figures

if __name__ == "__main__":
    sys.exit(main())
