#!/usr/bin/env bash
# GPU check of arf-trainer (one GPU, one process), run from the repository root:
#   1. bitwise reproducibility: `arf-trainer train` on the saved job specs twice on CUDA in
#      fresh workspaces -> same weights sha256? plus one run on the CPU of the same machine
#      (CUDA_VISIBLE_DEVICES="") for comparison: repro (reach_bc, bc, 10 epochs, 330 steps),
#      repro_pixels (reach_pixels_bc, bc_pixels: channels_last convolutions on CUDA),
#      repro_bf16 and repro_compile (bc with training.precision bf16 / training.compile: are
#      they bitwise reproducible on CUDA? the trainer records them as not verified);
#   2. harness overhead on CUDA: bench/harness_overhead.py --device cuda --tracking none, for
#      bc (harness) and bc_pixels (harness_pixels), with a fourth side per round
#      (--nondeterministic-side: the trainer with training.deterministic: false) unless
#      DEVCHECK_NONDET=0; DEVCHECK_ASYNC=1 adds one with training.async_checkpoint: true.
# Writes to $OUT: gpu_check.log (everything printed), train_logs.log (the trainer runs of
# check 1), repro*.json, harness*.json, summary.json.
# Inputs: .devcheck/{prepare,train-jobspec.json} (bc) and .devcheck/pixels/... (bc_pixels),
# from `bench/harness_overhead.py --save-inputs .devcheck` (bench/gpu/README.md).
#
# The machine has no MLflow: the wheels in .devcheck/whl (mlflow-skinny 3.17.2 and the
# dependencies its import needs that the image lacks; cp312, x86-64) go to /tmp/devcheck-site.
# Tracking points at an unreachable URI; the trainer keeps it in its spool.
#
# Knobs (environment): PY (python3), DEVCHECK_DEVICE (cuda; cpu for a dry run without a GPU),
# DEVCHECK_EPOCHS (100: 3,300 steps, so that CUDA warm-up inside both timed loops is a
# small share), DEVCHECK_PIXEL_EPOCHS (30) and DEVCHECK_REPEATS (5) for check 2,
# DEVCHECK_CHECKS (which checks, default all: "repro repro_pixels repro_bf16 repro_compile
# harness harness_pixels probe"; split them over two calls when one call's time is short),
# DEVCHECK_SKIP_WHEELS=1 (use the interpreter's own mlflow), DEVCHECK_EXTRA_PYTHONPATH (dry
# run: bench/gpu/dryrun).
set -u -o pipefail
cd "$(dirname "$0")/../.."  # the repository root (this file is bench/gpu/gpu_check.sh)
REPO=$PWD
OUT=${OUT:-/tmp/devcheck-out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEV=${DEVCHECK_DEVICE:-cuda}
EPOCHS=${DEVCHECK_EPOCHS:-100}
PIXEL_EPOCHS=${DEVCHECK_PIXEL_EPOCHS:-30}
REPEATS=${DEVCHECK_REPEATS:-5}
CHECKS=" ${DEVCHECK_CHECKS:-repro repro_pixels repro_bf16 repro_compile harness harness_pixels probe} "
want() { case "$CHECKS" in *" $1 "*) return 0;; esac; return 1; }
DC=$REPO/.devcheck
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

# bc_pixels' conv weights are channels_last on CUDA (recipes_vision to_device); CPU: unchanged
step "bc_pixels memory format"
timeout 60 "$PY" - <<'EOF'
import torch
from arf_trainer.trainer.recipes import ModelInfo
from arf_trainer.trainer.recipes_vision import PixelBehaviourCloning
info = ModelInfo(recipe="bc_pixels", features=["image", "s"], targets=["a"], hidden_size=8,
                 num_layers=1, n_outputs=2, input_width=1, arrays={"image": [16, 16, 3]})
recipe = PixelBehaviourCloning()
model = recipe.build_model(info)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
recipe.to_device(model, device)
w = model.net.encoder[0].weight
print("device", device, "conv weight channels_last:",
      w.is_contiguous(memory_format=torch.channels_last), "contiguous:", w.is_contiguous())
