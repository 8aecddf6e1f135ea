"""Flower's ServerApp and ClientApp of `arf-trainer federate` (flwr 1.42 Message API).

The ServerApp runs under the SuperLink; its run config names the federation's work folder
(`plan.json` in, `global.pt` + `rounds.json` out). Each ClientApp runs under one site's
SuperNode, whose node config names that site's prepared data only (`data-dir`). Everything a
site needs besides its data arrives in the messages: model shape, hyperparameters, seed.

Before round 1 the server asks every site for its normalization statistics (a query message)
and starts the federation from the pooled normalization, as central training would.

`superlink_main` is flower-superlink admitting only this step's own run and SuperNodes: Flower's
Control API authenticates no caller (account auth is Flower Enterprise), and a run it accepts
executes its app's code in every SuperNode, next to a site's rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg

log = logging.getLogger(__name__)

PLAN = "plan.json"
GLOBAL_WEIGHTS = "global.pt"
ROUNDS = "rounds.json"
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key


class SiteShortfall(RuntimeError):
    """Fewer sites replied in a round than federated.min_sites."""


def _ordered(strategy_cls: type) -> type:
    """`strategy_cls` aggregating replies in site order, refusing malformed replies (site.
    update_problem: the site is named and counts as failed) and a round below min_sites.

    Flower hands replies over in arrival order; a float sum in a different order differs in the
    last bits, so sorting by site index is what makes a re-run bitwise equal.
    """
    class Ordered(strategy_cls):  # type: ignore[misc, valid-type]
        min_sites = 1
        history: list[dict[str, Any]] = []
        sites: list[tuple[str, int]] = []  # (name, training rows of its manifest) by index
        sent: dict[str, Any] = {}

        def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
            self.sent = arrays.to_torch_state_dict()
            return super().configure_train(server_round, arrays, config, grid)

        def _problem(self, message: Message, seen: set[int]) -> tuple[int, str | None]:
            from arf_trainer.federated.site import update_problem

            metrics = message.content["metrics"]
            index = int(metrics.get("site-index", -1))
            if not 0 <= index < len(self.sites) or index in seen:
                return index, f"site index {index} is unknown or replied twice"
            seen.add(index)
            return index, update_problem(message.content["arrays"].to_torch_state_dict(),
                                         self.sent, float(metrics.get(NUM_EXAMPLES, -1)),
                                         self.sites[index][1])

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            seen: set[int] = set()
            good, rejected = [], {}
            for message in (m for m in replies if not m.has_error()):
                index, problem = self._problem(message, seen)
                if problem is None:
                    good.append((index, message))
                    continue
                name = self.sites[index][0] if 0 <= index < len(self.sites) else str(index)
                rejected[name] = problem
                flwr_log(logging.WARNING, "round %s: site %r's update is not aggregated: %s",
                         server_round, name, problem)
            good = [m for _, m in sorted(good, key=lambda pair: pair[0])]
            failed = len(replies) - len(good)
            if len(good) < self.min_sites:
                raise SiteShortfall(
                    f"round {server_round}: {len(good)} site(s) replied ({failed} failed"
                    f"{'; refused: ' + json.dumps(rejected) if rejected else ''}), "
                    f"fewer than federated.min_sites={self.min_sites}; the federation stops")
            indices = [int(m.content["metrics"]["site-index"]) for m in good]
            # Flower's own line counts only what it is handed (the good replies): say it all.
            flwr_log(logging.INFO, "round %s: %s site(s) replied (site indices %s), %s failed",
                     server_round, len(good), indices, failed)
            self.history.append({"round": server_round, "failed": failed, "rejected": rejected,
                                 "sites": [{k: float(v) for k, v in
                                            m.content["metrics"].items()} for m in good]})
            arrays, metrics = super().aggregate_train(server_round, good)
            if arrays is None:
                return arrays, metrics
            # Flower's means and np.median give float64 for integer arrays: the next round would
            # refuse every site's update as another dtype (and 6.9999 of seven 7s is not 6).
            merged = arrays.to_torch_state_dict()
            return ArrayRecord({k: _as_sent(v, self.sent[k]) for k, v in merged.items()}), metrics

    Ordered.__name__ = f"Ordered{strategy_cls.__name__}"
    return Ordered


def _as_sent(merged: Any, sent: Any) -> Any:
    if merged.dtype == sent.dtype:
        return merged
    return (merged if sent.is_floating_point() else merged.round()).to(sent.dtype)


def _wait_for_sites(grid: Grid, n_sites: int, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < n_sites:
        if time.monotonic() > deadline:
            raise SiteShortfall(f"{connected} of {n_sites} SuperNodes connected within "
                                f"{timeout_s:.0f} s; see the supernode-<site>.log files")
        time.sleep(1)


def _pooled_normalization(grid: Grid, initial: dict[str, Any], plan: dict[str, Any]
                          ) -> dict[str, Any]:
    """`initial` with the normalization of the union of the sites' training rows, from each
    site's statistics (site.statistics: counts, means, sums of squared deviations).

    Fixed before round 1 and the same at every site, the buffers then never change (sites
    train `model.net` only), so a server optimizer never moves them either.
    """
    from arf_trainer.federated import site
    from arf_trainer.trainer.recipes import ModelInfo, get_recipe

    info = ModelInfo.from_json(plan["model_info"])
    recipe = get_recipe(info.recipe)
    if not recipe.fits_normalization:  # the model normalizes its inputs itself
        return initial
    config = ConfigRecord({"model-info": json.dumps(plan["model_info"])})
    nodes = sorted(grid.get_node_ids())
    replies = list(grid.send_and_receive(
        [Message(content=RecordDict({"config": config}), dst_node_id=node,
                 message_type=MessageType.QUERY) for node in nodes],
        timeout=float(plan["round_timeout_s"])))
    good = sorted((m for m in replies if not m.has_error()),
                  key=lambda m: int(m.content["metrics"]["site-index"]))
    if len(good) < len(nodes):
        errors = [m.error.reason for m in replies if m.has_error()]
        raise SiteShortfall(f"{len(good)} of {len(nodes)} sites sent their normalization "
                            f"statistics (errors: {errors or 'none, the rest timed out'}); "
                            "every site must, before round 1")
    stats = [m.content["arrays"].to_torch_state_dict() for m in good]
    x_stats, y_stats = site.pooled_stats(stats)
    model = recipe.build_model(info)
    model.load_state_dict(initial)
    recipe.set_inputs_normalization(model, x_stats, y_stats)
    flwr_log(logging.INFO, "pooled normalization from %s site(s), %d training rows",
             len(good), int(sum(float(s["count"][0]) for s in stats)))
    return {k: v.detach().clone() for k, v in sorted(model.state_dict().items())}


def _strategy(fed: dict[str, Any], site_rows: list[int]) -> Any:
    common = dict(fraction_train=fed["fraction_fit"], fraction_evaluate=0.0,
                  min_train_nodes=fed["min_sites"], min_available_nodes=fed["min_sites"])
    if fed["strategy"] == "fedprox":
        strategy = _ordered(FedProx)(proximal_mu=float(fed["proximal_mu"]), **common)
    elif fed["strategy"] == "fedavgm":
        # Server momentum on the round's averaged update (Hsu et al. 2019): with K sites each
        # round takes ~1/K of central training's optimizer steps, and non-IID updates partly
        # cancel; momentum carries the common direction across rounds.
        server_lr = fed.get("server_lr")  # optional: 1.0, the mean's own step
        strategy = _ordered(FedAvgM)(server_learning_rate=float(server_lr or 1.0),
                                     server_momentum=float(fed["server_momentum"]), **common)
    elif fed["strategy"] == "fedmedian":
        # Robust to a minority of sites sending extreme (finite) weights: the coordinate-wise
        # median of the sites' weights, each site counting once whatever its rows.
        strategy = _ordered(FedMedian)(**common)
    elif fed["strategy"] == "fedtrimmedavg":
        strategy = _ordered(FedTrimmedAvg)(beta=float(fed["trim_beta"]), **common)
    else:
        strategy = _ordered(FedAvg)(**common)
    strategy.min_sites = fed["min_sites"]
    strategy.history = []
    strategy.sites = [(s["name"], int(rows)) for s, rows in zip(fed["sites"], site_rows)]
    return strategy


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
    strategy = _strategy(fed, plan["site_rows"])
    initial = _pooled_normalization(
        grid, torch.load(work / "initial.pt", map_location="cpu", weights_only=True), plan)
    config = ConfigRecord({"model-info": json.dumps(plan["model_info"]),
                           "hyperparameters": json.dumps(plan["hyperparameters"]),
                           "seed": int(plan["seed"]), "local-epochs": int(fed["local_epochs"])})
    if fed.get("proximal_mu") is not None:  # FedProx sets it too; FedAvgM takes it from here
        config["proximal-mu"] = float(fed["proximal_mu"])
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


@client_app.query()
def client_statistics(msg: Message, context: Context) -> Message:
    """This site's normalization statistics (aggregates, no rows): see site.statistics."""
    import torch

    from arf_trainer.federated import site
    from arf_trainer.trainer.recipes import ModelInfo, get_recipe

    torch.set_num_threads(1)
    info = ModelInfo.from_json(json.loads(str(msg.content["config"]["model-info"])))
    recipe = get_recipe(info.recipe)
    data = site.load_site(Path(str(context.node_config["data-dir"])), info, recipe)
    metrics = MetricRecord({"site-index": int(context.node_config["site-index"])})
    content = RecordDict({"arrays": ArrayRecord(site.statistics(data, recipe)),
                          "metrics": metrics})
    return Message(content=content, reply_to=msg)


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
    # Reply in the order the arrays came: FedAvgM pairs the global and averaged arrays by
    # position, not by name.
    content = RecordDict({"arrays": ArrayRecord({k: new[k] for k in weights}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


# What `superlink_main` admits, from the federate step (launch.py): the sha256 of the step's
# FAB, its run config, and the folder of the public keys of the sites' SuperNodes.
PINNED_FAB = "ARF_FEDERATION_FAB_SHA256"
PINNED_RUN_CONFIG = "ARF_FEDERATION_RUN_CONFIG"
ADMITTED_KEYS = "ARF_FEDERATION_ADMITTED_KEYS_DIR"


def _admitted_keys(folder: Path) -> set[bytes]:
    """The DER public keys of the `*.pub` files (OpenSSH format) in `folder`, read per call:
    a SuperNode the step restarts has a new key (launch.Federation.revive)."""
    from cryptography.hazmat.primitives import serialization

    der = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {serialization.load_ssh_public_key(p.read_bytes()).public_bytes(*der)
            for p in sorted(folder.glob("*.pub"))}


def install_superlink_guard(fab_sha256: str, run_config: dict[str, Any], keys: Path) -> None:
    """Make this process's SuperLink state refuse (a) every run but one of the FAB `fab_sha256`
    with `run_config`, and (b) every SuperNode key that is not a `*.pub` file in `keys`.

    Why: the Control API (`flwr run`, `flwr supernode register`) answers anyone who reaches
    the port. A foreign run would execute its own ClientApp in every SuperNode, which reads
    the site's rows and could send them anywhere; a foreign key would join the rounds.
    Both refusals sit in the state's `create_run`/`create_node`, which every Control API path
    (runs, automations, registrations) goes through.
    """
    from cryptography.hazmat.primitives import serialization
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.error import ApiErrorCode, FlowerError

    runs: list[str] = []

    def refuse(what: str) -> FlowerError:
        flwr_log(logging.ERROR, "arf federate: refused %s", what)
        return FlowerError(ApiErrorCode.FORBIDDEN_ACTION, f"refused {what}",
                           public_details=f"this SuperLink serves one arf federate step "
                                          f"only; refused {what}")

    for cls in (InMemoryLinkState, SqlLinkState):
        def create_run(self, fab_id, fab_version, fab_hash, override_config, *args,
                       _original=cls.create_run, **kwargs):
            if fab_hash != fab_sha256 or dict(override_config or {}) != run_config or runs:
                raise refuse(f"a run of app {fab_id!r} (FAB sha256 {fab_hash}, run config "
                             f"{dict(override_config or {})}): only the step's own run "
                             f"(FAB sha256 {fab_sha256}) may start, once")
            runs.append(fab_hash)
            return _original(self, fab_id, fab_version, fab_hash, override_config, *args,
                             **kwargs)

        def create_node(self, *args, _original=cls.create_node, **kwargs):
            pem = kwargs["public_key"] if "public_key" in kwargs else args[2]
            key = serialization.load_pem_public_key(pem).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if key not in _admitted_keys(keys):
                raise refuse(f"the SuperNode key named {kwargs.get('name')!r}: not one of "
                             f"the sites' keys in {keys}")
            return _original(self, *args, **kwargs)

        cls.create_run, cls.create_node = create_run, create_node
    _refuse_control_calls(refuse)


# What this step calls on its SuperLink's Control API: `flwr run --stream` (StartRun,
# StreamLogs) and `flwr supernode register` (RegisterNode; the login calls are harmless).
CONTROL_CALLS = frozenset({"StartRun", "StreamLogs", "RegisterNode", "GetLoginDetails",
                           "GetAuthTokens"})


def _refuse_control_calls(refuse: Any) -> None:
    """Refuse every other Control API call. Unauthenticated, `flwr ls` listed the run (its id
    and config) and `flwr supernode ls` the sites' node ids to anyone who reached the port;
    with them `flwr stop` stopped the step's run and `flwr supernode unregister` dropped a site.

    Flower serves the Control API twice, over gRPC (`ControlServicer.<Call>`) and HTTP (its
    router), and both call `control_handlers.<call in snake case>`: patched there."""
    import re

    from flwr.superlink.servicer.control import control_handlers
    from flwr.superlink.servicer.control.control_servicer import ControlServicer

    def refused(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise refuse(f"the Control API call {name}: this step makes only "
                         f"{', '.join(sorted(CONTROL_CALLS))}")
        return call

    for name in [n for n in vars(ControlServicer) if n[:1].isupper()]:
        handler = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
        if name not in CONTROL_CALLS and hasattr(control_handlers, handler):
            setattr(control_handlers, handler, refused(name))


def superlink_main() -> None:
    """flower-superlink (its command-line arguments) behind `install_superlink_guard`, pinned
    by the environment launch.py sets."""
    import sys

    from flwr.superlink.cli import flower_superlink

    install_superlink_guard(os.environ[PINNED_FAB], json.loads(os.environ[PINNED_RUN_CONFIG]),
                            Path(os.environ[ADMITTED_KEYS]))
    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())
