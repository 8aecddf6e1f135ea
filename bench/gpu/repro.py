"""Check 1: bitwise reproducibility of `arf-trainer train` (the saved job spec's recipe: reach_bc's
bc, or reach_pixels_bc's bc_pixels; 1 process).

Runs `python -m arf_trainer.cli train` on the saved job spec and prepared shards in fresh
workspaces (`--precision` / `--compile` override the spec's training.precision / compile): `--cuda-runs` times with the GPU visible (the trainer takes CUDA when it sees it),
`--cpu-runs` times with CUDA_VISIBLE_DEVICES="" (OMP_NUM_THREADS=1), and writes each run's
final weights sha256, steps, metrics and timing to --json. Tracking goes to an unreachable
MLflow (the spool keeps it), as on a machine without MLflow.

    python3 bench/gpu/repro.py --cuda-runs 2 --cpu-runs 1 --json $OUT/repro.json \
        --prepared .devcheck/prepare --job-spec .devcheck/train-jobspec.json [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]  # this file is bench/gpu/repro.py
sys.path.insert(0, str(REPO / "bench"))

from harness_overhead import UNREACHABLE_TRACKING_URI, trainer_env  # noqa: E402

PROBE = ("import json, torch; print('PROBE' + json.dumps({'cuda': torch.cuda.is_available(), "
         "'torch': torch.__version__, 'device_name': torch.cuda.get_device_name(0) "
         "if torch.cuda.is_available() else None}))")


def train_once(root: Path, job_spec: dict, prepared: Path, tag: str, cuda: bool,
               log) -> dict:
    workspace = root / f"ws-{tag}"
    shutil.copytree(prepared, workspace / "prepare")
    spec = {**job_spec, "run": {**job_spec["run"], "run_id": f"repro-{tag}", "try_number": 1}}
    spec_path = workspace / "jobspec" / "train-try1.json"
    spec_path.parent.mkdir(parents=True)
    spec_path.write_text(json.dumps(spec, sort_keys=True))
    env = trainer_env(workspace, spec_path, spec, UNREACHABLE_TRACKING_URI, root)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                           text=True, check=True)
    seen = json.loads(probe.stdout[probe.stdout.index("PROBE") + 5:])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "arf_trainer.cli", "train"], env=env,
                          cwd=workspace, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write(f"===== train {tag} (cuda visible: {seen['cuda']}), exit {proc.returncode}, "
              f"{wall:.1f} s =====\n{proc.stdout}{proc.stderr}\n")
    log.flush()
    run = {"tag": tag, "cuda_visible": seen["cuda"], "device_name": seen["device_name"],
           "torch": seen["torch"], "exit_code": proc.returncode, "process_seconds": wall}
    if proc.returncode == 0:
        result = json.loads((workspace / "train" / "result.json").read_text())
        run.update({k: result.get(k) for k in ("weights_sha256", "steps", "metrics", "timing",
                                               "config_hash", "mlflow_run_id",
                                               "data_placement")})
        spool = workspace / "train" / "tracking-spool.jsonl"
        run["spool_records"] = (sum(1 for _ in spool.open()) if spool.is_file() else None)
    else:
        run["error_tail"] = (proc.stdout + proc.stderr)[-2000:]
    print(f"{tag}: exit {proc.returncode}, cuda visible {seen['cuda']}, "
          f"sha256 {run.get('weights_sha256')}, {wall:.1f} s", flush=True)
    return run


def write_summary(path: Path, job_spec: dict, runs: list[dict], final: bool) -> dict:
    def shas(kind: str) -> list:
        return [r.get("weights_sha256") for r in runs if r["tag"].startswith(kind)]

    cuda_shas, cpu_shas = shas("cuda"), shas("cpu")
    summary = {
        "complete": final,
        "epochs": job_spec["hyperparameters"]["epochs"],
        "recipe": job_spec["template"]["training"]["recipe"],
        "precision": job_spec["template"]["training"].get("precision", "fp32"),
        "compile": job_spec["template"]["training"].get("compile", False),
        "runs": runs,
        "cuda_sha256": cuda_shas,
        "cpu_sha256": cpu_shas,
        "cuda_bitwise_reproducible": (len(cuda_shas) >= 2 and None not in cuda_shas
                                      and len(set(cuda_shas)) == 1
                                      and all(r["cuda_visible"] for r in runs
                                              if r["tag"].startswith("cuda"))),
        "cpu_bitwise_reproducible": (len(set(cpu_shas)) == 1 and None not in cpu_shas
                                     if len(cpu_shas) >= 2 else None),
        "cuda_equals_cpu": (bool(cuda_shas) and bool(cpu_shas)
                            and cuda_shas[0] == cpu_shas[0]),
    }
    path.write_text(json.dumps(summary, indent=2))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=HERE / "prepare")
    parser.add_argument("--job-spec", type=Path, default=HERE / "train-jobspec.json")
    parser.add_argument("--cuda-runs", type=int, default=2)
    parser.add_argument("--cpu-runs", type=int, default=1)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--precision", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    job_spec = json.loads(args.job_spec.read_text())
    training = job_spec["template"]["training"]
    if args.precision:
        training["precision"] = args.precision
    if args.compile:
        training["compile"] = True
    root = Path(tempfile.mkdtemp(prefix="arf-repro-"))
    runs: list[dict] = []
    try:
        with args.log.open("a") as log:
            plan = ([("cuda", True)] * args.cuda_runs) + ([("cpu", False)] * args.cpu_runs)
            for kind, cuda in plan:
                tag = f"{kind}-{sum(r['tag'].startswith(kind) for r in runs) + 1}"
                runs.append(train_once(root, job_spec, args.prepared.resolve(), tag, cuda, log))
                write_summary(args.json, job_spec, runs, final=False)  # survives a time limit
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = write_summary(args.json, job_spec, runs, final=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
