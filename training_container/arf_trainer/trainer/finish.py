"""The end of a training (rank 0): the model files, the last tags, then result.json.

Also the final training of an hpo template: the job spec with the best trial's parameters
(`with_best_trial`), and reusing that trial's weights when it trained exactly this
configuration (`reuse_best_trial`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import TYPE_CHECKING, Any

from arf_trainer import tracking
from arf_trainer.spec import StepEnv, read_json, write_json_atomic
from arf_trainer.trainer.checkpoint import load_weights, save_weights, state_dict_sha256
from arf_trainer.trainer.config import TrainConfig, train_dir_of
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.metrics import summarize_on_parent

if TYPE_CHECKING:
    from arf_trainer.trainer.loop import Parts

log = logging.getLogger(__name__)


def finish(p: "Parts", timing: dict[str, float]) -> dict[str, Any]:
    """Rank 0: model.pt, model_info.json, the weights tag, then result.json last.

    result.json's mlflow_run_id is null if MLflow was unreachable for the whole training; the
    register step then creates the run from the spool and writes the id in.
    """
    env, cfg, progress = p.env, p.cfg, p.state.progress
    train_dir = train_dir_of(env.spec)
    out_dir = env.workspace / train_dir
    sha = save_weights(p.state.model.state_dict(), out_dir / "model.pt")
    write_json_atomic(out_dir / "model_info.json",
                      {**p.info.to_json(), "weights": "model.pt", "weights_sha256": sha})
    # arf.samples: the nightly choice sums the compute of the nights before (nightly/history).
    p.metrics.set_tags({"arf.weights_sha256": sha, "arf.steps": str(progress.step),
                        "arf.samples": str(cfg.hp.epochs * p.train_rows)})
    metrics = {k: v for k, v in progress.metrics.items() if k != "epoch"}
    reporter = p.trial.reporter if p.trial is not None else None
    if reporter is not None:
        value = metrics.get(reporter.metric)
        p.metrics.set_tags({"arf.hpo.state": "pruned" if p.trial.pruned else "complete",
                            "arf.hpo.value": repr(value)})
        if value is not None:
            p.metrics.log({"hpo_value": value}, step=progress.step)
    run_id, experiment_id = p.metrics.end("FINISHED")
    if run_id is None and p.started:
        run_id, experiment_id = p.started
    result = {
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "weights": f"{train_dir}/model.pt",
        "weights_sha256": sha,
        "model_info": f"{train_dir}/model_info.json",
        "metrics": metrics,
        "world_size": p.denv.world_size,
        "steps": progress.step,
        "recipe": cfg.recipe.name,
        "config_hash": cfg.config_hash,
        "data_fingerprint": p.checkpoint.data_fingerprint,
        "data_loading": p.data.mode,
        "data_placement": p.placement.mode,
        "timing": timing,
    }
    if reporter is not None:
        # Recorded on the trial before result.json: a result on disk means Optuna has it too.
        result["hpo"] = reporter.finish(p.trial.pruned, metrics, progress.step, run_id)
    elif (env.spec.inputs.get("hpo") or {}).get("select") == "best":
        summarize_on_parent(env)
    # Written here as well as by the CLI (at ARF_RESULT_PATH), because register and a retried
    # train look for it at this fixed place in the workspace.
    write_json_atomic(out_dir / "result.json", result)
    log.info("trained %s: %d steps; weights %s (sha256 %s); checkpoints in %s", cfg.recipe.name,
             progress.step, out_dir / "model.pt", sha, out_dir / "checkpoints")
    return result


def with_best_trial(env: StepEnv) -> StepEnv:
    """The final training of an hpo template: the job spec with the best trial's params.

    Every rank reads the (finished) study itself: no process group exists yet, and the best
    trial of a told study no longer changes.
    """
    from arf_trainer import hpo as hpo_mod

    spec = env.spec
    best = hpo_mod.best_trial(spec.template["hpo"], spec.inputs["hpo"]["study"])
    inputs = {**spec.inputs, "hpo": {**spec.inputs["hpo"], "best_trial": best.number,
                                     "best_value": best.value}}
    hyperparameters = {**spec.hyperparameters, **best.params}
    log.info("final training with trial %d's params %s (%s = %g)", best.number, best.params,
             spec.template["hpo"]["metric"], best.value)
    spec = dataclasses.replace(spec, hyperparameters=hyperparameters, inputs=inputs)
    return dataclasses.replace(env, spec=spec)


def reuse_best_trial(env: StepEnv, cfg: TrainConfig) -> dict[str, Any] | None:
    """When the best trial trained exactly this configuration (same hyperparameters - the
    budget equals the final epochs - same seed and template: same config_hash), its weights are
    the final model: copy them to ``train/`` instead of training again. Returns the result on
    every rank (rank 0 writes the files), or None when the trial's result differs or is gone.
    """
    from arf_trainer import hpo as hpo_mod

    number = env.spec.inputs["hpo"]["best_trial"]
    folder = env.workspace / hpo_mod.trial_dir(number)
    path = folder / "result.json"
    try:
        trial = read_json(path)
    except (OSError, ValueError):
        return None
    if (trial.get("config_hash") != cfg.config_hash
            or (trial.get("hpo") or {}).get("state") != "complete"):
        return None
    weights = env.workspace / trial["weights"]
    if (not weights.is_file()
            or state_dict_sha256(load_weights(weights)) != trial["weights_sha256"]):
        return None
    denv = DistEnv.from_environ()
    if not denv.is_main:
        return {}
    out_dir = env.workspace / "train"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out_dir / "model.pt")
    shutil.copyfile(folder / "model_info.json", out_dir / "model_info.json")
    result = {**trial, "weights": "train/model.pt", "model_info": "train/model_info.json",
              "reused_trial": number, "steps": 0}
    if not result.get("mlflow_run_id"):
        # MLflow was away during the trial: send its spool now so the run exists to register.
        from arf_trainer import tracking_spool

        client = tracking.configure(env.tracking_uri)
        state = tracking_spool.replay(folder, client, env.tracking_uri)
        if state is not None:
            result.update(mlflow_run_id=state.run_id, experiment_id=state.experiment_id)
    log.info("trial %d trained this exact configuration (config_hash %s): its weights are the "
             "final model; no training needed", number, cfg.config_hash[:12])
    summarize_on_parent(env)
    write_json_atomic(out_dir / "result.json", result)
    return result
