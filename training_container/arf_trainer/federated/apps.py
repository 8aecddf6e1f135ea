"""Flower's ServerApp and ClientApp of `arf-trainer federate` (flwr 1.42 Message API).

The ServerApp runs under the SuperLink; its run config names the federation's work folder
(`plan.json` in, `global.pt` + `rounds.json` out). Each ClientApp runs under one site's
SuperNode, whose node config names that site's prepared data only (`data-dir`). Everything a
site needs besides its data arrives in the train message: model shape, hyperparameters, seed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

log = logging.getLogger(__name__)

PLAN = "plan.json"
GLOBAL_WEIGHTS = "global.pt"
ROUNDS = "rounds.json"
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key


class SiteShortfall(RuntimeError):
    """Fewer sites replied in a round than federated.min_sites."""


def _ordered(strategy_cls: type) -> type:
    """`strategy_cls` aggregating replies in site order, and refusing a round below min_sites.

    Flower hands replies over in arrival order; a float sum in a different order differs in the
    last bits, so sorting by site index is what makes a re-run bitwise equal.
    """
    class Ordered(strategy_cls):  # type: ignore[misc, valid-type]
        min_sites = 1
        history: list[dict[str, Any]] = []

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            good = sorted((m for m in replies if not m.has_error()),
                          key=lambda m: int(m.content["metrics"]["site-index"]))
            failed = len(replies) - len(good)
            if len(good) < self.min_sites:
                raise SiteShortfall(
                    f"round {server_round}: {len(good)} site(s) replied ({failed} failed), "
                    f"fewer than federated.min_sites={self.min_sites}; the federation stops")
            indices = [int(m.content["metrics"]["site-index"]) for m in good]
            # Flower's own line counts only what it is handed (the good replies): say it all.
            flwr_log(logging.INFO, "round %s: %s site(s) replied (site indices %s), %s failed",
                     server_round, len(good), indices, failed)
            self.history.append({"round": server_round, "failed": failed, "sites": [
                {k: float(v) for k, v in m.content["metrics"].items()} for m in good]})
            return super().aggregate_train(server_round, good)

    Ordered.__name__ = f"Ordered{strategy_cls.__name__}"
    return Ordered


def _wait_for_sites(grid: Grid, n_sites: int, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < n_sites:
        if time.monotonic() > deadline:
            raise SiteShortfall(f"{connected} of {n_sites} SuperNodes connected within "
                                f"{timeout_s:.0f} s; see the supernode-<site>.log files")
        time.sleep(1)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    import torch

    work = Path(str(context.run_config["work-dir"]))
    plan = json.loads((work / PLAN).read_text())
    fed = plan["federated"]
    n_sites = len(fed["sites"])
    # Round 1 starts with every site (a re-run then sees the same participants); later rounds
    # need only min_sites, so that a site that went down does not stall the federation.
    _wait_for_sites(grid, n_sites, float(plan["round_timeout_s"]))
    common = dict(fraction_train=fed["fraction_fit"], fraction_evaluate=0.0,
                  min_train_nodes=fed["min_sites"], min_available_nodes=fed["min_sites"])
    if fed["strategy"] == "fedprox":
        strategy = _ordered(FedProx)(proximal_mu=float(fed["proximal_mu"]), **common)
    else:
        strategy = _ordered(FedAvg)(**common)
    strategy.min_sites = fed["min_sites"]
    strategy.history = []
    initial = torch.load(work / "initial.pt", map_location="cpu", weights_only=True)
    config = ConfigRecord({"model-info": json.dumps(plan["model_info"]),
                           "hyperparameters": json.dumps(plan["hyperparameters"]),
                           "seed": int(plan["seed"]), "local-epochs": int(fed["local_epochs"])})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                            num_rounds=int(fed["rounds"]), train_config=config,
                            timeout=float(plan["round_timeout_s"]))
    weights = result.arrays.to_torch_state_dict()
    torch.save({k: weights[k] for k in sorted(weights)}, work / GLOBAL_WEIGHTS)
    rounds = {"rounds": strategy.history,
              "aggregated": {str(r): dict(m) for r, m in
                             result.train_metrics_clientapp.items()}}
    (work / ROUNDS).write_text(json.dumps(rounds, indent=2, sort_keys=True))


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    import torch

    from arf_trainer.federated import site
    from arf_trainer.trainer.recipes import Hyperparameters, ModelInfo, get_recipe

    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels, and fair on a shared machine
    config = msg.content["config"]
    info = ModelInfo.from_json(json.loads(str(config["model-info"])))
    hp = Hyperparameters.parse(info.recipe, json.loads(str(config["hyperparameters"])))
    data = site.load_site(Path(str(context.node_config["data-dir"])), info,
                          get_recipe(info.recipe))
    weights = msg.content["arrays"].to_torch_state_dict()
    site_index = int(context.node_config["site-index"])
    new, metrics = site.fit(info, weights, data, hp, epochs=int(config["local-epochs"]),
                            seed=int(config["seed"]), server_round=int(config["server-round"]),
                            site_index=site_index,
                            proximal_mu=float(config.get("proximal-mu", 0.0)))
    metrics = {**metrics, NUM_EXAMPLES: data.train_rows, "site-index": site_index}
    content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
