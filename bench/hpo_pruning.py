"""Pruning pays: the same Optuna search with and without its pruner, on the same seeds.

Both sides run the `hpo_reach_bc` template's search (its search space, sampler, rounds x
parallel, per-trial budget; `--trials/--parallel/--epochs` override them) on the same prepared
data (the embedded data hub seeded and `prepare` run once, as the DAG does). Each trial goes
through the real code paths of the DAG's tasks, without Airflow's scheduling: the Airflow-side
`ask`/`tell` of `arf_training.hpo` around `arf-trainer train` of the trial's StepSpec (built by
`build_step_spec(..., trial=...)`), run in this process (torch and MLflow are imported once, so
the comparison is about training steps, not process start-ups). The only difference between
the sides is `hpo.pruner` (the template's, vs `none`). The two searches of a seed run round by
round in turn, the side going first alternating, so that this machine's drifting speed weighs
on both alike.

Printed per seed and in total: the optimizer steps that all trials trained (the work) and the
wall time of each whole search (ask, trials, tell, on the embedded PostgreSQL like the DAG; what
a user waits for, including per-trial costs that pruning does not save), the fraction of each
that the pruner saved and the ratio pruned/unpruned, each side's best value and the relative gap
(`best_pruned / best_unpruned - 1` for a minimized metric). Goals: >= 40 % of the steps and
>= 30 % of the wall time saved, with the best value within 2 % of the unpruned search.

    .venv/bin/python bench/hpo_pruning.py [--seeds 0 1 2] [--trials 24] [--parallel 4]
        [--epochs 12] [--pruner median]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEMPLATE = REPO / "config_templates" / "hpo_reach_bc.yaml"


def load(pruner: str, seed: int, trials: int | None, parallel: int | None,
         epochs: int | None):
    import yaml

    from arf_training.templates import LoadedTemplate, TrainingTemplate

    data = yaml.safe_load(TEMPLATE.read_text())
    hpo = data["hpo"]
    hpo.update(pruner=pruner, seed=seed)
    if parallel:
        hpo["parallel"] = parallel
    if trials:
        hpo["trials"] = trials
    if epochs:
        hpo["budget"]["epochs"] = epochs
        data["training"]["hyperparameters"]["epochs"]["default"] = epochs
    return LoadedTemplate(TrainingTemplate.model_validate(data), TEMPLATE, "bench")


def load_template_pruner() -> str:
    import yaml

    return yaml.safe_load(TEMPLATE.read_text())["hpo"]["pruner"]


def prepare(root: Path) -> Path:
    """Seed the data hub and run the prepare step once; returns the prepared folder."""
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    settings = ArfSettings.from_env()
    subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub", settings.datahub_uri,
                    "--episodes", "80"], check=True, capture_output=True, timeout=600)
    spec = build_step_spec(load("none", 0, None, None, None), "prepare",
                           RunIdentity("bench_prepare", "once", "prepare_data"), {}, settings)
    LocalStepRunner(logging.getLogger("prepare")).run(spec)
    return spec.workspace / "prepare"


def search(loaded, run_id: str, prepared: Path, clock: dict[str, float]):
    """One study as a generator: each `next()` runs one round (ask, train its trials in-process,
    tell), adding its seconds to `clock["seconds"]`; it returns the study's summary."""
    import shutil

    from optuna.trial import TrialState

    from arf_trainer.spec import JobSpec, StepEnv
    from arf_trainer.trainer.run import run_train
    from arf_training import hpo
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    settings = ArfSettings.from_env()
    dag_id = "bench_hpo"
    context = {"ti": SimpleNamespace(dag_id=dag_id), "dag_run": SimpleNamespace(run_id=run_id)}
    steps = 0
    for round_index in range(loaded.template.hpo.rounds):
        t0 = time.perf_counter()
        if round_index == 0:
            hpo.create_study(loaded, context)
        for trial in hpo.ask(loaded, round_index, context):
            spec = build_step_spec(loaded, "train", RunIdentity(
                dag_id, run_id, f"round_{round_index + 1}.trials"), {}, settings, trial=trial)
            if not (spec.workspace / "prepare").exists():
                shutil.copytree(prepared, spec.workspace / "prepare")
            os.environ["ARF_OPTUNA_STORAGE"] = spec.env["ARF_OPTUNA_STORAGE"]
            env = StepEnv(workspace=spec.workspace, result_path=spec.result_path,
                          tracking_uri=settings.tracking_uri,
                          artifact_root=settings.artifact_root,
                          datahub=Path(settings.datahub_uri),
                          spec=JobSpec.from_dict(spec.job_spec))
            result = run_train(env)
            steps += int(result["steps"])
        hpo.tell(loaded, round_index, context)
        clock["seconds"] += time.perf_counter() - t0
        yield
    study = hpo.open_study(loaded.template, dag_id, run_id)
    states = [t.state for t in study.trials]
    return {"steps": steps, "best": study.best_value, "best_trial": study.best_trial.number,
            "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED), "failed": states.count(TrialState.FAIL)}


def paired_searches(sides: dict[str, Any], seed: int, prepared: Path) -> dict[str, dict]:
    """Both searches of one seed, round by round in turn (the first side alternating), so that
    this machine's drifting speed weighs on both alike; each side's wall time is its rounds'."""
    clocks = {side: {"seconds": 0.0} for side in sides}
    running = {side: search(loaded, f"{side}-seed{seed}", prepared, clocks[side])
               for side, loaded in sides.items()}
    results: dict[str, dict] = {}
    order = list(sides)
    while running:
        for side in order:
            if side in running:
                try:
                    next(running[side])
                except StopIteration as done:
                    results[side] = {**done.value, "seconds": clocks[side]["seconds"]}
                    del running[side]
        order.reverse()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # A longer search than the template's CI-sized one (8 trials of 6 epochs): pruning saves
    # a fraction of each pruned trial's budget, and the first round is never pruned.
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=12, help="per-trial budget")
    parser.add_argument("--pruner", default=None, help="default: the template's")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="arf-bench-hpo-"))
    os.environ.update({"ARF_HOME": str(root), "OMP_NUM_THREADS": "1",
                       "MLFLOW_DISABLE_TELEMETRY": "true"})
    for name in ("ARF_TRACKING_URI", "ARF_DATAHUB_URI", "ARF_ARTIFACT_ROOT", "ARF_OPTUNA_STORAGE",
                 "ARF_WORKSPACE_ROOT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    logging.basicConfig(level=logging.WARNING)
    from arf_training.postgres import EmbeddedPostgres, stop_started
    from arf_training.settings import database_backend

    database = database_backend()
    if database == "postgres":  # the embedded default's Optuna and MLflow store
        EmbeddedPostgres(root).ensure_running()
    try:
        return run(args, root, database)
    finally:
        stop_started()


def warm_up(prepared: Path) -> None:
    """A throwaway two-trial search before any clock starts: imports, MLflow's and Optuna's
    schema migrations, the experiment and every first-use path; otherwise the side that goes
    first would pay them alone."""
    clock = {"seconds": 0.0}
    for _ in search(load("none", 0, 2, 2, 1), "warm-up", prepared, clock):
        pass


def run(args: argparse.Namespace, root: Path, database: str) -> int:
    prepared = prepare(root)
    warm_up(prepared)
    pruner = args.pruner or load_template_pruner()
    hpo_cfg = load(pruner, 0, args.trials, args.parallel, args.epochs).template.hpo
    print(f"search: {hpo_cfg.trials} trials = {hpo_cfg.rounds} rounds x {hpo_cfg.parallel}, "
          f"{hpo_cfg.sampler} sampler, {hpo_cfg.budget.epochs} epochs per trial, metric "
          f"{hpo_cfg.metric} ({hpo_cfg.direction}); pruner {pruner!r} vs 'none'; "
          f"seeds {args.seeds}; Optuna and MLflow on {database}")
    totals = {"none": [0, [], 0.0], pruner: [0, [], 0.0]}
    for seed in args.seeds:
        row = paired_searches({side: load(side, seed, args.trials, args.parallel, args.epochs)
                               for side in ("none", pruner)}, seed, prepared)
        for side in ("none", pruner):
            totals[side][0] += row[side]["steps"]
            totals[side][1].append(row[side]["best"])
            totals[side][2] += row[side]["seconds"]
        off, on = row["none"], row[pruner]
        saved = 1 - on["steps"] / off["steps"]
        gap = on["best"] / off["best"] - 1
        if hpo_cfg.direction == "maximize":
            gap = -gap
        print(f"seed {seed}: steps {off['steps']} -> {on['steps']} ({saved:.1%} saved), wall "
              f"{wall(off['seconds'], on['seconds'])}; best {hpo_cfg.metric} {off['best']:.5f} "
              f"(trial {off['best_trial']}) vs {on['best']:.5f} (trial {on['best_trial']}), "
              f"{gap:+.2%} for pruning; pruned {on['pruned']}/{hpo_cfg.trials}")
    off_steps, on_steps = totals["none"][0], totals[pruner][0]
    saved = 1 - on_steps / off_steps
    gaps = [b / a - 1 for a, b in zip(totals["none"][1], totals[pruner][1])]
    if hpo_cfg.direction == "maximize":
        gaps = [-g for g in gaps]
    off_s, on_s = totals["none"][2], totals[pruner][2]
    print(f"total: {off_steps} -> {on_steps} steps, {saved:.1%} saved (goal >= 40 %); wall "
          f"{wall(off_s, on_s)} (goal >= 30 % saved: "
          f"{'met' if on_s <= 0.7 * off_s else 'NOT met'}); best-value gap per seed "
          f"{', '.join(f'{g:+.2%}' for g in gaps)} (goal within 2 %: "
          f"{'met' if max(gaps) <= 0.02 else 'NOT met'} on {sum(g <= 0.02 for g in gaps)}/"
          f"{len(gaps)} seeds)")
    return 0


def wall(unpruned_s: float, pruned_s: float) -> str:
    """`812 s -> 455 s (44.0 % saved, 0.56x)`: the searches' wall times, saved share, ratio."""
    return (f"{unpruned_s:.0f} s -> {pruned_s:.0f} s ({1 - pruned_s / unpruned_s:.1%} saved, "
            f"{pruned_s / unpruned_s:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
