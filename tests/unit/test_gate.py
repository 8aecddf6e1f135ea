"""The promotion gate: paired decisions, and alias moves in a real (sqlite) MLflow registry."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np

from arf_trainer.errors import EvaluationError
from arf_trainer.gate import (
    CHAMPION, PREVIOUS_CHAMPION, GateSettings, apply, champion_version, compare, first_version,
    gate_tags, sequential)
from arf_trainer.stats import alpha_spending, sign_test_p

SEEDS = range(100, 110)


def outcomes(successes: set[int], seeds=SEEDS) -> list[dict]:
    return [{"seed": s, "success": s in successes, "final_distance": 0.0} for s in seeds]


@pytest.mark.parametrize("wins, losses, p", [
    (5, 0, 1 / 32), (3, 3, 42 / 64), (0, 0, 1.0), (0, 4, 1.0),
    # McNemar exact, one-sided: sum_{k>=12} C(15, k) / 2^15 = 576 / 32768.
    (12, 3, 576 / 32768)])
def test_sign_test_p_values(wins, losses, p):
    assert sign_test_p(wins, losses) == pytest.approx(p)


def test_alpha_spending_power_family():
    levels = alpha_spending(0.05, 4)
    # alpha * ((k/4)^2 - ((k-1)/4)^2)
    assert levels == pytest.approx((0.003125, 0.009375, 0.015625, 0.021875))
    assert sum(levels) == pytest.approx(0.05)
    assert alpha_spending(0.05, 1) == pytest.approx((0.05,))
    with pytest.raises(ValueError, match="alpha"):
        alpha_spending(1.5, 3)


def test_comparison_pairs_by_seed():
    c = compare(outcomes({100, 101, 102, 103}), outcomes({102, 103, 104}))
    assert (c.wins, c.losses) == (2, 1)
    assert c.candidate_rate == 0.4 and c.champion_rate == 0.3
    assert c.difference == pytest.approx(0.1)
    assert c.candidate_ci95[0] < 0.4 < c.candidate_ci95[1]


def fixed_batches(cand: list[bool], champ: list[bool], calls: list | None = None):
    """A paired source of known outcomes: seed i -> (cand[i], champ[i])."""
    def batches(start, count):
        if calls is not None:
            calls.append((start, count))
        seeds = range(start, start + count)
        return ([{"seed": s, "success": cand[s]} for s in seeds],
                [{"seed": s, "success": champ[s]} for s in seeds])
    return batches


def test_a_clear_win_stops_at_the_first_look():
    # 20 wins, 0 losses in the first 50: p = 2^-20, under the first look's 0.003125.
    cand = [True] * 45 + [False] * 5 + [True] * 150
    champ = [True] * 25 + [False] * 25 + [True] * 150
    calls: list = []
    d = sequential(GateSettings(alpha=0.05, margin=0.02, batch=50, max_episodes=200),
                   fixed_batches(cand, champ, calls), "1")
    assert d.promote and calls == [(0, 50)] and d.episodes == 50
    assert d.p_value == pytest.approx(2 ** -20) and "promoted" in d.reason
    tags = gate_tags(d)
    assert tags["arf.gate.episodes"] == "50" and tags["arf.gate.alpha"] == "0.05"
    assert "McNemar" in tags["arf.gate.test"] and float(tags["arf.gate.p_value"]) < 1e-5


def test_a_small_lead_is_not_promoted_without_significance():
    # The old one-shot gate promoted this (4 wins, 2 losses: +4 points >= the 2-point margin).
    # Over the whole budget it stays 16 vs 8 (p = 0.076 > the last level 0.021875): kept.
    pattern_c = [True] * 4 + [False] * 2 + [True] * 44
    pattern_b = [False] * 4 + [True] * 2 + [True] * 44
    d = sequential(GateSettings(alpha=0.05, margin=0.02, batch=50, max_episodes=200),
                   fixed_batches(pattern_c * 4, pattern_b * 4), "1")
    assert not d.promote and d.episodes == 200 and len(d.looks) == 4
    assert (d.looks[-1].wins, d.looks[-1].losses) == (16, 8)
    assert "not significantly better" in d.reason


def test_a_worse_candidate_stops_early_and_margin_is_kept():
    worse = sequential(GateSettings(batch=50, max_episodes=200),
                       fixed_batches([False] * 10 + [True] * 190, [True] * 200), "1")
    assert not worse.promote and worse.episodes == 50 and "clearly worse" in worse.reason
    # Significant (15 wins, 0 losses) but by 15 points, under a 20-point margin: kept.
    big = sequential(GateSettings(margin=0.2, batch=50, max_episodes=100),
                     fixed_batches([True] * 100, [s % 20 >= 3 for s in range(100)]), "1")
    assert not big.promote and "less than the margin" in big.reason and big.episodes == 100


def bernoulli_source(rng, delta: float):
    """Seeds of varying difficulty (p_s ~ Beta(6, 2), mean 75 %); the candidate succeeds with
    p_s + delta, the champion with p_s, independently: a cheap stand-in for rollouts."""
    def batches(start, count):
        p = rng.beta(6, 2, size=count)
        cand = rng.random(count) < np.clip(p + delta, 0, 1)
        champ = rng.random(count) < p
        seeds = range(start, start + count)
        return ([{"seed": s, "success": bool(c)} for s, c in zip(seeds, cand)],
                [{"seed": s, "success": bool(b)} for s, b in zip(seeds, champ)])
    return batches


def test_aa_false_promotion_rate_is_at_most_alpha():
    """A/A: candidate and champion equally good; 1000 gates. The old one-shot rule (50 seeds,
    promote if ahead by the 2-point margin) promotes about a third of them."""
    rng = np.random.default_rng(7)
    settings = GateSettings(alpha=0.05, margin=0.02, batch=50, max_episodes=200)
    runs = [sequential(settings, bernoulli_source(rng, 0.0), "1") for _ in range(1000)]
    rate = sum(d.promote for d in runs) / len(runs)
    assert rate <= settings.alpha
    old = sum(d.looks[0].wins - d.looks[0].losses >= 1 for d in runs) / len(runs)
    assert old > 0.25  # what the one-shot rule would have promoted on the first 50 seeds
    # A candidate truly 15 points better is promoted most of the time, usually early.
    better = [sequential(settings, bernoulli_source(rng, 0.15), "1") for _ in range(200)]
    assert sum(d.promote for d in better) / len(better) >= 0.8
    assert np.mean([d.episodes for d in better]) < 150


def test_bad_inputs_are_refused():
    with pytest.raises(EvaluationError, match="same seeds"):
        compare(outcomes({100}), outcomes({100})[:5])
    with pytest.raises(EvaluationError, match="twice"):
        compare(outcomes({100}) + outcomes({100})[:1], outcomes({100}))
    with pytest.raises(EvaluationError, match="margin"):
        GateSettings(margin=1.5).check()
    with pytest.raises(EvaluationError, match="max_episodes=20 must be at least"):
        GateSettings(batch=50, max_episodes=20).check()
    with pytest.raises(EvaluationError, match="alpha"):
        GateSettings(alpha=0.0).check()


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
    first = apply(client, "policy", "1", first_version(0.02))
    assert first["promoted"] and champion_version(client, "policy") == "1"

    settings = GateSettings(alpha=0.05, margin=0.02, batch=10, max_episodes=10)
    wins = set(range(100, 110))
    better = sequential(settings, lambda s, n: (outcomes(wins), outcomes({100})), "1")
    apply(client, "policy", "2", better)
    apply(client, "policy", "2", better)  # a retry changes nothing
    assert champion_version(client, "policy") == "2"
    assert str(client.get_model_version_by_alias("policy", PREVIOUS_CHAMPION).version) == "1"

    worse = sequential(settings, lambda s, n: (outcomes({100}), outcomes({100, 101, 102})), "2")
    result = apply(client, "policy", "3", worse)
    assert not result["promoted"] and result["champion_version"] == "2"
    assert result["champion_rate"] == pytest.approx(3 / len(SEEDS)) and first["champion_rate"] is None
    assert result["episodes"] == 10 and result["p_value"] == pytest.approx(1.0)
    assert str(client.get_model_version_by_alias("policy", CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias("policy", PREVIOUS_CHAMPION).version) == "1"
    tags = client.get_model_version("policy", "3").tags
    assert tags["arf.gate.decision"] == "rejected" and "not better" in tags["arf.gate.reason"]
    assert '"wins": 0' in tags["arf.gate.evidence"] and tags["arf.gate.champion_version"] == "2"
    assert client.get_model_version("policy", "2").tags["arf.gate.decision"] == "promoted"


def test_a_candidate_deleted_before_the_move_keeps_the_rollback_target(registry):
    """v2 champion, v1 previous-champion; v3 beat v2 but was deleted before the alias moved.
    The move must fail saying so before previous-champion moves onto v2 (which would lose v1,
    the version a rollback goes back to), as the approval path does (`approval._promote`)."""
    from arf_trainer.errors import RegistryError

    client = registry
    apply(client, "policy", "1", first_version(0.02))
    settings = GateSettings(alpha=0.05, margin=0.02, batch=10, max_episodes=10)
    wins = set(range(100, 110))
    apply(client, "policy", "2", sequential(settings, lambda s, n: (outcomes(wins),
                                                                     outcomes({100})), "1"))
    better = sequential(settings, lambda s, n: (outcomes(wins), outcomes({100})), "2")
    client.delete_model_version("policy", "3")
    with pytest.raises(RegistryError, match="models:/policy/3 no longer exists"):
        apply(client, "policy", "3", better)
    assert champion_version(client, "policy") == "2"
    assert str(client.get_model_version_by_alias("policy", PREVIOUS_CHAMPION).version) == "1"
