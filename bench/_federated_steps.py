"""The steps bench/federated.py drives, each the DAG's own code path through LocalStepRunner:
a site's prepare (`federation.site_spec`), the federate step (`federation.federate_spec`: the
federation venv's `arf-trainer federate`, a Flower SuperLink + one SuperNode per site on
loopback), and a plain prepare + train of the built-in `bc` recipe (central and single-site).

A model is scored from its step's output folder (``<workspace>/train/``, the layout register
reads): `publisher.load_trained_model` rebuilds it (weights sha256-checked), and the rollouts
and summary are `arf_trainer.evaluator`'s (`rollouts`, `summarize`: the seeds and figures
`arf_evaluate` uses). Only the MLflow registration is skipped: `arf_evaluate` loads the pt2
export of the same state_dict, which computes the same function.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "config_templates" / "reach_bc_federated.yaml"
DAG_ID = "bench_federated"


def quiet_log(name: str) -> logging.Logger:
    """A logger for the step's relayed lines that keeps them out of the bench's table."""
    log = logging.getLogger(f"bench.federated.{name}")
    log.propagate, log.level = False, logging.INFO
    log.handlers[:] = [logging.NullHandler()]
    return log


def load_template(rounds: int | None, local_epochs: int | None, federated: bool) -> Any:
    """reach_bc_federated, with the bench's rounds/local epochs; without its `federated:`
    section (`federated=False`) it is a plain `bc` template with the same hyperparameters."""
    import yaml

    from arf_training.templates import LoadedTemplate, TrainingTemplate

    data = yaml.safe_load(TEMPLATE.read_text())
    section = data["federated"]
    if rounds is not None:
        section["rounds"] = rounds
    if local_epochs is not None:
        section["local_epochs"] = local_epochs
    epochs = section["rounds"] * section["local_epochs"]
    hps = data["training"]["hyperparameters"]
    hps["epochs"]["maximum"] = max(hps["epochs"]["maximum"], epochs)
    if not federated:
        del data["federated"]
    return LoadedTemplate(TrainingTemplate.model_validate(data), TEMPLATE, "bench")


def _spec(loaded: Any, step: str, run: str, conf: dict[str, Any], settings: Any) -> Any:
    from arf_training.stepspec import RunIdentity, build_step_spec

    return build_step_spec(loaded, step, RunIdentity(DAG_ID, run, step), conf, settings)


def _run(spec: Any, what: str) -> tuple[dict[str, Any], float]:
    """(the step's result, its wall seconds) through the local backend's runner."""
    from arf_training.backends.local import LocalStepRunner

    started = time.monotonic()
    result = LocalStepRunner(quiet_log(what)).run(spec)
    return result, time.monotonic() - started


def seed_site_hubs(loaded: Any, settings: Any, episodes: int) -> dict[str, Path]:
    """Seed each template site's hub (non-IID: by target sector); {site: hub path}."""
    from arf_trainer.datahub.seed_sites import seed_sites
    from arf_training.federation import site_hub

    hubs = {s.name: Path(site_hub(settings, s.hub)) for s in loaded.template.federated.sites}
    summary = seed_sites(hubs, episodes=episodes, force=True)
    for name, record in summary.items():
        print(f"site {name}: {record['episodes']} demonstration episodes, {record['rows']} rows "
              f"in {hubs[name]}", flush=True)
    return hubs


def pool_hubs(hubs: dict[str, Path], target: Path) -> Path:
    """The central baseline's hub: the union of the sites' `reach_demos` tables."""
    import pyarrow as pa

    from arf_trainer.datahub.seed import REACH_TABLE
    from arf_trainer.datahub.tables import open_table, write_table

    tables = [open_table(hub, REACH_TABLE).dataset.to_table() for hub in hubs.values()]
    target.mkdir(parents=True, exist_ok=True)
    write_table(target, REACH_TABLE, pa.concat_tables(tables), mode="overwrite")
    return target


def prepare_sites(loaded: Any, settings: Any, run: str) -> dict[str, Path]:
    """The DAG's mapped prepare: one per site, each against its own hub; {site: prepared dir}."""
    from arf_training.federation import site_spec

    prepared = {}
    for site in loaded.template.federated.sites:
        base = _spec(loaded, "prepare", run, {}, settings)
        spec = site_spec(base, loaded.template, site.name, settings)
        _run(spec, f"prepare.{site.name}")
        prepared[site.name] = spec.workspace / "prepare"
    return prepared


def federate(loaded: Any, settings: Any, run: str) -> dict[str, Any]:
    """The federate step of run `run` (its sites prepared); the step's result and wall time."""
    from arf_training.federation import federate_spec

    spec = federate_spec(_spec(loaded, "federate", run, {}, settings), loaded.template,
                         local=True)
    result, wall = _run(spec, "federate")
    return {"result": result, "wall_s": wall, "workspace": spec.workspace}


def prepare_pooled(loaded: Any, settings: Any, run: str, hub: Path) -> Path:
    """The plain prepare step of run `run` against `hub`; the prepared folder."""
    pooled = dataclasses.replace(settings, datahub_uri=str(hub))
    spec = _spec(loaded, "prepare", run, {}, pooled)
    _run(spec, f"prepare.{run}")
    return spec.workspace / "prepare"


def train(loaded: Any, settings: Any, run: str, epochs: int, prepared: Path) -> dict[str, Any]:
    """The train step (built-in recipe) of run `run` for `epochs` on the `prepared` folder."""
    spec = _spec(loaded, "train", run, {"epochs": epochs}, settings)
    if prepared.resolve() != (spec.workspace / "prepare").resolve():
        shutil.copytree(prepared, spec.workspace / "prepare", dirs_exist_ok=True)
    result, wall = _run(spec, f"train.{run}")
    return {"result": result, "wall_s": wall, "workspace": spec.workspace}


def load_model(workspace: Path) -> Any:
    """The trained module from a train/federate step's output folder (what register reads)."""
    from arf_trainer.publisher import load_trained_model

    model, _info, _result = load_trained_model(workspace)
    return model


def success(model: Any, episodes: int, seed: int) -> dict[str, float]:
    """The evaluator's rollouts and figures (success rate with its Wilson interval)."""
    from arf_trainer.evaluator import rollouts, summarize

    @torch.inference_mode()
    def policy(obs: np.ndarray) -> np.ndarray:
        row = torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(1, -1))
        return model(row)[0].numpy().astype(np.float32)

    done = rollouts(policy, episodes, seed)
    return summarize([{"seed": s, "final_distance": r.final_distance, "success": r.success}
                      for s, r in done])


def held_out(prepared: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled validation split of every site (features, actions as float32): one held-out
    set for every model."""
    from arf_trainer.trainer.data import feature_matrix, load_manifest, read_split

    xs, ys = [], []
    for folder in prepared.values():
        manifest = load_manifest(folder)
        if not manifest.rows("val"):
            continue
        columns = read_split(manifest, "val", manifest.features + manifest.targets)
        xs.append(torch.from_numpy(feature_matrix(columns, manifest.features)))
        ys.append(torch.from_numpy(feature_matrix(columns, manifest.targets)))
    if not xs:
        raise SystemExit("no site has validation episodes: raise --episodes")
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def val_loss(model: Any, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> float:
    """MSE of the actions in units of `scale` (one scale for every model, so losses compare;
    the bc recipe's own val loss divides by each model's own action std)."""
    model.eval()
    return float(torch.nn.functional.mse_loss(model(x) / scale, y / scale))
