"""Evaluation of a registered model, probed for real: a model trained and registered by the
train and register steps (sqlite MLflow, pt2), versions whose artifact does not hold the
weights their `arf.weights_sha256` tag names, bad evaluation settings, and field seeds that
overlap evaluation seeds."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import test_evaluator as evaluator_tests
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_reach

from arf_trainer.errors import EvaluationError, SpecError
from arf_trainer.evaluator import run_evaluate

MODEL = "reach_bc_policy"  # reach_bc's model.name, registered by the register step
EPISODES = 3
HP = {"epochs": 1, "hidden_size": 8}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _zero_model(root: Path) -> str:
    """A pt2 model of the right shape that is not the trained one; its model URI."""
    import mlflow

    layer = torch.nn.Linear(10, 2)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    with mlflow.start_run():
        return mlflow.pytorch.log_model(layer, name="other", serialization_format="pt2",
                                        input_example=np.zeros((2, 10), dtype=np.float32),
                                        pip_requirements=["torch"]).model_uri


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1: trained and registered by the real steps. v2: another model registered with v1's
    weights tag (a swapped artifact). v3: no weights tag (an older release). v4: a tag that is
    no sha256."""
    import mlflow

    from arf_trainer.publisher import run_register
    from arf_trainer.trainer.run import run_train

    root = tmp_path_factory.mktemp("evaluation")
    ws, uri = root / "ws", fresh_tracking_uri(root)
    prepare_reach(ws, rows=64)
    training = {"nproc_per_node": 1}
    run_train(make_env(make_spec("reach_bc", hyperparameters=HP, training=training), ws, uri,
                       root / "artifacts"))
    registered = run_register(make_env(make_spec("reach_bc", "register", hyperparameters=HP,
                                                 training=training), ws, uri, root / "artifacts"))
    assert registered["model_version"] == "1"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    other = _zero_model(root)
    for tags in ({"arf.weights_sha256": registered["weights_sha256"]}, {},
                 {"arf.weights_sha256": "not-a-sha"}):
        mlflow.register_model(other, MODEL, tags=tags)
    return {"uri": uri, "artifacts": root / "eval-artifacts", "sha": registered["weights_sha256"]}


def eval_env(registry: dict[str, Any], workspace: Path, version: Any, run_id: str,
             **evaluation: Any) -> Any:
    return evaluator_tests.eval_env(registry, workspace, version, run_id=run_id, model=MODEL,
                                    evaluation={"episodes": EPISODES, **evaluation})


def _client(registry: dict[str, Any]) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])


def _runs_of(registry: dict[str, Any], run_id: str) -> list[Any]:
    client = _client(registry)
    experiment = client.get_experiment_by_name("reach_bc-evaluation")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("arf.dag_run_id") == run_id]


def _fleet(registry: dict[str, Any], hub: Path, uri: str, first_seed: int,
           episodes: int = 2) -> dict[str, Any]:
    from arf_trainer.fleet import run_fleet

    return run_fleet(tracking_uri=registry["uri"], model_uri=uri, hub=hub,
                     first_seed=first_seed, episodes=episodes, label="review",
                     recorded_at=dt.datetime(2026, 11, 25, tzinfo=dt.UTC))


@pytest.mark.parametrize(("version", "fragment"), [
    pytest.param(2, "have sha256 {actual}, but the version was registered with "
                    "arf.weights_sha256={sha}", id="swapped-artifact"),
    pytest.param(4, "arf.weights_sha256='not-a-sha', which is not a sha256", id="malformed-tag"),
])
def test_weights_that_differ_from_the_version_tag_are_not_evaluated(
        registry: dict[str, Any], tmp_path: Path, version: int, fragment: str) -> None:
    from arf_trainer.trainer.checkpoint import state_dict_sha256

    actual = state_dict_sha256({"weight": torch.zeros(2, 10), "bias": torch.zeros(2)})
    run_id = f"weights__{version}"
    with pytest.raises(EvaluationError) as caught:
        run_evaluate(eval_env(registry, tmp_path, version, run_id))
    message = str(caught.value)
    assert f"models:/{MODEL}/{version}" in message
    assert fragment.format(actual=actual, sha=registry["sha"]) in message
    # Nothing recorded under the version's name: no run, no arf.eval.* tags, no failures.
    assert _runs_of(registry, run_id) == []
    tags = _client(registry).get_model_version(MODEL, str(version)).tags
    assert not any(key.startswith("arf.eval.") for key in tags)
    assert not (tmp_path / "hub").exists()


