"""The promotion gate: a candidate model version replaces the `champion` only if it is better.

Both versions are rolled out on the same evaluation seeds, so the comparison is paired: per
seed they either agree (both succeed, both fail) or one wins. Only the discordant seeds say
which is better, and if both were equally good each would be a fair coin: the test is
McNemar's exact test, one-sided (candidate better), i.e. an exact sign test on the discordant
seeds (`arf_trainer.stats.sign_test_p`).

The gate is sequential, so clear cases stay cheap: the seeds come in batches of
`evaluation.episodes` (the first batch is the candidate's own evaluation), up to
`evaluation.gate.max_episodes`. After each batch (a "look") the cumulative p-value is compared
with that look's share of `evaluation.gate.alpha` (power alpha spending, rho=2,
`stats.alpha_spending`); the shares sum to alpha, so by the union bound the chance of ever
promoting a candidate that is not better (the false-promotion rate) is at most alpha, however
many looks are taken. The candidate is promoted at the first look where the test rejects and
its observed gain is at least `evaluation.promotion_margin`; it is rejected early once it is
clearly worse (one-sided exact test the other way at `FUTILITY`: stopping to reject never
raises the false-promotion rate), and otherwise when the budget is spent.

On promotion the old champion keeps an alias, `previous-champion`, so it stays addressable
(`models:/<name>@previous-champion`) and a rollback is one alias move. The decision and its
evidence (test, alpha, p-value, episodes used, every look, both rates with 95 % intervals) are
recorded as `arf.gate.*` tags on the candidate version, whichever way it goes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from arf_trainer.errors import EvaluationError, RegistryError
from arf_trainer.stats import alpha_spending, sign_test_p, wilson_interval

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
TEST = ("sequential McNemar exact test (one-sided sign test on discordant seeds), "
        "power alpha spending rho=2 over the looks, union bound")
# One-sided level at which a look stops early because the candidate is clearly WORSE. Any
# value keeps the false-promotion rate at most alpha (it can only stop promotions); 0.1 saves
# most of the budget on bad candidates while rarely stopping one that is a little better.
FUTILITY = 0.1
DEFAULT_ALPHA = 0.05

# (first seed index, count) -> (candidate outcomes, champion outcomes) on those seeds.
PairedBatch = Callable[[int, int], tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]]]


@dataclass(frozen=True)
class GateSettings:
    """`evaluation.gate` with the batch size (`evaluation.episodes`) and the margin."""

    alpha: float = DEFAULT_ALPHA
    margin: float = 0.0
    batch: int = 50
    max_episodes: int = 200

    def check(self) -> None:
        if not 0 < self.alpha < 1:
            raise EvaluationError(f"evaluation.gate.alpha={self.alpha} must lie strictly "
                                  "between 0 and 1, e.g. 0.05 (the false-promotion rate)")
        if not 0 <= self.margin < 1:
            raise EvaluationError(f"promotion margin {self.margin} must be in [0, 1), e.g. "
                                  "0.02 for two points of success rate")
        if self.batch < 1 or self.max_episodes < self.batch:
            raise EvaluationError(
                f"evaluation.gate.max_episodes={self.max_episodes} must be at least "
                f"evaluation.episodes={self.batch} (the gate's first batch); raise it, e.g. to "
                f"{4 * max(self.batch, 1)}")

    @property
    def levels(self) -> tuple[float, ...]:
        """The nominal level of each look (they sum to alpha)."""
        return alpha_spending(self.alpha, math.ceil(self.max_episodes / self.batch))


@dataclass(frozen=True)
class Look:
    """The cumulative evidence after one batch."""

    episodes: int
    wins: int
    losses: int
    p_value: float
    level: float  # the nominal alpha this look may reject at


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
        # From the counts, not candidate_rate - champion_rate: 0.7 - 0.6 is 0.0999..., which
        # would read a gain of exactly the margin (0.1) as less than it.
        return (self.wins - self.losses) / len(self.seeds)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    comparison: Comparison | None
    margin: float
    champion_version: str | None
    alpha: float | None = None
    looks: tuple[Look, ...] = field(default=())

    @property
    def p_value(self) -> float | None:
        return self.looks[-1].p_value if self.looks else None

    @property
    def episodes(self) -> int:
        return self.looks[-1].episodes if self.looks else 0


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


def first_version(margin: float) -> Decision:
    """No champion yet: the first evaluated candidate (that passed the threshold) becomes one."""
    return Decision(True, f"no version has the '{CHAMPION}' alias yet: the first evaluated "
                    "candidate becomes champion", None, margin, None)


def _summary(c: Comparison, champion: str, looks: Sequence[Look], alpha: float) -> str:
    last = looks[-1]
    return (f"candidate {c.candidate_rate:.1%} vs champion v{champion} {c.champion_rate:.1%} "
            f"on {len(c.seeds)} paired seeds in {len(looks)} look(s) ({c.wins} won, "
            f"{c.losses} lost; McNemar exact p={last.p_value:.3g} vs level {last.level:.3g} "
            f"of alpha {alpha:g})")


def sequential(settings: GateSettings, batches: PairedBatch, champion: str) -> Decision:
    """Run the sequential paired test: ask `batches` for one batch of seeds at a time and stop
    at the first look that decides (see the module docstring)."""
    settings.check()
    candidate: list[dict[str, Any]] = []
    reference: list[dict[str, Any]] = []
    looks: list[Look] = []
    levels = settings.levels
    for k, level in enumerate(levels):
        start = k * settings.batch
        cand, champ = batches(start, min(settings.batch, settings.max_episodes - start))
        candidate.extend(cand)
        reference.extend(champ)
        c = compare(candidate, reference)
        looks.append(Look(len(c.seeds), c.wins, c.losses, c.p_value, level))
        if c.p_value <= level and c.difference > 0 and c.difference >= settings.margin:
            return Decision(True, f"promoted: significantly better by {c.difference:.1%} "
                            f">= margin {settings.margin:.1%}; "
                            f"{_summary(c, champion, looks, settings.alpha)}", c,
                            settings.margin, champion, settings.alpha, tuple(looks))
        if sign_test_p(c.losses, c.wins) <= FUTILITY:
            why = f"clearly worse (one-sided p={sign_test_p(c.losses, c.wins):.3g} <= {FUTILITY})"
            break
    else:
        why = ("not better" if c.difference <= 0 else
               f"better by less than the margin {settings.margin:.1%}"
               if c.difference < settings.margin else
               "not significantly better")
        why += f" after the whole budget of {settings.max_episodes} episodes"
    return Decision(False, f"kept champion: {why}; {_summary(c, champion, looks, settings.alpha)}",
                    c, settings.margin, champion, settings.alpha, tuple(looks))


def champion_version(client: Any, name: str) -> str | None:
    """The version behind `models:/<name>@champion`, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def move_champion(client: Any, name: str, version: str, compared: str | None) -> str | None:
    """Make `version` the champion if the champion is still `compared`, the version the gate
    compared it with (None: there was none): a compare-and-set, so that a candidate never
    replaces a champion it was not measured against (two evaluations ending at once, or a
    champion moved by hand during the gate's rollouts). The old one keeps `previous-champion`.

    Returns None when `version` is the champion afterwards (idempotent: a retry moves nothing),
    else the champion found in place, which is left as it is. Raises RegistryError, moving
    nothing, when `version` no longer exists. MLflow has no atomic alias
    compare-and-set, so the check is made just before the move: what is left is a window of
    milliseconds between two moves, not the minutes of a gate's rollouts."""
    current = champion_version(client, name)
    if current == str(version):
        return None
    if current != compared:
        return current
    _require_version(client, name, str(version))
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return None


