"""The federate step from job spec to registered-ready outputs (see launch.py for the layout)."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import time
from typing import Any

import torch

from arf_trainer import __version__, tracking
from arf_trainer.errors import TrainingError
from arf_trainer.federated import apps
from arf_trainer.federated.launch import Federation, site_dirs
# Each site's manifest: the metadata in the job spec, else its file (manifests.py).
from arf_trainer.federated.manifests import lineage
from arf_trainer.federated.manifests import plan as _plan
from arf_trainer.spec import StepEnv, write_json_atomic
from arf_trainer.trainer.checkpoint import save_weights
from arf_trainer.trainer.recipes import get_recipe

log = logging.getLogger(__name__)


def run_federate(env: StepEnv) -> dict[str, Any]:
    torch.set_num_threads(1)
    sites = site_dirs(env)
    work = env.workspace / "federate"
    work.mkdir(parents=True, exist_ok=True)
    plan, info = _plan(env, sites)
    write_json_atomic(work / apps.PLAN, plan)
    torch.manual_seed(env.spec.seed)
    initial = get_recipe(info.recipe).build_model(info).state_dict()
    torch.save({k: v for k, v in sorted(initial.items())}, work / "initial.pt")
    for stale in (apps.GLOBAL_WEIGHTS, apps.ROUNDS):
        (work / stale).unlink(missing_ok=True)
    federation = Federation(work, sites)
    started = time.monotonic()
    # The backend stops a step with SIGTERM (then SIGKILL after the grace period): turn it
    # into an exception so that `finally` stops the Flower processes, which run detached.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        federation.start()
        federation.run_app(float(plan["round_timeout_s"]) * max(1, plan["federated"]["rounds"]))
    finally:
        federation.stop()
        signal.signal(signal.SIGTERM, previous)
    wall = time.monotonic() - started
    if not (work / apps.ROUNDS).is_file():
        from arf_trainer.federated.launch import _tail

        raise TrainingError("the federation ended without a global model (no "
                            f"{work / apps.ROUNDS}); ServerApp output:\n"
                            f"{_tail(work / 'flwr-run.log', 40)}")
    rounds = json.loads((work / apps.ROUNDS).read_text())
    weights = torch.load(work / apps.GLOBAL_WEIGHTS, map_location="cpu", weights_only=True)
    return _finish(env, sites, plan, info, weights, rounds, wall)


def _terminated(signum: int, _frame: Any) -> None:
    raise TrainingError(f"the federate step was stopped (signal {signum}); Flower processes "
                        "stopped with it")


def _model_bytes(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


def _finish(env: StepEnv, sites, plan, info, weights, rounds, wall: float) -> dict[str, Any]:
    out = env.workspace / "train"
    sha = save_weights(weights, out / "model.pt")
    write_json_atomic(out / "model_info.json",
                      {**info.to_json(), "weights": "model.pt", "weights_sha256": sha})
    record = lineage(sites)
    history = rounds["rounds"]
    per_round_bytes = [2 * _model_bytes(weights) * (len(r["sites"]) + r["failed"])
                       for r in history]
    run_id, experiment_id = _track(env, record, history, per_round_bytes, sha, wall)
    metrics = round_losses(history[-1]["sites"]) if history else {}
    result = {"mlflow_run_id": run_id, "experiment_id": experiment_id,
              "weights": "train/model.pt", "weights_sha256": sha,
              "model_info": "train/model_info.json", "metrics": metrics, "world_size": 1,
              "recipe": info.recipe, "federated": {"sites": record, "rounds": len(history),
                                                   "bytes_per_round": per_round_bytes,
                                                   "wall_s": round(wall, 3)}}
    write_json_atomic(out / "result.json", result)
    log.info("federated %s over %d sites, %d rounds: weights sha256 %s", info.recipe,
             len(sites), len(history), sha)
    return result


def _track(env: StepEnv, record, history, per_round_bytes, sha: str, wall: float):
    """The DAG run's MLflow run (lineage, per-round metrics) and one nested run per site."""
    from mlflow.entities import Metric, Param

    spec = env.spec
    client = tracking.configure(env.tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, spec.name, env.artifact_root)
    fingerprint = hashlib.sha256("".join(
        f"{name} {site['fingerprint']}\n" for name, site in sorted(record.items())).encode()
    ).hexdigest()
    resolved = {"template": spec.template, "hyperparameters": spec.hyperparameters,
                "seed": spec.seed}
    tags = {"arf.template": spec.name, "arf.template_sha256": spec.template_sha256,
            **tracking.dag_run_tags(spec.run),
            "arf.data_fingerprint": fingerprint,
            "arf.data_tables": tracking.canonical_json(
                {name: site["tables"] for name, site in record.items()}),
            "arf.federated.sites": tracking.canonical_json(record),
            "arf.config_hash": tracking.sha256_json(resolved),
            "arf.code_version": tracking.canonical_json({"arf_trainer": __version__,
                                                         **spec.code_version}),
            "arf.world_size": "1", "arf.recipe": spec.training["recipe"],
            "arf.weights_sha256": sha}
    key = tracking.dag_run_key(spec.run.dag_id, spec.run.run_id)
    run_id, _ = tracking.find_or_create_run(client, experiment_id, spec.run.dag_id,
                                            spec.run.run_id, tags)
    from mlflow.entities import RunTag

    now = int(time.time() * 1000)
    metrics = [Metric("federate_wall_s", wall, now, 0)]
    for r, sent in zip(history, per_round_bytes):
        step = r["round"]
        sites = r["sites"]
        metrics += [Metric("round_bytes", sent, now, step),
                    Metric("round_sites", len(sites), now, step),
                    Metric("round_failed_sites", r["failed"], now, step)]
        metrics += [Metric(name, value, now, step)
                    for name, value in round_losses(sites).items()]
    params = [Param(k, str(v)) for k, v in {**spec.hyperparameters, "seed": spec.seed}.items()]
    existing = client.get_run(run_id).data.params
    client.log_batch(run_id, metrics=metrics,
                     params=[p for p in params if p.key not in existing],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    names = {i: name for i, name in enumerate(record)}
    for index, name in names.items():
        site_run, _ = tracking.find_or_create_run(
            client, experiment_id, spec.run.dag_id, spec.run.run_id,
            {**tracking.dag_run_tags(spec.run),
             "arf.federated.site": name, "arf.data_fingerprint": record[name]["fingerprint"],
             "arf.data_tables": tracking.canonical_json(record[name]["tables"])},
            key=f"{key}/site-{name}", parent_key=key)
        site_metrics = []
        for r in history:
            for s in r["sites"]:
                if int(s["site-index"]) == index:
                    site_metrics += [Metric(k.replace("-", "_"), float(v), now, r["round"])
                                     for k, v in s.items() if k != "site-index"]
        client.log_batch(site_run, metrics=site_metrics)
        client.set_terminated(site_run, "FINISHED")
    client.set_terminated(run_id, "FINISHED")
    return run_id, experiment_id


def round_losses(sites: list[dict[str, float]]) -> dict[str, float]:
    """A round's losses over its sites: train_loss weighted by training rows, val_loss by
    validation rows (a site with none does not count; no val_loss when no site has any)."""
    from arf_trainer.federated.site import VAL_EXAMPLES

    out: dict[str, float] = {}
    train_rows = sum(s[apps.NUM_EXAMPLES] for s in sites)
    if sites and train_rows and all("train_loss" in s for s in sites):
        out["train_loss"] = sum(s["train_loss"] * s[apps.NUM_EXAMPLES] for s in sites) / train_rows
    val_rows = sum(s.get(VAL_EXAMPLES, 0) for s in sites)
    if val_rows:
        out["val_loss"] = sum(s["val_loss"] * s.get(VAL_EXAMPLES, 0) for s in sites) / val_rows
    return out
