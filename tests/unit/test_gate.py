"""The promotion gate: paired decisions, and alias moves in a real (sqlite) MLflow registry."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from arf_trainer.errors import EvaluationError
from arf_trainer.gate import (
    CHAMPION, PREVIOUS_CHAMPION, apply, champion_version, compare, decide, sign_test_p)

SEEDS = range(100, 110)


def outcomes(successes: set[int]) -> list[dict]:
    return [{"seed": s, "success": s in successes, "final_distance": 0.0} for s in SEEDS]


@pytest.mark.parametrize("wins, losses, p", [(5, 0, 1 / 32), (3, 3, 42 / 64), (0, 0, 1.0),
                                             (0, 4, 1.0)])
def test_sign_test_p_values(wins, losses, p):
    assert sign_test_p(wins, losses) == pytest.approx(p)


def test_comparison_pairs_by_seed():
    c = compare(outcomes({100, 101, 102, 103}), outcomes({102, 103, 104}))
    assert (c.wins, c.losses) == (2, 1)
    assert c.candidate_rate == 0.4 and c.champion_rate == 0.3
    assert c.difference == pytest.approx(0.1)
    assert c.candidate_ci95[0] < 0.4 < c.candidate_ci95[1]


@pytest.mark.parametrize("candidate, champion, margin, promote, fragment", [
    pytest.param({100, 101, 102}, {100}, 0.1, True, "promoted", id="better-by-margin"),
    pytest.param({100, 101}, {100}, 0.2, False, "less than the margin", id="under-margin"),
    pytest.param({100}, {100, 101}, 0.0, False, "not better", id="worse"),
    pytest.param({100, 101}, {102, 103}, 0.0, False, "not better", id="tie-is-not-better"),
])
def test_decisions(candidate, champion, margin, promote, fragment):
    decision = decide(compare(outcomes(candidate), outcomes(champion)), margin, "1")
    assert decision.promote is promote
    assert fragment in decision.reason and "paired seeds" in decision.reason


def test_bad_inputs_are_refused():
    with pytest.raises(EvaluationError, match="same seeds"):
        compare(outcomes({100}), outcomes({100})[:5])
    with pytest.raises(EvaluationError, match="twice"):
        compare(outcomes({100}) + outcomes({100})[:1], outcomes({100}))
    with pytest.raises(EvaluationError, match="margin"):
        decide(None, 1.5, None)


@pytest.fixture()
def registry(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("policy")
    for _ in range(3):
        client.create_model_version("policy", source=str(tmp_path / "model"))
    return client


def test_aliases_move_only_for_a_better_candidate(registry):
    client = registry
    assert champion_version(client, "policy") is None
    first = apply(client, "policy", "1", decide(None, 0.02, None))
    assert first["promoted"] and champion_version(client, "policy") == "1"

    better = decide(compare(outcomes({100, 101, 102}), outcomes({100})), 0.02, "1")
    apply(client, "policy", "2", better)
    apply(client, "policy", "2", better)  # a retry changes nothing
    assert champion_version(client, "policy") == "2"
    assert str(client.get_model_version_by_alias("policy", PREVIOUS_CHAMPION).version) == "1"

    worse = decide(compare(outcomes({100}), outcomes({100, 101, 102})), 0.02, "2")
    result = apply(client, "policy", "3", worse)
    assert not result["promoted"] and result["champion_version"] == "2"
    assert result["champion_rate"] == pytest.approx(3 / len(SEEDS)) and first["champion_rate"] is None
    assert str(client.get_model_version_by_alias("policy", CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias("policy", PREVIOUS_CHAMPION).version) == "1"
    tags = client.get_model_version("policy", "3").tags
    assert tags["arf.gate.decision"] == "rejected" and "not better" in tags["arf.gate.reason"]
    assert '"wins": 0' in tags["arf.gate.evidence"] and tags["arf.gate.champion_version"] == "2"
    assert client.get_model_version("policy", "2").tags["arf.gate.decision"] == "promoted"
