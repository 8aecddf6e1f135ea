"""Evaluation confidence intervals against known values."""

from __future__ import annotations

import numpy as np
import pytest

from arf_trainer.stats import bootstrap_mean_interval, wilson_interval


@pytest.mark.parametrize("successes, trials, low, high", [
    # Reference values: Wilson (1927) score interval, z = 1.96 (e.g. statsmodels
    # proportion_confint(method="wilson")).
    pytest.param(45, 50, 0.7864, 0.9565, id="90pct-of-50"),
    pytest.param(0, 20, 0.0, 0.1611, id="none"),
    pytest.param(20, 20, 0.8389, 1.0, id="all"),
    pytest.param(1, 2, 0.0945, 0.9055, id="tiny"),
])
def test_wilson_interval_matches_reference(successes, trials, low, high):
    got = wilson_interval(successes, trials)
    assert got == pytest.approx((low, high), abs=5e-4)
    assert got[0] <= successes / trials <= got[1]


@pytest.mark.parametrize("successes, trials", [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_impossible_counts(successes, trials):
    with pytest.raises(ValueError, match="trials"):
        wilson_interval(successes, trials)


def test_bootstrap_interval_covers_the_mean_and_is_deterministic():
    values = np.random.default_rng(1).exponential(0.02, size=50)
    first = bootstrap_mean_interval(values)
    assert first == bootstrap_mean_interval(values)  # fixed seed: same outcomes, same interval
    assert first[0] < values.mean() < first[1]
    # ~ the normal-theory width for a sample this size (skewed data: loose tolerance)
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert first[1] - first[0] == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_bootstrap_interval_of_a_constant_is_that_constant():
    assert bootstrap_mean_interval([0.5] * 10) == pytest.approx((0.5, 0.5))


def test_bootstrap_interval_rejects_empty_input_and_bad_levels():
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_mean_interval([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_interval([1.0], level=95)
