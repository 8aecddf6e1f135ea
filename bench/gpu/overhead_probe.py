"""Where does the trainer's per-step time go on a GPU? One process, the saved inputs of
bench/harness_overhead.py --save-inputs, back-to-back variants of both sides:

* bare / bare+det: the bare loop of bench/_bare_loops.py, without and with
  torch.use_deterministic_algorithms(True) (the trainer's default), in this process, which
  has CUBLAS_WORKSPACE_CONFIG=:4096:8 set (the trainer sets it before CUDA starts);
* bare-proc / bare-proc-cublas: the same loop as bench/harness_overhead.py runs it, a process
  of its own, without and with CUBLAS_WORKSPACE_CONFIG (the first epoch's CUDA warm-up counts);
* trainer: `run_train` in-process as the train step runs it; trainer-nofill: the same with
  torch.utils.deterministic.fill_uninitialized_memory off; trainer-nondet: the template's
  training.deterministic: false (the trainer's own opt-out);
* then a cProfile of one trainer run (top functions by own time).

Usage (repo root): python bench/gpu/overhead_probe.py --inputs .devcheck [--device cuda]
[--epochs 30] [--rounds 2] [--recipe-dir .devcheck/pixels]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "training_container")]
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts, both sides
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import torch  # noqa: E402

from _bare_loops import SCRIPTS  # noqa: E402


def bare(inputs: Path, recipe: str, epochs: int, device: str, det: bool) -> float:
    argv, out = sys.argv, io.StringIO()
    sys.argv = ["bare", str(inputs / "prepare"), str(epochs), "val", device, "fp32"]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        with contextlib.redirect_stdout(out):
            exec(SCRIPTS[recipe], {"__name__": "bare"})
    finally:
        sys.argv = argv
        torch.use_deterministic_algorithms(previous)
    result = json.loads(out.getvalue().split("RESULT", 1)[1])
    return epochs * result["rows"] / result["seconds"]


def bare_process(inputs: Path, recipe: str, epochs: int, device: str, cublas: bool) -> float:
    from harness_overhead import run_bare

    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if cublas:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    seconds, _, rows = run_bare(inputs / "prepare", epochs, env, True, device, recipe)
    return epochs * rows / seconds


def trainer(inputs: Path, epochs: int, root: Path, tag: str, profile: bool = False,
            deterministic: bool = True) -> float:
    from harness_overhead import trainer_env

    from arf_trainer.spec import StepEnv
    from arf_trainer.trainer.run import run_train

    spec = json.loads((inputs / "train-jobspec.json").read_text())
    spec["hyperparameters"]["epochs"] = epochs
    spec["template"]["training"]["deterministic"] = deterministic
    spec["conf"] = {**spec.get("conf", {}), "epochs": epochs}
    spec["run"] = {**spec["run"], "run_id": f"probe-{tag}", "try_number": 1}
    ws = root / tag
    shutil.copytree(inputs / "prepare", ws / "prepare")
    (ws / "jobspec").mkdir()
    (ws / "jobspec" / "t.json").write_text(json.dumps(spec))
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(trainer_env(ws, ws / "jobspec" / "t.json", spec, "http://127.0.0.1:9",
                                  root))
    os.chdir(ws)
    prof = cProfile.Profile() if profile else None
    try:
        if prof:
            prof.enable()
        result = run_train(StepEnv.from_environ())
    finally:
        if prof:
            prof.disable()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())
    rows = json.loads((inputs / "prepare" / "manifest.json").read_text())
    train_rows = sum(s["rows"] for s in rows["shards"]["train"])
    return epochs * train_rows / result["timing"]["train_seconds"]


@contextlib.contextmanager
def variant(name: str):
    fill = torch.utils.deterministic.fill_uninitialized_memory
    if name == "trainer-nofill":
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    spec = json.loads((args.inputs / "train-jobspec.json").read_text())
    recipe = spec["template"]["training"]["recipe"]
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    root = Path(tempfile.mkdtemp(prefix="arf-probe-"))
    bare(args.inputs, recipe, 1, args.device, False)  # warm-up: CUDA context, cuBLAS
    sides = {"bare": lambda t: bare(args.inputs, recipe, args.epochs, args.device, False),
             "bare+det": lambda t: bare(args.inputs, recipe, args.epochs, args.device, True),
             "bare-proc": lambda t: bare_process(args.inputs, recipe, args.epochs, args.device,
                                                 False),
             "bare-proc-cublas": lambda t: bare_process(args.inputs, recipe, args.epochs,
                                                        args.device, True)}
    for name in ("trainer", "trainer-nofill", "trainer-nondet"):
        def run(t, name=name):
            with variant(name):
                return trainer(args.inputs, args.epochs, root, f"{name}-{t}",
                               deterministic=name != "trainer-nondet")
        sides[name] = run
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, side in sides.items():
            t0 = time.perf_counter()
            rates[name].append(side(r))
            print(f"round {r + 1} {name:16} {rates[name][-1]:10,.0f} samples/s "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    base = statistics.median(rates["bare"])
    print(f"\n{recipe}, {args.epochs} epochs, device {args.device}")
    for name, values in rates.items():
        print(f"{name:16} {statistics.median(values):10,.0f} samples/s  x{statistics.median(values) / base:.3f} of bare")
    trainer(args.inputs, args.epochs, root, "profile", profile=True)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
