"""The promotion gate: a candidate model version replaces the `champion` only if it is better.

Both versions are rolled out on the same evaluation seeds, so the comparison is paired: per
seed, the candidate and the champion either agree (both succeed, both fail) or one wins. The
candidate is promoted when its success rate beats the champion's, by at least the margin; a
candidate that is worse or equal on these seeds never becomes champion, whatever the margin.
The exact one-sided sign test on the discordant seeds (McNemar's exact test) is recorded with
the evidence, for people to judge how much to trust a small difference.

On promotion the old champion keeps an alias, `previous-champion`, so it stays addressable
(`models:/<name>@previous-champion`) and a rollback is one alias move. The decision and its
evidence (both rates with 95 % intervals, the seeds, wins/losses, p-value, margin) are recorded
as `arf.gate.*` tags on the candidate version, whichever way it goes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from arf_trainer.errors import EvaluationError
from arf_trainer.stats import wilson_interval

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two versions on the same seeds."""

    seeds: tuple[int, ...]
    candidate_rate: float
    champion_rate: float
    candidate_ci95: tuple[float, float]
    champion_ci95: tuple[float, float]
    wins: int  # seeds the candidate solved and the champion did not
    losses: int  # the other way round
    p_value: float  # exact one-sided sign test on the discordant seeds (candidate better)

    @property
    def difference(self) -> float:
        return self.candidate_rate - self.champion_rate


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    comparison: Comparison | None
    margin: float
    champion_version: str | None


def _by_seed(outcomes: Sequence[dict[str, Any]], who: str) -> dict[int, bool]:
    result: dict[int, bool] = {}
    for o in outcomes:
        seed = int(o["seed"])
        if seed in result:
            raise EvaluationError(f"{who} outcomes list seed {seed} twice; each evaluation seed "
                                  "must appear once")
        result[seed] = bool(o["success"])
    return result


def compare(candidate: Sequence[dict[str, Any]], champion: Sequence[dict[str, Any]]) -> Comparison:
    """Pair the outcomes ({"seed", "success"} per episode) of two versions by seed."""
    cand, champ = _by_seed(candidate, "candidate"), _by_seed(champion, "champion")
    if set(cand) != set(champ) or not cand:
        raise EvaluationError(
            f"the candidate was evaluated on {len(cand)} seed(s) and the champion on "
            f"{len(champ)}, not the same set; a paired comparison needs both on the same seeds "
            "(same evaluation.seed and evaluation.episodes)")
    seeds = tuple(sorted(cand))
    wins = sum(cand[s] and not champ[s] for s in seeds)
    losses = sum(champ[s] and not cand[s] for s in seeds)
    n = len(seeds)
    c_succ, b_succ = sum(cand.values()), sum(champ.values())
    return Comparison(seeds=seeds, candidate_rate=c_succ / n, champion_rate=b_succ / n,
                      candidate_ci95=wilson_interval(c_succ, n),
                      champion_ci95=wilson_interval(b_succ, n), wins=wins, losses=losses,
                      p_value=sign_test_p(wins, losses))


def sign_test_p(wins: int, losses: int) -> float:
    """P(X >= wins) for X ~ Binomial(wins + losses, 1/2): the chance of at least this many wins
    among the discordant seeds if both versions were equally good."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def decide(comparison: Comparison | None, margin: float, champion_version: str | None) -> Decision:
    """Promote iff there is no champion yet, or the candidate is better on the paired seeds,
    by at least `margin`."""
    if not 0 <= margin < 1:
        raise EvaluationError(f"promotion margin {margin} must be in [0, 1), e.g. 0.02 for two "
                              "points of success rate")
    if champion_version is None or comparison is None:
        return Decision(True, f"no version has the '{CHAMPION}' alias yet: the first evaluated "
                        "candidate becomes champion", None, margin, None)
    c = comparison
    summary = (f"candidate {c.candidate_rate:.1%} vs champion v{champion_version} "
               f"{c.champion_rate:.1%} on {len(c.seeds)} paired seeds ({c.wins} won, "
               f"{c.losses} lost, sign-test p={c.p_value:.3g})")
    # difference = (wins - losses) / seeds: "better" and "wins more seeds than it loses" are
    # the same thing on paired seeds. A tie is not better, even with a zero margin.
    if c.difference <= 0 or c.difference < margin:
        why = ("not better" if c.difference <= 0
               else f"better by less than the margin {margin:.1%}")
        return Decision(False, f"kept champion: {why}; {summary}", c, margin, champion_version)
    return Decision(True, f"promoted: better by {c.difference:.1%} >= margin {margin:.1%}; "
                    f"{summary}", c, margin, champion_version)


def champion_version(client: Any, name: str) -> str | None:
    """The version behind `models:/<name>@champion`, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def apply(client: Any, name: str, candidate_version: str, decision: Decision) -> dict[str, Any]:
    """Record the decision on the candidate and, if promoted, move the aliases. Idempotent: a
    retry that finds the candidate already champion changes nothing."""
    tags = gate_tags(decision)
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate_version, key, value)
    if decision.promote:
        current = champion_version(client, name)
        if current != str(candidate_version):
            if current is not None:
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current)
            client.set_registered_model_alias(name, CHAMPION, str(candidate_version))
    return {"promoted": decision.promote, "reason": decision.reason,
            "champion_version": str(candidate_version) if decision.promote
            else decision.champion_version,
            # The champion's rate on the same seeds (None when there was no champion).
            "champion_rate": (decision.comparison.champion_rate
                              if decision.comparison is not None else None)}


def gate_tags(decision: Decision) -> dict[str, str]:
    tags = {"arf.gate.decision": "promoted" if decision.promote else "rejected",
            "arf.gate.reason": decision.reason[:5000],
            "arf.gate.margin": f"{decision.margin:g}",
            "arf.gate.champion_version": decision.champion_version or ""}
    if decision.comparison is not None:
        c = asdict(decision.comparison)
        seeds = c.pop("seeds")
        c["seeds"] = f"{seeds[0]}..{seeds[-1]} ({len(seeds)})"
        tags["arf.gate.evidence"] = json.dumps(c, sort_keys=True)
    return tags
