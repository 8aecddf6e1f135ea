"""The `evaluate` step: roll a registered model out in simulation and record the result.

Inputs (job spec): `inputs = {"model_name", "model_version"}` and the template's `evaluation`
section `{"environment": "reach", "episodes", "seed", "success_threshold"}`.

Model contract: `mlflow.pytorch.load_model("models:/<name>/<version>")` gives a
`torch.nn.Module` mapping float32 observations [B, 10] to actions [B, 2] in environment
units; it carries its own input/output normalization. Actions are clipped to [-1, 1].

Episodes use seeds seed .. seed+episodes-1, so two evaluations of one model agree exactly and
two models are compared on the same initial states. The result is recorded twice:

* an MLflow run in experiment `<template name>-evaluation` (metrics success_rate and
  mean_final_distance with their 95 % intervals, `*_ci95_low` / `*_ci95_high`; the settings
  as params; per-episode outcomes as `evaluation/episodes.json` so failure episodes can be
  replayed), tagged with the model and the DAG run;
* tags on the model version (`arf.eval.*`).

With `evaluation.promotion_margin` set, the promotion gate (`arf_trainer.gate`) then rolls the
current `champion` out on the same seeds, in batches up to `evaluation.gate.max_episodes`, and
moves the alias to this version only if it is significantly better (sequential McNemar exact
test at `evaluation.gate.alpha`) by that margin; the decision and its evidence are `arf.gate.*`
tags on this version and `evaluation/gate.json` in the run. With `evaluation.gate.approval:
required` a promotion is only proposed (`arf.gate.approval=pending`): the approval task of
`arf_evaluate` moves the alias once a person approves.

Before any rollout the settings are checked and the loaded weights verified against the
version's `arf.weights_sha256` tag (`arf_trainer.evaluator_checks`); the gate's champion too.

Failed episodes (states, the model's actions, outcome) go to the data hub's `failures` table
(`arf_trainer.datahub.failures`), where corrections are made from them.

Idempotent per (DAG run, model version): a retry reuses the finished evaluation run of the
same DAG run instead of rolling out again, and re-applies the model version tags.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np

from arf_trainer.errors import EvaluationError
from arf_trainer.evaluator_checks import (SEEDS_TAG, check_version, read_settings, seed_range,
                                          verify_weights)
from arf_trainer.evaluator_checks import model_ref
from arf_trainer.spec import StepEnv
from arf_trainer import tracking
from arf_trainer.tracking import get_or_create_experiment

log = logging.getLogger(__name__)

_EPISODES_ARTIFACT = "evaluation/episodes.json"


def load_policy(name: str, version: str) -> Any:
    import mlflow.pytorch
    import torch

    uri = f"models:/{name}/{version}"
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:  # MLflow and unpickling raise many unrelated types
        raise EvaluationError(f"cannot load {uri} with mlflow.pytorch.load_model: {exc}") from exc
    if not callable(model):
        raise EvaluationError(f"{uri} loaded as {type(model).__name__}, which is not callable; "
                              "the model contract is a torch.nn.Module obs [B,10] -> action [B,2]")
    verify_weights(model, name, version)
    if isinstance(model, torch.nn.Module):
        # A torch.export (pt2) module is already an inference graph and refuses eval().
        with contextlib.suppress(NotImplementedError):
            model.eval()
    from arf_trainer.evaluator_pixels import frame_input, pixel_policy

    frame = frame_input(uri)
    if frame is not None:  # a pixel policy (bc_pixels): it sees each observation's frame
        return pixel_policy(model, uri, frame)

    # The observation is sent as a batch of two identical rows: a model exported with
    # torch.export (MLflow's pt2 format, which the publisher uses) gets a dynamic batch
    # dimension only for sizes >= 2 (size 1 is specialized), so a batch of one could fail its
    # shape guards although the model is fine.
    @torch.inference_mode()
    def policy(obs: np.ndarray) -> np.ndarray:
        row = np.asarray(obs, dtype=np.float32).reshape(1, -1)
        batch = torch.from_numpy(np.repeat(row, 2, axis=0))
        try:
            out = model(batch)
        except Exception as exc:
            raise EvaluationError(
                f"{uri} failed on an observation batch of shape (2, 10): {exc}; the model "
                "contract is a torch.nn.Module mapping float32 [B, 10] -> actions [B, 2]"
            ) from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 2):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise EvaluationError(
                f"{uri} returned {shape} for an observation batch of shape (2, 10); the model "
                "contract is a torch.nn.Module mapping float32 [B, 10] -> actions [B, 2]"
            )
        action = out[0].detach().cpu().numpy().astype(np.float32)
        if not np.all(np.isfinite(action)):
            raise EvaluationError(f"{uri} produced a non-finite action {action.tolist()} for "
                                  f"observation {row[0].tolist()}")
        return action

    return policy


def rollouts(policy: Any, episodes: int, seed: int) -> list[tuple[int, Any]]:
    """(seed, `reach.Rollout`) of each episode, seeds seed .. seed+episodes-1."""
    from arf_trainer.sim import reach

    sim = reach.make_env()
    try:
        return [(s, reach.rollout(policy, s, env=sim)) for s in range(seed, seed + episodes)]
    finally:
        sim.close()


def probe(policy: Any, seed: int, uri: str) -> None:
    """One action on the first observation of the first episode, before a run is created: a
    model of another input or output width fails here, not as a FAILED run of the version."""
    from arf_trainer.sim import reach

    sim = reach.make_env()
    try:
        observation, _ = sim.reset(seed=seed)
        reach.checked_action(policy(observation), 0, seed)
    except ValueError as exc:
        raise EvaluationError(f"{uri}: {exc}") from exc
    finally:
        sim.close()


FIGURES = ("success_rate", "success_rate_ci95_low", "success_rate_ci95_high",
           "mean_final_distance", "mean_final_distance_ci95_low", "mean_final_distance_ci95_high")


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    """Success rate and mean final distance of the episodes, each with its 95 % interval
    (Wilson for the rate, bootstrap for the skewed distances); the keys are `FIGURES`."""
    from arf_trainer.stats import bootstrap_mean_interval, wilson_interval

    successes = sum(bool(o["success"]) for o in outcomes)
    distances = [float(o["final_distance"]) for o in outcomes]
    rate_low, rate_high = wilson_interval(successes, len(outcomes))
    dist_low, dist_high = bootstrap_mean_interval(distances)
    return {"success_rate": successes / len(outcomes), "success_rate_ci95_low": rate_low,
            "success_rate_ci95_high": rate_high, "mean_final_distance": float(np.mean(distances)),
            "mean_final_distance_ci95_low": dist_low, "mean_final_distance_ci95_high": dist_high}


def _pair(figures: dict[str, float], name: str) -> str:
    return f"{figures[f'{name}_ci95_low']:.6g},{figures[f'{name}_ci95_high']:.6g}"


def _previous_run(client: Any, experiment_id: str,
                  tags: dict[str, str]) -> tuple[Any | None, str | None]:
    """The finished evaluation run of this DAG run and model version, if an earlier try made
    one; else the id of the latest unfinished one (a try that died) for this try to finish."""
    filter_string = (f"tags.`arf.model_name` = '{tags['arf.model_name']}' and "
                     f"tags.`arf.model_version` = '{tags['arf.model_version']}'")
    # The DAG run id is free text (quotes would need escaping in the filter grammar): match it
    # here instead.
    run_after = tags.get(tracking.RUN_AFTER_TAG)
    mine = [run for run in client.search_runs([experiment_id], filter_string=filter_string,
                                              order_by=["attributes.start_time DESC"])
            if run.data.tags.get("arf.dag_id") == tags["arf.dag_id"]
            and run.data.tags.get("arf.dag_run_id") == tags["arf.dag_run_id"]
            # Not a deleted DagRun's of the same run id (one without the tag predates it).
            and run.data.tags.get(tracking.RUN_AFTER_TAG, run_after) == run_after]
    # A run without the interval metrics predates them: evaluate again rather than guess.
    finished = [run for run in mine
                if run.info.status == "FINISHED" and set(FIGURES) <= run.data.metrics.keys()]
    if finished:
        return finished[0], None
    # The failures a dead try recorded name its run, and are not recorded again: finishing that
    # run keeps them pointing at the evaluation they belong to.
    unfinished = [run for run in mine if run.info.status != "FINISHED"]
    for run in unfinished[1:]:
        if run.info.status == "RUNNING":
            log.warning("marking evaluation run %s of an earlier try as FAILED", run.info.run_id)
            client.set_terminated(run.info.run_id, status="FAILED")
    return None, unfinished[0].info.run_id if unfinished else None


def _episodes_of(client: Any, run_id: str) -> list[dict[str, Any]]:
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, _EPISODES_ARTIFACT, tmp)
        return json.loads(Path(path).read_text())["episodes"]


def gate_settings(evaluation: dict[str, Any], margin: float, episodes: int) -> Any:
    """`evaluation.gate` (alpha, max_episodes) with the margin; batches of `episodes` seeds."""
    from arf_trainer import gate

    section = evaluation.get("gate") or {}
    settings = gate.GateSettings(alpha=float(section.get("alpha", gate.DEFAULT_ALPHA)),
                                 margin=margin, batch=episodes,
                                 max_episodes=int(section.get("max_episodes") or 4 * episodes))
    settings.check()
    return settings


def _paired_batches(name: str, version: str, champion: str, outcomes: list[dict[str, Any]],
                    seed: int) -> Any:
    """The gate's batches: the candidate's own evaluation first, then both versions rolled out
    on the next seeds (policies loaded once, only when a batch needs them)."""
    policies: dict[str, Any] = {}

    def run(who: str, start: int, count: int) -> list[dict[str, Any]]:
        if who not in policies:
            policies[who] = load_policy(name, who)
        return [{"seed": s, "success": r.success}
                for s, r in rollouts(policies[who], count, seed + start)]

    def batches(start: int, count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        cand = outcomes if start == 0 and count == len(outcomes) else run(version, start, count)
        log.info("promotion gate: seeds %d-%d of models:/%s/%s and the champion v%s", seed + start,
                 seed + start + count - 1, name, version, champion)
        return cand, run(champion, start, count)

    return batches


def _promotion_gate(client: Any, name: str, version: str, outcomes: list[dict[str, Any]],
                    settings: Any, passed: bool, seed: int, run_id: str,
                    move_alias: bool = True) -> dict[str, Any]:
    """Compare the candidate with `models:/<name>@champion` on the same seeds (sequentially,
    `arf_trainer.gate`) and move the alias only if it is significantly better by the margin.
    With `move_alias=False` (approval required) the decision is recorded and the alias left
    for the approval task to move; a first version (no champion) is proposed to nobody."""
    from arf_trainer import gate

    current = gate.champion_version(client, name)
    if current == version:  # a retry after this version was promoted
        return {"promoted": True, "reason": "already champion", "champion_version": version}
    if current is None and not passed:
        decision = gate.Decision(
            False, f"no version has the '{gate.CHAMPION}' alias and this one is below the "
            "success threshold; set one by hand to start from it: MlflowClient()."
            f"set_registered_model_alias({name!r}, {gate.CHAMPION!r}, VERSION)",
            None, settings.margin, None)
    elif current is None:
        decision = gate.first_version(settings.margin)
    else:
        decision = gate.sequential(settings, _paired_batches(name, version, current, outcomes,
                                                             seed), current)
    result = gate.apply(client, name, version, decision, move_alias=move_alias or current is None)
    client.log_dict(run_id, {**result, "tags": gate.gate_tags(decision)}, "evaluation/gate.json")
    log.info("promotion gate for models:/%s/%s: %s", name, version, decision.reason)
    return result


def run_evaluate(env: StepEnv) -> dict[str, Any]:
    """Run the evaluate step for `env`; return the result (also written as the step result)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from arf_trainer.datahub.failures import record_failures

    environment, episodes, seed, threshold = read_settings(env.spec)
    name, version = model_ref(env.spec.inputs)
    evaluation = env.spec.evaluation or {}
    margin = evaluation.get("promotion_margin")
    # Checked before any rollout: a bad gate setting fails at once, not after the evaluation.
    settings = gate_settings(evaluation, float(margin), episodes) if margin is not None else None
    approval = (evaluation.get("gate") or {}).get("approval") == "required"
    used = seed_range(seed, max(episodes, settings.max_episodes if settings else 0),
                      "evaluation.seed")
    # load_model resolves models:/ URIs through the process-wide registry URI.
    mlflow.set_tracking_uri(env.tracking_uri)
    mlflow.set_registry_uri(env.tracking_uri)
    client = MlflowClient(tracking_uri=env.tracking_uri, registry_uri=env.tracking_uri)
    check_version(client, name, version)
    experiment_id = get_or_create_experiment(client, f"{env.spec.name}-evaluation",
                                             env.artifact_root)
    tags = {
        "arf.model_name": name,
        "arf.model_version": version,
        **tracking.dag_run_tags(env.spec.run),
        "arf.template": env.spec.name,
        "arf.environment": environment,
    }

    previous, unfinished = _previous_run(client, experiment_id, tags)
    if previous is not None:
        run_id = previous.info.run_id
        figures = {k: float(v) for k, v in previous.data.metrics.items() if k in FIGURES}
        log.info("reusing finished evaluation run %s from an earlier try", run_id)
        failures = {"episodes": 0, "rows": 0, "version": None}  # that try recorded them
    else:
        policy = load_policy(name, version)
        from arf_trainer.evaluator_pixels import check_environment

        check_environment(environment, policy, f"models:/{name}/{version}")
        probe(policy, seed, f"models:/{name}/{version}")
        if unfinished is not None:
            log.info("finishing evaluation run %s of an earlier try", unfinished)
            client.update_run(unfinished, status="RUNNING")
            run_id = unfinished
        else:
            run_id = client.create_run(experiment_id, tags=tags,
                                       run_name=f"{name}-v{version}").info.run_id
        try:
            done = rollouts(policy, episodes, seed)
            outcomes = [{"seed": s, "final_distance": r.final_distance, "success": r.success}
                        for s, r in done]
            figures = summarize(outcomes)
            # Before the run is FINISHED: a retry after a crash here evaluates again, and
            # record_failures skips the seeds this try already wrote.
            failures = record_failures(env.datahub, model_name=name, model_version=int(version),
                                       eval_run_id=run_id, episodes=done,
                                       recorded_at=datetime.now(UTC))
            from arf_trainer.sim.reach import SUCCESS_DISTANCE

            params = {"environment": environment, "episodes": episodes, "seed": seed,
                      "success_threshold": threshold, "success_distance": SUCCESS_DISTANCE}
            client.log_batch(
                run_id,
                metrics=[Metric(key, value, 0, 0) for key, value in figures.items()],
                params=[Param(k, str(v)) for k, v in params.items()],
            )
            client.log_dict(run_id, {"episodes": outcomes}, _EPISODES_ARTIFACT)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")

    success_rate, mean_distance = figures["success_rate"], figures["mean_final_distance"]
    passed = success_rate >= threshold
    version_tags = {
        "arf.eval.success_rate": f"{success_rate:.6g}",
        # 95 % intervals, "low,high": with 50 episodes a rate is +-10 points; read them together.
        "arf.eval.success_rate_ci95": _pair(figures, "success_rate"),
        "arf.eval.mean_final_distance": f"{mean_distance:.6g}",
        "arf.eval.mean_final_distance_ci95": _pair(figures, "mean_final_distance"),
        "arf.eval.episodes": str(episodes),
        "arf.eval.seed": str(seed),
        # Every seed this evaluation and its gate may use: `fleet` keeps field seeds clear of it.
        SEEDS_TAG: f"{used.start}:{used.stop}",
        "arf.eval.passed": str(passed).lower(),
        "arf.eval.run_id": run_id,
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)
    gate = None
    if settings is not None:
        if previous is not None:
            outcomes = _episodes_of(client, previous.info.run_id)
        gate = _promotion_gate(client, name, version, outcomes, settings, passed, seed, run_id,
                               move_alias=not approval)
    log.info("evaluate: models:/%s/%s on %s: success rate %.1f%% (95%% CI %.1f-%.1f%%) over %d "
             "episodes (threshold %.1f%%), mean final distance %.4f m -> %s", name, version,
             environment, 100 * success_rate, 100 * figures["success_rate_ci95_low"],
             100 * figures["success_rate_ci95_high"], episodes, 100 * threshold, mean_distance,
             "passed" if passed else "below threshold")
    return {
        "model_name": name,
        "model_version": version,
        **figures,
        "episodes": episodes,
        "passed": passed,
        "mlflow_run_id": run_id,
        "reused": previous is not None,
        "gate": gate,
        "failures_recorded": failures["episodes"],
        "failures_table_version": failures["version"],
    }