def test_the_registered_model_is_verified_and_a_version_without_the_tag_warned(
        registry: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = run_evaluate(eval_env(registry, tmp_path, 1, "verified__1"))
    again = run_evaluate(eval_env(registry, tmp_path, 1, "verified__2"))
    # Same version and seeds: bit-identical statistics.
    assert {k: first[k] for k in first if k.startswith(("success", "mean"))} == \
        {k: again[k] for k in again if k.startswith(("success", "mean"))}
    with caplog.at_level(logging.WARNING, logger="arf_trainer.evaluator_checks"):
        old = run_evaluate(eval_env(registry, tmp_path, 3, "untagged__1"))
    assert old["episodes"] == EPISODES
    assert f"models:/{MODEL}/3 has no arf.weights_sha256 tag" in caplog.text


def test_fleet_and_gate_refuse_a_swapped_version(registry: dict[str, Any],
                                                 tmp_path: Path) -> None:
    client = _client(registry)
    client.set_registered_model_alias(MODEL, "swapped", "2")
    with pytest.raises(EvaluationError, match=f"models:/{MODEL}/2: the weights loaded"):
        _fleet(registry, tmp_path / "hub", f"models:/{MODEL}@swapped", 700_000)
    assert not (tmp_path / "hub").exists()
    # A champion whose artifact was swapped is not the yardstick of a promotion either.
    client.set_registered_model_alias(MODEL, "champion", "2")
    try:
        with pytest.raises(EvaluationError, match=f"models:/{MODEL}/2: the weights loaded"):
            run_evaluate(eval_env(registry, tmp_path, 1, "gate__1", promotion_margin=0.02))
    finally:
        client.delete_registered_model_alias(MODEL, "champion")


@pytest.mark.parametrize(("evaluation", "fragment"), [
    pytest.param({"seed": -5}, "evaluation.seed=-5 must be a whole number from 0", id="negative"),
    pytest.param({"seed": 2**63 - 2}, "reaches seed 9223372036854775808", id="past-int64"),
    pytest.param({"episodes": 0}, "evaluation.episodes=0 must be a whole number from 1",
                 id="zero-episodes"),
    pytest.param({"episodes": 2.7}, "evaluation.episodes=2.7 must be a whole number",
                 id="fraction"),
    pytest.param({"episodes": "abc"}, "evaluation.episodes='abc' must be a whole number",
                 id="text"),
    pytest.param({"episodes": 10**9}, "from 1 to 100000", id="huge"),
])
def test_bad_seeds_and_episodes_fail_before_any_rollout(registry: dict[str, Any], tmp_path: Path,
                                                        evaluation: dict[str, Any],
                                                        fragment: str) -> None:
    run_id = f"bounds__{sorted(evaluation.items())}"
    with pytest.raises(SpecError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        run_evaluate(eval_env(registry, tmp_path, 1, run_id, **evaluation))
    assert _runs_of(registry, run_id) == []


def test_fleet_refuses_field_seeds_that_overlap_evaluation_seeds(registry: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    client = _client(registry)
    # The gate's whole budget is evaluation ground too: 100000 .. 100000 + 4 x 3 - 1.
    run_evaluate(eval_env(registry, tmp_path, 1, "seeds__1", seed=100_000,
                          promotion_margin=0.02, gate={"max_episodes": 4 * EPISODES}))
    assert client.get_model_version(MODEL, "1").tags["arf.eval.seeds"] == "100000:100012"
    hub = tmp_path / "hub"
    before = sorted(p.name for p in hub.iterdir())
    with pytest.raises(SpecError) as caught:
        _fleet(registry, hub, f"models:/{MODEL}/1", 100_010, episodes=5)
    assert str(caught.value).startswith(
        f"field seeds 100010:100015 overlap the evaluation seeds of {MODEL} (v1 on "
        "100000:100012)")
    assert "Pick --first-seed 100012 or above" in str(caught.value)
    assert sorted(p.name for p in hub.iterdir()) == before  # nothing written
    # An evaluation recorded by an older release (first seed and episodes only) counts too,
    # and so does any version of the model: they share the template's evaluation seeds.
    client.set_model_version_tag(MODEL, "4", "arf.eval.seed", "200000")
    client.set_model_version_tag(MODEL, "4", "arf.eval.episodes", "50")
    with pytest.raises(SpecError, match="v4 on 200000:200050"):
        _fleet(registry, hub, f"models:/{MODEL}/1", 199_999, episodes=2)
    client.set_model_version_tag(MODEL, "4", "arf.eval.seeds", "200000-200050")
    with pytest.raises(SpecError, match="v4 has malformed evaluation tags .*'arf.eval.seeds': "
                                        "'200000-200050'"):
        _fleet(registry, hub, f"models:/{MODEL}/1", 300_000, episodes=2)
    client.delete_model_version_tag(MODEL, "4", "arf.eval.seeds")
    with pytest.raises(SpecError, match="reaches seed 9223372036854775808"):
        _fleet(registry, hub, f"models:/{MODEL}/1", 2**63 - 1, episodes=2)
    done = _fleet(registry, hub, f"models:/{MODEL}/1", 100_012, episodes=2)
    assert done["first_seed"] == 100_012 and done["episodes"] == 2


@pytest.mark.parametrize(("shape", "fragment"), [
    pytest.param((7, 2), "failed on an observation batch of shape (2, 10)", id="narrow-input"),
    pytest.param((10, 3), "returned (2, 3) for an observation batch", id="wide-output"),
])
def test_a_model_that_cannot_act_in_the_environment_fails_before_its_run(
        registry: dict[str, Any], tmp_path: Path, shape: tuple[int, int], fragment: str) -> None:
    """A model of another width failed at the first step of the first episode, after the
    evaluation run was created: the version kept a FAILED evaluation run per try."""
    import mlflow

    name = f"width_{shape[0]}x{shape[1]}"
    mlflow.set_tracking_uri(registry["uri"])
    mlflow.set_registry_uri(registry["uri"])
    with mlflow.start_run():
        uri = mlflow.pytorch.log_model(torch.nn.Linear(*shape), name="m",
                                       serialization_format="pt2",
                                       input_example=np.zeros((2, shape[0]), dtype=np.float32),
                                       pip_requirements=["torch"]).model_uri
    mlflow.register_model(uri, name)
    run_id = f"width__{name}"
    with pytest.raises(EvaluationError) as caught:
        run_evaluate(evaluator_tests.eval_env(registry, tmp_path, 1, run_id=run_id, model=name,
                                              evaluation={"episodes": EPISODES}))
    assert f"models:/{name}/1" in str(caught.value) and fragment in str(caught.value)
    assert _runs_of(registry, run_id) == []
    assert not (tmp_path / "hub").exists()



def test_a_retry_after_a_killed_try_finishes_the_run_its_failures_point_at(
        registry: dict[str, Any], tmp_path: Path) -> None:
    """A try SIGKILLed after recording its failures left its run RUNNING; the retry marked it
    FAILED and evaluated into a new run, while the failure rows (kept, not written twice) still
    named the dead run: the finished evaluation had no failures to follow."""
    from arf_trainer.datahub.failures import record_failures
    from arf_trainer.datahub.tables import open_table
    from arf_trainer.evaluator import rollouts

    client = _client(registry)
    run_id = "killed__1"
    first = run_evaluate(eval_env(registry, tmp_path / "a", 1, "reference__1"))
    experiment = client.get_experiment_by_name("reach_bc-evaluation")
    tags = {"arf.model_name": MODEL, "arf.model_version": "1", "arf.dag_id": "arf_evaluate",
            "arf.dag_run_id": run_id, "arf.template": "reach_bc", "arf.environment": "reach"}
    dead = client.create_run(experiment.experiment_id, tags=tags).info.run_id
    hub = tmp_path / "b" / "hub"
    # Stand-in failure rows (a policy that never moves fails every episode).
    done = rollouts(lambda obs: np.zeros(2, dtype=np.float32), EPISODES, 0)
    record_failures(hub, model_name=MODEL, model_version=1, eval_run_id=dead, episodes=done,
                    recorded_at=dt.datetime.now(dt.UTC))
    result = run_evaluate(eval_env(registry, tmp_path / "b", 1, run_id))
    assert result["mlflow_run_id"] == dead
    assert client.get_run(dead).info.status == "FINISHED"
    assert [r.info.run_id for r in _runs_of(registry, run_id)] == [dead]
    assert set(open_table(hub, "failures").dataset.to_table()["eval_run_id"].to_pylist()) == {dead}
    assert result["success_rate"] == first["success_rate"]
