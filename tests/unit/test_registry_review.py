"""Registration, promotion and approval under races and edge inputs, against a real (sqlite)
MLflow store: one version per training run, the champion moved only over the version the gate
compared against, gate evidence that stays JSON, first versions under approval."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_digits

from arf_trainer import gate
from arf_trainer.errors import SpecError
from arf_trainer.gate import CHAMPION, GateSettings, apply, champion_version, first_version

MODEL = "policy"


@pytest.fixture()
def client(tmp_path: Path) -> Any:
    from mlflow import MlflowClient

    uri = fresh_tracking_uri(tmp_path / "mlflow")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL)
    for _ in range(3):
        client.create_model_version(MODEL, source=str(tmp_path / "model"))
    return client


def outcomes(successes: set[int], seeds: range) -> list[dict[str, Any]]:
    return [{"seed": s, "success": s in successes} for s in seeds]


def better_than(champion: str, settings: GateSettings) -> gate.Decision:
    """A candidate that solves every seed against a champion that solves none."""
    return gate.sequential(settings, lambda start, n: (
        outcomes(set(range(start, start + n)), range(start, start + n)),
        outcomes(set(), range(start, start + n))), champion)


def test_register_racing_a_concurrent_register_keeps_one_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two register steps of one training run at once: the second looked for the run's version
    before the first had registered it, so both register. One version must remain."""
    import mlflow

    from arf_trainer import publisher
    from arf_trainer.trainer.run import run_train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    hp = {"epochs": 1, "hidden_size": 8}
    ws, uri = tmp_path / "ws", fresh_tracking_uri(tmp_path)
    prepare_digits(ws, rows=200)
    run_train(make_env(make_spec("digits_smoke", hyperparameters=hp), ws, uri, tmp_path / "a"))
    env = make_env(make_spec("digits_smoke", "register", hyperparameters=hp), ws, uri,
                   tmp_path / "a")
    first = publisher.run_register(env)

    real, calls = publisher._registered_version, []

    def not_yet_registered(*args: Any) -> Any:  # the first look happened before the other did
        calls.append(args)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(publisher, "_registered_version", not_yet_registered)
    second = publisher.run_register(env)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = [str(v.version) for v in client.search_model_versions(
        "name = 'digits_classifier'")]
    assert versions == ["1"]
    assert second["model_version"] == first["model_version"] == "1"
    assert second["manifest"] == first["manifest"]


def test_gate_does_not_replace_a_champion_it_was_not_compared_with(client: Any) -> None:
    """Two evaluations compared with v1 finish one after the other: the later one must not
    overwrite v2, which it never measured itself against."""
    apply(client, MODEL, "1", first_version(0.0))
    settings = GateSettings(alpha=0.05, margin=0.0, batch=10, max_episodes=10)
    a, b = better_than("1", settings), better_than("1", settings)
    assert apply(client, MODEL, "2", a)["promoted"] is True
    late = apply(client, MODEL, "3", b)
    assert late["promoted"] is False and late["stale"] is True
    assert late["champion_version"] == "2" and "evaluate v3 again" in late["reason"]
    assert champion_version(client, MODEL) == "2"
    assert str(client.get_model_version_by_alias(MODEL, gate.PREVIOUS_CHAMPION).version) == "1"
    tags = client.get_model_version(MODEL, "3").tags
    assert tags["arf.gate.decision"] == "stale" and "now v2" in tags["arf.gate.reason"]
    # A retry of the promoting evaluation still finds itself champion: nothing moves.
    assert apply(client, MODEL, "2", a)["promoted"] is True
    assert champion_version(client, MODEL) == "2"


def test_two_first_versions_at_once_make_one_champion(client: Any) -> None:
    assert apply(client, MODEL, "1", first_version(0.0))["promoted"] is True
    second = apply(client, MODEL, "2", first_version(0.0))  # also found no champion
    assert second["promoted"] is False and second["stale"] is True
    assert champion_version(client, MODEL) == "1"


def test_a_gain_of_exactly_the_margin_is_promoted() -> None:
    """README: promoted at the first look that rejects "with a gain >= the margin". 35 against
    30 successes of 50 seeds is a gain of exactly 0.1; 0.7 - 0.6 in floats is 0.0999..."""
    settings = GateSettings(alpha=0.05, margin=0.1, batch=50, max_episodes=50)
    decision = gate.sequential(settings, lambda start, n: (
        outcomes(set(range(35)), range(start, start + n)),
        outcomes(set(range(30)), range(start, start + n))), "1")
    assert decision.looks[-1].p_value == pytest.approx(1 / 32)  # 5 won, 0 lost
    assert decision.promote, decision.reason