def _require_version(client: Any, name: str, version: str) -> None:
    """Checked before any alias moves: previous-champion set over the champion and then a
    champion move that fails (the candidate deleted meanwhile) would lose the version a
    rollback goes back to."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"models:/{name}/{version} no longer exists (deleted since it was "
                                "evaluated): no alias moved") from exc
        raise


def apply(client: Any, name: str, candidate_version: str, decision: Decision,
          move_alias: bool = True) -> dict[str, Any]:
    """Record the decision on the candidate and, if promoted, move the aliases (unless
    `move_alias` is False: a person must approve first, the version is tagged
    `arf.gate.approval=pending`). The alias moves only if the champion is still the version
    the gate compared against (`move_champion`); otherwise nothing moves and the decision is
    recorded as `stale`. Idempotent: a retry changes nothing more."""
    tags = gate_tags(decision)
    pending = decision.promote and not move_alias
    if pending:
        tags["arf.gate.approval"] = "pending"
    stale = None
    if decision.promote and move_alias:
        stale = move_champion(client, name, str(candidate_version), decision.champion_version)
    reason = decision.reason
    if stale is not None:
        compared = f"v{decision.champion_version}" if decision.champion_version else "none"
        reason = (f"not promoted: the champion is now v{stale}, but the gate compared against "
                  f"{compared}, so its evidence no longer holds; evaluate "
                  f"v{candidate_version} again (gate: {decision.reason})")
        tags.update({"arf.gate.decision": "stale", "arf.gate.reason": reason[:5000]})
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate_version, key, value)
    promoted = decision.promote and move_alias and stale is None
    return {"promoted": promoted, "reason": reason,
            "awaiting_approval": pending, "stale": stale is not None,
            "champion_version": str(candidate_version) if promoted
            else stale if stale is not None else decision.champion_version,
            # The champion's rate on the same seeds (None when there was no champion).
            "champion_rate": (decision.comparison.champion_rate
                              if decision.comparison is not None else None),
            "candidate_rate": (decision.comparison.candidate_rate
                               if decision.comparison is not None else None),
            "p_value": decision.p_value, "episodes": decision.episodes,
            "alpha": decision.alpha}


# Longest value a model version tag may hold on every MLflow server this talks to (3.x allows
# 100,000 characters; older servers 5,000).
TAG_VALUE_LIMIT = 5000


def _evidence(comparison: Comparison, looks: Sequence[Look]) -> str:
    """The comparison and its looks as JSON of at most TAG_VALUE_LIMIT characters: when every
    look does not fit, the first and last ones are kept and `looks_omitted` counts the rest
    (cutting the text would leave JSON that no longer parses)."""
    c = asdict(comparison)
    seeds = c.pop("seeds")
    c["seeds"] = f"{seeds[0]}..{seeds[-1]} ({len(seeds)})"
    every = [asdict(look) for look in looks]
    keep = len(every)
    text = json.dumps({**c, "looks": every}, sort_keys=True)
    while len(text) > TAG_VALUE_LIMIT and keep > 0:
        keep -= 1
        head, tail = every[:keep // 2], every[len(every) - (keep - keep // 2):]
        text = json.dumps({**c, "looks": head + tail, "looks_omitted": len(every) - keep},
                          sort_keys=True)
    return text


def gate_tags(decision: Decision) -> dict[str, str]:
    tags = {"arf.gate.decision": "promoted" if decision.promote else "rejected",
            "arf.gate.reason": decision.reason[:5000],
            "arf.gate.margin": f"{decision.margin:g}",
            "arf.gate.champion_version": decision.champion_version or ""}
    if decision.comparison is not None:
        tags["arf.gate.evidence"] = _evidence(decision.comparison, decision.looks)
        tags.update({"arf.gate.test": TEST, "arf.gate.alpha": f"{decision.alpha:g}",
                     "arf.gate.p_value": f"{decision.p_value:.6g}",
                     "arf.gate.episodes": str(decision.episodes)})
    return tags
