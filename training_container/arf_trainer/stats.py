"""Confidence intervals for evaluation results (numpy only; deterministic).

Evaluations compare models on a fixed, recorded set of seeds, so a success rate over 50 episodes
is an estimate with an error bar of several points: the interval is recorded next to it and is
what people (and promotion gates) should read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same outcomes always give the same interval


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at 0 % and 100 %, unlike the
    normal approximation, which collapses to a zero-width interval there)."""
    if trials <= 0:
        raise ValueError(f"wilson_interval needs at least one trial, got trials={trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes} must lie between 0 and trials={trials}")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # At 0 and n successes the bound is exactly 0 or 1 (centre and half are equal there), but
    # rounding leaves e.g. 6.9e-18 at 0/50 or 0.9999999999999999 at 10/10: an interval that
    # would exclude its own rate of 100 %.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def bootstrap_mean_interval(values: Sequence[float], level: float = 0.95,
                            samples: int = BOOTSTRAP_SAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (no normality assumption: final distances are
    skewed, a few failures far from the target and many successes near zero)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap_mean_interval needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie strictly between 0 and 1, e.g. 0.95")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def sign_test_p(wins: int, losses: int) -> float:
    """McNemar's exact test, one-sided: P(X >= wins) for X ~ Binomial(wins + losses, 1/2).

    On paired outcomes only the discordant pairs (one version succeeded, the other failed)
    carry information about which version is better; if both were equally good, each
    discordant pair would be a fair coin. Exact (no normal approximation), so the test never
    rejects more often than its level, which a gate needs on 50-seed samples."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins={wins} and losses={losses} must be counts (>= 0)")
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def alpha_spending(alpha: float, looks: int, rho: float = 2.0) -> tuple[float, ...]:
    """Nominal levels of `looks` equally spaced analyses that together spend `alpha`.

    Power-family spending function alpha * t**rho (Kim and DeMets; rho=2 lies between
    Pocock's flat boundary, rho=1, and O'Brien-Fleming's, rho~3): look k may reject at level
    alpha * ((k/K)**rho - ((k-1)/K)**rho). The levels sum to alpha, so by the union bound the
    chance of rejecting at any look under the null is at most alpha, whatever the correlation
    between looks and however many looks are actually taken (stopping early only spends less).
    Conservative: an exact group-sequential boundary would spend a little more of alpha."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must lie strictly between 0 and 1, e.g. 0.05")
    if looks < 1:
        raise ValueError(f"looks={looks} must be at least 1")
    if rho <= 0:
        raise ValueError(f"rho={rho} must be positive")
    spent = [alpha * (k / looks) ** rho for k in range(looks + 1)]
    return tuple(b - a for a, b in zip(spent, spent[1:]))