def test_gate_evidence_stays_json_with_many_looks(client: Any) -> None:
    settings = GateSettings(alpha=0.05, margin=0.0, batch=1, max_episodes=300)
    # Alternating discordant seeds: never significant, so every one of the 300 looks is taken.
    decision = gate.sequential(settings, lambda start, n: (
        outcomes({s for s in range(start, start + n) if s % 2}, range(start, start + n)),
        outcomes({s for s in range(start, start + n) if not s % 2}, range(start, start + n))),
        "1")
    assert len(decision.looks) == 300
    tags = gate.gate_tags(decision)
    evidence = json.loads(tags["arf.gate.evidence"])  # cut at 5000 characters, it did not parse
    assert len(tags["arf.gate.evidence"]) <= 5000
    assert evidence["looks_omitted"] + len(evidence["looks"]) == 300
    assert evidence["looks"][0]["episodes"] == 1 and evidence["looks"][-1]["episodes"] == 300
    assert evidence["wins"] == decision.comparison.wins
    apply(client, MODEL, "2", decision)  # MLflow takes it
    assert json.loads(client.get_model_version(MODEL, "2").tags["arf.gate.evidence"])


def test_first_version_under_approval_becomes_champion(client: Any, tmp_path: Path) -> None:
    """README: nothing proposed (a first version) skips the question; so it must not stay
    pending forever (every later version would be a 'first version' too)."""
    from arf_trainer.evaluator import _promotion_gate

    run = client.create_run(client.create_experiment(
        "evaluation", artifact_location=str(tmp_path / "artifacts")))
    settings = GateSettings(alpha=0.05, margin=0.02, batch=5, max_episodes=10)
    result = _promotion_gate(client, MODEL, "1", outcomes(set(range(5)), range(5)), settings,
                             True, 0, run.info.run_id, move_alias=False)
    assert result["promoted"] is True and result["awaiting_approval"] is False
    assert champion_version(client, MODEL) == "1"


class FakeTI:
    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.results = results

    def xcom_pull(self, task_ids: str) -> Any:
        from arf_training.approval import EVALUATE_TASK

        if task_ids == EVALUATE_TASK:
            return self.results
        return {"responded_by_user": {"name": "alice"}}


def _pending(client: Any, version: str, decision: gate.Decision) -> list[dict[str, Any]]:
    result = apply(client, MODEL, version, decision, move_alias=False)
    return [{"model_name": MODEL, "model_version": version, "gate": result}]


def test_approval_of_a_proposal_without_champion(client: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A pending proposal made when there was no champion (an older evaluate step, or a
    champion removed by hand): the evidence renders and approval promotes while there still
    is none, and is refused as stale once someone else became champion."""
    from airflow.sdk.exceptions import AirflowFailException

    from arf_training import approval

    monkeypatch.setattr(approval, "_client", lambda: client)
    results = _pending(client, "1", first_version(0.0))
    text = approval.approval_needed(ti=FakeTI(results))
    assert "| `policy` | v1 | none | - / - | 0 | - | - |" in text
    assert approval.promote_approved(ti=FakeTI(results)) == ["policy/1"]
    assert champion_version(client, MODEL) == "1"

    client.delete_registered_model_alias(MODEL, CHAMPION)
    results = _pending(client, "2", first_version(0.0))
    client.set_registered_model_alias(MODEL, CHAMPION, "3")
    with pytest.raises(AirflowFailException, match=r"compared with champion \(none\), but the "
                                                   "champion is now v3"):
        approval.promote_approved(ti=FakeTI(results))
    assert champion_version(client, MODEL) == "3"


def test_approval_does_not_call_an_mlflow_outage_stale(client: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException

    from arf_training import approval

    settings = GateSettings(alpha=0.05, margin=0.0, batch=10, max_episodes=10)
    apply(client, MODEL, "1", first_version(0.0))
    results = _pending(client, "2", better_than("1", settings))

    def unreachable(*args: Any) -> Any:
        raise MlflowException("API request failed: connection refused")

    monkeypatch.setattr(approval, "_client", lambda: client)
    monkeypatch.setattr(client, "get_model_version_by_alias", unreachable)
    with pytest.raises(MlflowException, match="connection refused"):
        approval.promote_approved(ti=FakeTI(results))
    assert client.get_model_version(MODEL, "2").tags["arf.gate.approval"] == "pending"


def test_non_ascii_digit_version_is_a_spec_error() -> None:
    from arf_trainer.evaluator_checks import model_ref

    # "\u00b2".isdigit() is True, but int() refuses it: a ValueError without a message, before.
    with pytest.raises(SpecError, match="model version number"):
        model_ref({"model_name": MODEL, "model_version": "\u00b2"})
