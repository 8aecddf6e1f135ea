"""The federation's normalization: each site's statistics combine into the pooled data's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arf_trainer.errors import TrainingError
from arf_trainer.federated.site import SiteData, pooled_stats, statistics
from arf_trainer.trainer.recipes import mean_std


def _site(x: np.ndarray, y: np.ndarray) -> SiteData:
    return SiteData(torch.from_numpy(x), torch.from_numpy(y), None, None, manifest=None)


def _non_iid_sites() -> list[SiteData]:
    """Three sites of different sizes whose feature means differ by far more than their spread
    (a non-IID split), so that most of the pooled variance lies between the sites."""
    rng = np.random.default_rng(0)
    sites = []
    for rows, shift in ((410, -3.0), (95, 0.0), (250, 4.0)):
        x = rng.normal(size=(rows, 4)) * [0.5, 1.0, 2.0, 0.0] + [shift, shift, shift, 7.0]
        x = x.astype(np.float32)
        y = (rng.normal(size=(rows, 2)) + shift / 2).astype(np.float32)
        sites.append(_site(x, y))
    return sites


def test_pooled_stats_equal_the_statistics_of_the_union():
    sites = _non_iid_sites()
    x_stats, y_stats = pooled_stats([statistics(s) for s in sites])
    x_mean, x_std = mean_std(np.concatenate([s.x_train.numpy() for s in sites]))
    y_mean, y_std = mean_std(np.concatenate([s.y_train.numpy() for s in sites]))
    for got, want in ((x_stats[0], x_mean), (x_stats[1], x_std), (y_stats[0], y_mean),
                      (y_stats[1], y_std)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert x_stats[1][3] == 1.0  # a constant column keeps unit scale, as central's does
    # Averaging the sites' own standard deviations would miss the variance between sites.
    rows = sum(s.train_rows for s in sites)
    averaged = sum(float(s.x_train[:, 0].std(unbiased=False)) * s.train_rows for s in sites) / rows
    assert averaged < 0.3 * float(x_stats[1][0])


def test_statistics_hold_aggregates_only_and_skip_label_targets():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    stats = statistics(_site(x, np.array([0, 1, 0, 1, 1, 0])))
    assert set(stats) == {"count", "x_mean", "x_m2"}  # labels are not standardized
    assert all(t.dtype == torch.float64 and t.shape[0] <= 2 for t in stats.values())
    x_stats, y_stats = pooled_stats([stats])
    assert y_stats is None
    torch.testing.assert_close(x_stats[0], torch.tensor([5.0, 6.0]))


def test_a_site_without_rows_adds_nothing_and_no_rows_at_all_is_an_error():
    empty = _site(np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32))
    sites = _non_iid_sites()
    with_empty = pooled_stats([statistics(s) for s in sites] + [statistics(empty)])
    without = pooled_stats([statistics(s) for s in sites])
    for a, b in zip(with_empty, without):
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
    with pytest.raises(TrainingError, match="no site has training rows"):
        pooled_stats([statistics(empty)])


@pytest.mark.parametrize("rows", [1, 2])
def test_a_site_too_small_to_hide_its_rows_shares_no_statistics(rows):
    """One row is its own mean; two are mean +- sqrt(m2 / 2): the 'aggregates' were the rows."""
    x = np.arange(2 * rows, dtype=np.float32).reshape(rows, 2) + 0.5
    with pytest.raises(TrainingError, match=f"{rows} training row.*shares none.*at least 3"):
        statistics(_site(x, x.copy()))
    assert set(statistics(_site(np.ones((3, 2), np.float32), np.ones((3, 2), np.float32)))) \
        == {"count", "x_mean", "x_m2", "y_mean", "y_m2"}