EOF

repro() {  # name, job-spec folder, extra repro.py arguments
  want "$1" || return 0
  step "check 1: $1: reproducibility (2 x CUDA, 1 x CPU) $3"
  timeout 150 "$PY" bench/gpu/repro.py --cuda-runs 2 --cpu-runs 1 --json "$OUT/$1.json" \
    --prepared "$2/prepare" --job-spec "$2/train-jobspec.json" --log "$OUT/train_logs.log" $3
  echo "check 1 $1 exit $?"
}
repro repro "$DC" ""
repro repro_pixels "$DC/pixels" ""
repro repro_bf16 "$DC" "--precision bf16"
repro repro_compile "$DC" "--compile"

harness() {  # name, job-spec folder, epochs, timeout
  want "$1" || return 0
  step "check 2: $1: harness overhead, --device $DEV --tracking none, $3 epochs, $REPEATS rounds"
  timeout "$4" "$PY" bench/harness_overhead.py --device "$DEV" --tracking none \
    --prepared "$2/prepare" --job-spec "$2/train-jobspec.json" \
    --epochs "$3" --repeats "$REPEATS" --json "$OUT/$1.json" $NONDET_SIDE
  echo "check 2 $1 exit $?"
}
NONDET_SIDE=--nondeterministic-side
[ "${DEVCHECK_NONDET:-1}" = 0 ] && NONDET_SIDE=
[ "${DEVCHECK_ASYNC:-0}" = 1 ] && NONDET_SIDE="$NONDET_SIDE --async-checkpoint-side"
harness harness "$DC" "$EPOCHS" "$([ -n "$NONDET_SIDE" ] && echo 260 || echo 190)"
harness harness_pixels "$DC/pixels" "$PIXEL_EPOCHS" "$([ -n "$NONDET_SIDE" ] && echo 320 || echo 240)"

# 3. where the per-step time goes: in-process variants (determinism on/off, fill of
#    uninitialized memory, CUBLAS_WORKSPACE_CONFIG on the bare loop) and a cProfile
if want probe; then
  step "check 3: probe: bench/gpu/overhead_probe.py, bc 30 epochs x 2 rounds"
  timeout 150 "$PY" bench/gpu/overhead_probe.py --inputs "$DC" --device "$DEV" --epochs 30 \
    --rounds 2 2>&1 | grep -v "INFO\|WARNING\|MLflow at\|tracking record" > "$OUT/probe.log"
  echo "check 3 probe exit $?"; grep -E "^(bare|trainer)" "$OUT/probe.log"
fi

step "summary"
OUT=$OUT "$PY" - <<'EOF'
import json, os, statistics
from pathlib import Path
out = Path(os.environ["OUT"])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
summary = {}
for name in ("repro", "repro_pixels", "repro_bf16", "repro_compile"):
    repro = load(f"{name}.json")
    summary[name] = repro and {k: v for k, v in repro.items() if k != "runs"}
    summary[f"{name}_runs"] = repro and [
        {k: r.get(k) for k in ("tag", "cuda_visible", "device_name", "exit_code",
                               "weights_sha256", "steps", "timing", "process_seconds",
                               "spool_records", "mlflow_run_id", "data_placement")}
        for r in repro["runs"]]
for name in ("harness", "harness_pixels"):
    harness = load(f"{name}.json")
    for recipe, figures in ((harness or {}).get("recipes") or {}).items():
        summary[name] = {"device": harness["device"], "tracking": harness["tracking"],
                         "precision": harness["precision"], "repeats": harness["repeats"],
                         "recipe": recipe,
                         **{k: figures[k] for k in ("epochs", "rows", "ratio_rounds",
                                                    "ratio_wall", "ratio_cpu", "best_vs_best",
                                                    "headline_ratio")},
                         "nondet_ratio_wall": figures.get("nondet_ratio_wall"),
                         "median_samples_per_s": {
                             k: statistics.median(v) for k, v in figures["samples_per_s"].items()}}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
step "done"
ls -la "$OUT"
sleep 1  # let tee write the last lines
