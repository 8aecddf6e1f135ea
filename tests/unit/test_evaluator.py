"""The evaluate step against a real MLflow (sqlite) registry and real MuJoCo rollouts."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from arf_trainer.errors import EvaluationError, SpecError
from arf_trainer.evaluator import run_evaluate
from arf_trainer.sim.reach import expert_action
from arf_trainer.spec import JobSpec, StepEnv

REPO = Path(__file__).resolve().parents[2]
MODEL = "reach_test_policy"
EPISODES = 20


class ExpertPolicy(nn.Module):
    """The scripted expert behind the model contract: float32 obs [B, 10] -> actions [B, 2]."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(expert_action(obs.detach().numpy()))


def zero_policy() -> nn.Module:
    layer = nn.Linear(10, 2)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A sqlite MLflow with MODEL v1 = the expert (pickle) and v2 = a zero policy (pt2)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("training", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(ExpertPolicy(), name="expert", registered_model_name=MODEL,
                                 serialization_format="pickle", pip_requirements=["torch"])
    with mlflow.start_run(experiment_id=experiment):
        # Like the publisher: torch.export (pt2) with a batch of 2, so the batch is dynamic.
        mlflow.pytorch.log_model(zero_policy(), name="zero", registered_model_name=MODEL,
                                 serialization_format="pt2",
                                 input_example=np.zeros((2, 10), dtype=np.float32),
                                 pip_requirements=["torch"])
    return {"uri": uri, "artifacts": root / "eval-artifacts"}


def eval_env(registry: dict[str, Any], workspace: Path, version: Any, *,
             run_id: str = "manual__1", evaluation: dict[str, Any] | None = None,
             drop_evaluation: bool = False, model: str = MODEL) -> StepEnv:
    template = yaml.safe_load((REPO / "config_templates" / "reach_bc.yaml").read_text())
    template["dataset"].setdefault("tables", {})
    template["dataset"].setdefault("allow_query_override", False)
    template["model"].setdefault("base_model", None)
    # reach_bc.yaml ships a promotion_margin; the gate runs here only where a test asks for it.
    template["evaluation"].pop("promotion_margin", None)
    template["evaluation"].update({"episodes": EPISODES, **(evaluation or {})})
    if drop_evaluation:
        template.pop("evaluation")
    spec = JobSpec.from_dict({
        "spec_version": 1, "step": "evaluate", "template": copy.deepcopy(template),
        "template_sha256": "0" * 64, "conf": {}, "hyperparameters": {}, "seed": 0,
        "run": {"dag_id": "arf_evaluate", "run_id": run_id, "task_id": "evaluate"},
        "inputs": {"model_name": model, "model_version": version},
    })
    return StepEnv(workspace=workspace, result_path=workspace / "evaluate" / "result.json",
                   tracking_uri=registry["uri"], artifact_root=str(registry["artifacts"]),
                   datahub=workspace / "hub", spec=spec)


def _version_tags(registry: dict[str, Any], version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    return dict(client.get_model_version(MODEL, version).tags)


def test_expert_passes_and_result_is_recorded_on_the_version(registry: dict[str, Any],
                                                              tmp_path: Path) -> None:
    from mlflow import MlflowClient

    result = run_evaluate(eval_env(registry, tmp_path, 1))
    assert result["model_name"] == MODEL and result["model_version"] == "1"
    assert result["episodes"] == EPISODES
    assert result["success_rate"] >= 0.8 and result["passed"] is True
    assert result["mean_final_distance"] < 0.02
    assert result["reused"] is False

    tags = _version_tags(registry, "1")
    assert tags["arf.eval.passed"] == "true"
    assert float(tags["arf.eval.success_rate"]) == pytest.approx(result["success_rate"])
    assert float(tags["arf.eval.mean_final_distance"]) == pytest.approx(
        result["mean_final_distance"], rel=1e-5)
    assert tags["arf.eval.episodes"] == str(EPISODES) and tags["arf.eval.seed"] == "100000"
    assert tags["arf.eval.run_id"] == result["mlflow_run_id"]
    # 95 % intervals around each figure, on the version and in the result.
    low, high = (float(x) for x in tags["arf.eval.success_rate_ci95"].split(","))
    assert low <= result["success_rate"] <= high < 1.0 + 1e-9 and high - low > 0.05
    assert (low, high) == pytest.approx((result["success_rate_ci95_low"],
                                         result["success_rate_ci95_high"]), rel=1e-5)
    d_low, d_high = (float(x) for x in tags["arf.eval.mean_final_distance_ci95"].split(","))
    assert d_low <= result["mean_final_distance"] <= d_high

    client = MlflowClient(tracking_uri=registry["uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["success_rate"] == pytest.approx(result["success_rate"])
    assert run.data.metrics["success_rate_ci95_low"] == pytest.approx(low, rel=1e-5)
    assert {k: run.data.tags[k] for k in ("arf.model_name", "arf.model_version", "arf.dag_id",
                                          "arf.dag_run_id")} == {
        "arf.model_name": MODEL, "arf.model_version": "1", "arf.dag_id": "arf_evaluate",
        "arf.dag_run_id": "manual__1"}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "reach_bc-evaluation"
    assert experiment.artifact_location == f"{registry['artifacts']}/reach_bc-evaluation"
    episodes = json.loads(Path(client.download_artifacts(
        run.info.run_id, "evaluation/episodes.json", str(tmp_path))).read_text())["episodes"]
    assert [e["seed"] for e in episodes] == list(range(100_000, 100_000 + EPISODES))


def test_retry_reuses_the_finished_run(registry: dict[str, Any], tmp_path: Path) -> None:
    first = run_evaluate(eval_env(registry, tmp_path, "1", run_id="retry__1"))
    again = run_evaluate(eval_env(registry, tmp_path, 1, run_id="retry__1"))
    assert again == {**first, "reused": True, "failures_recorded": 0,
                     "failures_table_version": None}
    other_run = run_evaluate(eval_env(registry, tmp_path, 1, run_id="retry__2"))
    assert other_run["mlflow_run_id"] != first["mlflow_run_id"]
    assert other_run["success_rate"] == first["success_rate"]  # same seeds, same outcome


def test_a_deleted_evaluation_experiment_is_named_with_the_way_back(registry: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from arf_trainer.errors import RegistryError

    run_evaluate(eval_env(registry, tmp_path, "1", run_id="deleted__1"))  # creates it
    client = MlflowClient(tracking_uri=registry["uri"])
    experiment = client.get_experiment_by_name("reach_bc-evaluation")
    client.delete_experiment(experiment.experiment_id)
    try:
        with pytest.raises(RegistryError, match=r"'reach_bc-evaluation' \(id \d+\) is deleted; "
                                                r"restore it \(mlflow experiments restore\)"):
            run_evaluate(eval_env(registry, tmp_path / "again", "1", run_id="deleted__2"))
    finally:
        client.restore_experiment(experiment.experiment_id)


def test_zero_policy_fails_the_gate(registry: dict[str, Any], tmp_path: Path) -> None:
    result = run_evaluate(eval_env(registry, tmp_path, 2))
    assert result["success_rate"] <= 0.1 and result["passed"] is False
    assert _version_tags(registry, "2")["arf.eval.passed"] == "false"
    # Its failed episodes are in the data hub's failures table, one row per step.
    from arf_trainer.datahub.tables import open_table

    failed = round((1 - result["success_rate"]) * EPISODES)
    assert result["failures_recorded"] == failed > 0
    rows = open_table(tmp_path / "hub", "failures").dataset.to_table()
    assert rows.num_rows == failed * 50
    assert set(rows["model_version"].to_pylist()) == {2}
    assert set(rows["eval_run_id"].to_pylist()) == {result["mlflow_run_id"]}


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    pytest.param({"evaluation": {"environment": "cartpole"}}, EvaluationError,
                 "evaluation.environment is 'cartpole'", id="unknown-environment"),
    pytest.param({"drop_evaluation": True}, EvaluationError, "no evaluation section",
                 id="no-evaluation"),
    pytest.param({"version": 9}, EvaluationError, "versions of 'reach_test_policy': 1, 2",
                 id="missing-version"),
    pytest.param({"version": "latest"}, SpecError, "model_version", id="not-a-number"),
])
def test_evaluate_errors(registry: dict[str, Any], tmp_path: Path, kwargs: dict[str, Any],
                         error: type[Exception], fragment: str) -> None:
    version = kwargs.pop("version", 1)
    with pytest.raises(error, match=fragment):
        run_evaluate(eval_env(registry, tmp_path, version, **kwargs))


def test_promotion_gate_moves_champion_only_to_a_better_version(registry: dict[str, Any],
                                                                tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    gated = {"promotion_margin": 0.02}
    # No champion yet, and the zero policy is below the threshold: it does not become one.
    weak = run_evaluate(eval_env(registry, tmp_path, 2, run_id="gate__1", evaluation=gated))
    assert weak["gate"]["promoted"] is False and "set one by hand" in weak["gate"]["reason"]
    # The expert passes: it becomes the first champion.
    strong = run_evaluate(eval_env(registry, tmp_path, 1, run_id="gate__2", evaluation=gated))
    assert strong["gate"]["promoted"] is True
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    # The zero policy against the champion, on the same seeds: rejected, with the evidence.
    again = run_evaluate(eval_env(registry, tmp_path, 2, run_id="gate__3", evaluation=gated))
    assert {k: again["gate"][k] for k in ("promoted", "champion_version", "champion_rate",
                                          "awaiting_approval", "episodes")} == {
        "promoted": False, "champion_version": "1", "champion_rate": strong["success_rate"],
        "awaiting_approval": False, "episodes": EPISODES}  # stopped at the first look
    assert "clearly worse" in again["gate"]["reason"] and again["gate"]["p_value"] == 1.0
    tags = _version_tags(registry, "2")
    assert tags["arf.gate.decision"] == "rejected" and tags["arf.gate.champion_version"] == "1"
    evidence = json.loads(tags["arf.gate.evidence"])
    assert evidence["wins"] == 0 and evidence["losses"] > 0
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    # A retry of the promoting run changes nothing.
    retry = run_evaluate(eval_env(registry, tmp_path, 1, run_id="gate__2", evaluation=gated))
    assert retry["reused"] is True and retry["gate"]["reason"] == "already champion"


def test_gate_aa_on_real_rollouts_and_approval_leaves_the_alias(registry: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """A/A on real rollouts: v3 is the expert again, against the expert champion: identical
    outcomes on every seed, so never promoted, after the whole budget. Then with approval
    required a clearly better version is only proposed: the alias stays until approved."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    experiment = client.get_experiment_by_name("training").experiment_id
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pytorch.log_model(ExpertPolicy(), name="expert", registered_model_name=MODEL,
                                 serialization_format="pickle", pip_requirements=["torch"])
    client.set_registered_model_alias(MODEL, "champion", "1")
    gated = {"promotion_margin": 0.0, "gate": {"alpha": 0.05, "max_episodes": 2 * EPISODES}}
    aa = run_evaluate(eval_env(registry, tmp_path, 3, run_id="aa__1", evaluation=gated))["gate"]
    assert aa["promoted"] is False and aa["episodes"] == 2 * EPISODES
    assert "not better after the whole budget" in aa["reason"] and "0 won, 0 lost" in aa["reason"]
    tags = _version_tags(registry, "3")
    assert tags["arf.gate.episodes"] == str(2 * EPISODES) and tags["arf.gate.alpha"] == "0.05"
    assert tags["arf.gate.p_value"] == "1" and "McNemar" in tags["arf.gate.test"]

    client.set_registered_model_alias(MODEL, "champion", "2")  # the zero policy
    approval = {**gated, "gate": {**gated["gate"], "approval": "required"}}
    try:
        proposed = run_evaluate(eval_env(registry, tmp_path, 3, run_id="approve__1",
                                         evaluation=approval))["gate"]
        assert proposed["awaiting_approval"] is True and proposed["promoted"] is False
        assert proposed["episodes"] == EPISODES and proposed["p_value"] < 1e-4
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
        tags = _version_tags(registry, "3")
        assert tags["arf.gate.approval"] == "pending" and tags["arf.gate.decision"] == "promoted"
    finally:
        client.set_registered_model_alias(MODEL, "champion", "1")


def test_fleet_records_field_failures_of_the_aliased_version(registry: dict[str, Any],
                                                             tmp_path: Path, capsys) -> None:
    """`arf-trainer fleet`: the alias is resolved to its version, the field episodes are rolled
    out on their own seeds, and only the failed ones land in `failures`, as fleet rows."""
    import json

    from mlflow import MlflowClient

    from arf_trainer.cli import main
    from arf_trainer.datahub.failures import FAILURES_TABLE
    from arf_trainer.datahub.tables import open_table

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    client.set_registered_model_alias(MODEL, "field", "2")  # the zero policy: fails everywhere
    hub = tmp_path / "hub"
    assert main(["fleet", "--model", f"models:/{MODEL}@field", "--hub", str(hub),
                 "--first-seed", "300000", "--episodes", "3", "--label", "night-1",
                 "--recorded-at", "2026-11-25T12:00:00+00:00",
                 "--tracking-uri", registry["uri"]]) == 0
    out = capsys.readouterr().out  # log lines, then the JSON summary
    summary = json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out)
    assert summary["model_version"] == "2" and summary["successes"] == 0
    assert summary["failures_recorded"] == 3
    rows = open_table(hub, FAILURES_TABLE).dataset.to_table()
    assert sorted(set(rows["seed"].to_pylist())) == [300000, 300001, 300002]
    assert set(rows["eval_run_id"].to_pylist()) == {"fleet:night-1"}
    assert set(rows["model_version"].to_pylist()) == {2}
    # Every field episode (for `datahub correct --states all`) is in field_episodes too.
    from arf_trainer.datahub.failures import FIELD_TABLE

    field = open_table(hub, FIELD_TABLE).dataset.to_table()
    assert sorted(set(field["seed"].to_pylist())) == [300000, 300001, 300002]


@pytest.mark.parametrize("uri, message", [
    ("reach_test_policy", "--model='reach_test_policy' is not a registry URI"),
    (f"models:/{MODEL}@nobody", "has no alias 'nobody'"),
    (f"models:/{MODEL}/99", "has no version 99"),
])
def test_fleet_bad_model_uri_is_a_clear_input_error(registry: dict[str, Any], tmp_path: Path,
                                                    capsys, uri: str, message: str) -> None:
    from arf_trainer.cli import main

    code = main(["fleet", "--model", uri, "--hub", str(tmp_path), "--first-seed", "300000",
                 "--episodes", "1", "--tracking-uri", registry["uri"]])
    assert code == 2
    assert message in capsys.readouterr().err
