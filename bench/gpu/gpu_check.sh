#!/usr/bin/env bash
# GPU check of arf-trainer (one GPU, one process), run from the repository root:
#   1. bitwise reproducibility: `arf-trainer train` (reach_bc, bc recipe, the saved job spec:
#      10 epochs, 330 steps) twice on CUDA in fresh workspaces -> same weights sha256?
#      plus one run on the CPU of the same machine (CUDA_VISIBLE_DEVICES="") for comparison;
#   2. harness overhead on CUDA: bench/harness_overhead.py --device cuda --tracking none.
# Writes to $OUT: gpu_check.log (everything printed), train_logs.log (the trainer runs of
# check 1), repro.json, harness.json, summary.json.
#
# The machine has no MLflow: the wheels in .devcheck/whl (mlflow-skinny 3.17.2 and the
# dependencies its import needs that the image lacks; cp312, x86-64) go to /tmp/devcheck-site.
# Tracking points at an unreachable URI; the trainer keeps it in its spool.
#
# Knobs (environment): PY (python3), DEVCHECK_DEVICE (cuda; cpu for a dry run without a GPU),
# DEVCHECK_EPOCHS (100: 3,300 steps, so that CUDA warm-up inside both timed loops is a
# small share) and DEVCHECK_REPEATS (5) for check 2, DEVCHECK_SKIP_WHEELS=1 (use the
# interpreter's own mlflow), DEVCHECK_EXTRA_PYTHONPATH (dry run: bench/gpu/dryrun).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/devcheck-out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEV=${DEVCHECK_DEVICE:-cuda}
EPOCHS=${DEVCHECK_EPOCHS:-100}
REPEATS=${DEVCHECK_REPEATS:-5}
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

step "environment"
date -u; uname -m
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
else
  echo "no nvidia-smi"
fi
"$PY" - <<'EOF'
import sys, platform, importlib.metadata as md
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("numpy", "pyarrow", "pandas", "protobuf", "scipy", "requests", "anyio",
             "annotated-doc", "typing-extensions", "zipp", "pyyaml", "mlflow", "mlflow-skinny"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
EOF

SITE=
if [ "${DEVCHECK_SKIP_WHEELS:-0}" != 1 ]; then
  step "install .devcheck/whl -> /tmp/devcheck-site"
  timeout 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/devcheck-site .devcheck/whl/*.whl && SITE=/tmp/devcheck-site \
    || echo "WHEEL INSTALL FAILED"
fi
EXTRA=
[ -n "${DEVCHECK_EXTRA_PYTHONPATH:-}" ] && EXTRA=$(cd "$DEVCHECK_EXTRA_PYTHONPATH" && pwd):
# Absolute: the trainer runs with its workspace as working directory.
export PYTHONPATH=$EXTRA${DEVCHECK_TRAINER:-$REPO/training_container}${SITE:+:$SITE}
echo "PYTHONPATH=$PYTHONPATH"

step "imports the trainer needs"
timeout 60 "$PY" - <<'EOF'
import time
t = time.perf_counter()
import arf_trainer, arf_trainer.cli, arf_trainer.trainer.run  # noqa: F401
print("arf_trainer from", arf_trainer.__file__, f"({time.perf_counter() - t:.1f} s)")
t = time.perf_counter()
import mlflow
from mlflow.exceptions import MlflowException  # noqa: F401
print("mlflow", mlflow.__version__, "from", mlflow.__file__, f"({time.perf_counter() - t:.1f} s)")
EOF
echo "import check exit $?"

step "check 1: reproducibility (2 x CUDA, 1 x CPU)"
timeout 150 "$PY" bench/gpu/repro.py --cuda-runs 2 --cpu-runs 1 --json "$OUT/repro.json" \
  --log "$OUT/train_logs.log"
echo "check 1 exit $?"

step "check 2: harness overhead, --device $DEV --tracking none, $EPOCHS epochs, $REPEATS rounds"
timeout 190 "$PY" bench/harness_overhead.py --device "$DEV" --tracking none \
  --prepared .devcheck/prepare --job-spec .devcheck/train-jobspec.json \
  --epochs "$EPOCHS" --repeats "$REPEATS" --json "$OUT/harness.json"
echo "check 2 exit $?"

step "summary"
OUT=$OUT "$PY" - <<'EOF'
import json, os, statistics
from pathlib import Path
out = Path(os.environ["OUT"])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
repro, harness = load("repro.json"), load("harness.json")
summary = {"repro": repro and {k: v for k, v in repro.items() if k != "runs"},
           "repro_runs": repro and [{k: r.get(k) for k in ("tag", "cuda_visible", "device_name",
                                     "exit_code", "weights_sha256", "steps", "timing",
                                     "process_seconds", "spool_records", "mlflow_run_id")}
                                    for r in repro["runs"]],
           "harness": harness and {k: harness[k] for k in ("device", "tracking", "epochs",
                                   "repeats", "rows", "ratio_wall", "ratio_cpu",
                                   "best_vs_best", "headline_ratio")},
           "harness_median_samples_per_s": harness and {
               k: statistics.median(v) for k, v in harness["samples_per_s"].items()},
           "bf16_autocast": "not measured: the trainer has no autocast/bf16 option"}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
step "done"
ls -la "$OUT"
sleep 1  # let tee write the last lines
