"""DAG parse time: 100 training templates vs dag-factory on 100 YAML DAGs of the same shape.

Each measurement is a fresh Python process that imports Airflow first (the DAG processor has it
loaded already) and then times `DagBag(<folder>)`, i.e. the parse of the DAG folder itself; the
two sides alternate, so both see the same load on a shared machine. The baseline, dag-factory
1.x, builds the same 3-task chain (prepare_data -> train -> register_model) per DAG from YAML
with its `load_yaml_dags` loader.

    .venv/bin/python bench/parse_time.py [--templates 100] [--repeats 7] [--backend kubernetes]

`--backend` sets ARF_BACKEND for the arf side (the operator classes differ: local processes, or
Pods and PyTorchJobs); dag-factory's side is the same either way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Issue 13: with either backend, 100 templates parse in under half a second and in under half
# of dag-factory's time.
GOAL_S = 0.5
GOAL_RATIO = 0.5

MEASURE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t0, c0 = time.perf_counter(), time.process_time()
bag = DagBag(sys.argv[1])
elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
print("RESULT" + json.dumps({"s": elapsed, "cpu": cpu, "dags": len(bag.dag_ids),
                             "errors": len(bag.import_errors)}))
"""

DAG_FACTORY_LOADER = """
# dag-factory loader (the word dag is here for Airflow's safe-mode scan)
from pathlib import Path
from dagfactory import load_yaml_dags
load_yaml_dags(globals_dict=globals(), dags_folder=str(Path(__file__).parent / "configs"))
"""


def make_arf(root: Path, n: int) -> tuple[Path, Path]:
    templates = root / "arf_templates"
    templates.mkdir()
    base = (REPO / "config_templates" / "reach_bc.yaml").read_text()
    for i in range(n):
        text = base.replace("name: reach_bc\n", f"name: bench_{i:03d}\n", 1)
        text = text.replace("name: reach_bc_policy", f"name: bench_model_{i:03d}")
        (templates / f"bench_{i:03d}.yaml").write_text(text)
    return REPO / "dags", templates


def make_dag_factory(root: Path, n: int) -> Path:
    dags = root / "dagfactory_dags"
    configs = dags / "configs"
    configs.mkdir(parents=True)
    (dags / "load.py").write_text(DAG_FACTORY_LOADER)
    for i in range(n):
        (configs / f"bench_{i:03d}.yaml").write_text(f"""
bench_{i:03d}:
  default_args:
    owner: robotics-ml
    start_date: 2025-01-01
    retries: 1
  schedule: null
  catchup: false
  max_active_runs: 2
  tags: [arf, bench]
  description: benchmark DAG {i}
  params:
    epochs: 30
    lr: 0.003
  tasks:
    - task_id: prepare_data
      operator: airflow.providers.standard.operators.bash.BashOperator
      bash_command: "arf-trainer prepare"
    - task_id: train
      operator: airflow.providers.standard.operators.bash.BashOperator
      bash_command: "arf-trainer train"
      dependencies: [prepare_data]
    - task_id: register_model
      operator: airflow.providers.standard.operators.bash.BashOperator
      bash_command: "arf-trainer register"
      dependencies: [train]
""")
    return dags


def measure_once(folder: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def measure(sides: dict[str, tuple[Path, dict[str, str]]],
            repeats: int) -> dict[str, tuple[list[dict], dict]]:
    """Each side `repeats` times, alternating, so that both see the same load on a shared
    machine (one side's runs all after the other's would compare two different loads)."""
    results: dict[str, tuple[list[dict], dict]] = {name: ([], {}) for name in sides}
    for _ in range(repeats):
        for name, (folder, env) in sides.items():
            last = measure_once(folder, env)
            results[name] = (results[name][0] + [last], last)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", choices=("local", "kubernetes"), default="local",
                        help="ARF_BACKEND of the arf side (default: local)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="arf-parse-bench-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "AIRFLOW_HOME": str(root / "airflow"),
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "ARF_HOME": str(root / "arf"),
               "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR"}
        arf_dags, templates = make_arf(root, args.templates)
        df_dags = make_dag_factory(root, args.templates)
        arf_env = {**env, "ARF_TEMPLATES_DIR": str(templates), "ARF_BACKEND": args.backend}
        results = measure({"arf": (arf_dags, arf_env), "dag-factory": (df_dags, env)},
                          args.repeats)
        (arf_times, arf_last), (df_times, df_last) = results["arf"], results["dag-factory"]
    print(f"templates: {args.templates}, fresh processes per side: {args.repeats}, "
          f"ARF_BACKEND={args.backend}")
    medians = {}
    for label, runs, last in (("arf-training", arf_times, arf_last),
                              ("dag-factory", df_times, df_last)):
        wall, cpu = [r["s"] for r in runs], [r["cpu"] for r in runs]
        medians[label] = statistics.median(wall), statistics.median(cpu)
        print(f"{label:13} DagBag: median {medians[label][0]:.3f} s (min {min(wall):.3f}, "
              f"max {max(wall):.3f}); CPU time median {medians[label][1]:.3f} s  "
              f"dags={last['dags']} import_errors={last['errors']}")
    (arf_median, arf_cpu), (df_median, df_cpu) = medians["arf-training"], medians["dag-factory"]
    ratio = arf_median / df_median
    # CPU time is the work itself; on a shared machine the wall time also holds waiting.
    print(f"ratio arf / dag-factory: {ratio:.2f} (wall), {arf_cpu / df_cpu:.2f} (CPU time)")
    ok = arf_median < GOAL_S and ratio < GOAL_RATIO
    print(f"goal: arf median < {GOAL_S} s and < {GOAL_RATIO}x dag-factory -> "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok and arf_last["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
