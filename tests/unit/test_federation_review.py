"""What the federation's server refuses from a site: the checks behind apps' aggregation.

A hostile or broken site can reply to a round with any arrays and any row count. FedAvg weights
an update by its claimed rows and sums the arrays, so (shown with Flower 1.42's FedAvg) one NaN
update made the global model NaN, a site claiming 1e9 rows moved it onto its own update, and an
update of another shape crashed the round without naming the site.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[2]
FED_VENV = Path(os.environ.get("ARF_FEDERATION_VENV") or REPO / ".federation-venv")

# One round of the server's strategy (apps._strategy, Flower's own FedAvg/FedMedian/
# FedTrimmedAvg under the site-order and refusal wrapper) over three well-formed updates, one of
# them finite but extreme: the refusals cannot catch it, only the aggregation can resist it.
AGGREGATE = """
import json
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from arf_trainer.federated.apps import _strategy

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a ServerApp has
SENT = {"w": torch.zeros(3), "steps": torch.zeros(2, dtype=torch.int64)}

def reply(index, value):
    arrays = ArrayRecord({"w": torch.full((3,), value),
                          "steps": torch.full((2,), 7, dtype=torch.int64)})
    metrics = MetricRecord({"num-examples": 100, "site-index": index})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}),
                   dst_node_id=index + 1, message_type=MessageType.TRAIN)

out = {}
for name, extra in (("fedavg", {}), ("fedmedian", {}), ("fedtrimmedavg", {"trim_beta": 0.34})):
    fed = {"strategy": name, "fraction_fit": 1.0, "min_sites": 3,
           "sites": [{"name": n} for n in ("north", "south", "east")], **extra}
    strategy = _strategy(fed, [100, 100, 100])
    strategy.sent = SENT
    arrays, _ = strategy.aggregate_train(1, [reply(2, 1e6), reply(0, 1.0), reply(1, 1.5)])
    merged = arrays.to_torch_state_dict()
    out[name] = {"w": merged["w"].tolist(), "steps": str(merged["steps"].dtype),
                 "step_values": merged["steps"].tolist()}
print(json.dumps(out))
"""


@pytest.mark.skipif(not (FED_VENV / "bin" / "python").exists(),
                    reason=f"no federation venv at {FED_VENV}: run `make federation-venv`")
def test_robust_strategies_resist_a_site_with_extreme_finite_weights():
    """A site with a registered key may send finite but extreme weights (a bug or an attack):
    FedAvg follows it; fedmedian and fedtrimmedavg keep the other sites' value, and the round's
    arrays keep the dtypes the round sent (np.median turns integers into float64, which the
    next round would refuse from every site)."""
    proc = subprocess.run([str(FED_VENV / "bin" / "python"), "-c", AGGREGATE],
                          env={**os.environ, "PYTHONPATH": str(REPO / "training_container")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fedavg"]["w"][0] > 3e5
    assert out["fedmedian"]["w"] == [1.5, 1.5, 1.5]
    assert out["fedtrimmedavg"]["w"] == [1.5, 1.5, 1.5]
    assert {o["steps"] for o in out.values()} == {"torch.int64"}
    assert all(o["step_values"] == [7, 7] for o in out.values())  # a mean of 7s, not 6.9999
