"""What the federation's server refuses from a site: the checks behind apps' aggregation.

A hostile or broken site can reply to a round with any arrays and any row count. FedAvg weights
an update by its claimed rows and sums the arrays, so (shown with Flower 1.42's FedAvg) one NaN
update made the global model NaN, a site claiming 1e9 rows moved it onto its own update, and an
update of another shape crashed the round without naming the site.
"""

from __future__ import annotations

import pytest
import torch
from trainer_testkit import make_env, make_spec, prepare_reach

from arf_trainer.federated.launch import site_dirs
from arf_trainer.federated.manifests import plan
from arf_trainer.federated.site import update_problem

SENT = {"net.0.weight": torch.zeros(4, 3), "net.0.bias": torch.zeros(4),
        "x_mean": torch.zeros(3, dtype=torch.float64)}


def _update(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{k: v + 1 for k, v in SENT.items()}, **changes}


def test_a_well_formed_update_weighed_by_its_manifest_rows_is_aggregated():
    assert update_problem(_update(), SENT, 90.0, 90) is None


@pytest.mark.parametrize(("update", "rows", "fragment"), [
    pytest.param(_update(**{"net.0.bias": torch.tensor([1.0, float("nan"), 0.0, 0.0])}), 90,
                 "'net.0.bias' holds NaN or infinite", id="nan"),
    pytest.param(_update(**{"net.0.weight": torch.full((4, 3), float("inf"))}), 90,
                 "'net.0.weight' holds NaN or infinite", id="inf"),
    pytest.param(_update(**{"net.0.weight": torch.zeros(5, 3)}), 90,
                 "'net.0.weight' is torch.float32 [5, 3], the round sent torch.float32 [4, 3]",
                 id="shape"),
    pytest.param(_update(**{"net.0.bias": torch.zeros(4, dtype=torch.float64)}), 90,
                 "'net.0.bias' is torch.float64 [4], the round sent torch.float32 [4]",
                 id="dtype"),
    pytest.param({k: v for k, v in _update().items() if k != "x_mean"}, 90,
                 "the round sent", id="missing-array"),
    pytest.param(_update(), 1e9, "weighs its update by 1e+09 training rows, its manifest "
                 "reports 90", id="claims-more-rows"),
    pytest.param(_update(), -80, "by -80 training rows", id="negative-rows"),
    pytest.param(_update(), 0, "by 0 training rows", id="zero-rows"),
])
def test_a_malformed_or_overweighted_update_is_refused_with_the_reason(update, rows, fragment):
    problem = update_problem(update, SENT, float(rows), 90)
    assert problem is not None and fragment in problem, problem


def test_the_plan_gives_the_server_each_sites_manifest_rows(tmp_path):
    """The rows a site's updates must weigh come from its own manifest (what its prepare
    reported, recorded in the lineage), in site order."""
    workspace = tmp_path / "run"
    for name, rows in (("north", 100), ("south", 250)):
        prepare_reach(workspace / "sites" / name, rows=rows)
    spec = make_spec("reach_bc", "federate")
    spec["template"]["federated"] = {
        "sites": [{"name": s, "hub": f"/hubs/{s}", "query": None} for s in ("north", "south")],
        "rounds": 1, "strategy": "fedavg", "fraction_fit": 1.0, "min_sites": 2,
        "local_epochs": 1, "proximal_mu": None}
    env = make_env(spec, workspace, f"sqlite:///{tmp_path}/unused.db", tmp_path / "art")
    plan_, _ = plan(env, site_dirs(env))
    assert plan_["site_rows"] == [90, 225]  # validation_split 0.1 of each site's rows
