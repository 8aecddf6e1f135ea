"""Federation beyond scalar columns: array feature/target columns (MLP recipe `bc`) and camera
frames (`bc_pixels`), with the model's shape from manifest metadata alone.

Two sites' hubs are really seeded and prepared (DuckDB sandbox, Delta tables; frames rendered by
the reach camera at 8x8, stored as PNG, decoded by prepare). The site functions run against
those folders in this venv, without Flower; tests/integration/test_federated_shapes_e2e.py runs
the same sites through a real federation.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_federated_manifests import _env
from test_prepare import load_template

from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.prepare_result import SITE_METADATA_KEY
from arf_trainer.errors import TrainingError
from arf_trainer.federated.launch import site_dirs
from arf_trainer.federated.manifests import plan, site_manifest
from arf_trainer.federated.site import fit, load_site, model_info, pooled_stats, statistics
from arf_trainer.trainer.data import feature_matrix, load_manifest, read_split
from arf_trainer.trainer.loaders import MemorySource
from arf_trainer.trainer.recipes import Hyperparameters, ModelInfo, get_recipe, mean_std

SITES = ("north", "south")
SEED = 5
HP = {"epochs": 1, "batch_size": 32, "lr": 0.003, "hidden_size": 32, "num_layers": 2}
OBS = ", ".join(f"obs_{i}" for i in range(10))
# Each kind: the template the sites' prepare runs, and how it differs from the shipped one.
KINDS: dict[str, dict[str, Any]] = {
    # One FLOAT[10] feature column and one FLOAT[2] target column: widths 10 -> 2, not 1 -> 1.
    "arrays": {"template": "reach_bc", "dataset": {
        "query": f"SELECT episode, step, [{OBS}]::FLOAT[10] AS obs, "
                 "[act_0, act_1]::FLOAT[2] AS act FROM reach_demos WHERE success",
        "features": ["obs"], "targets": ["act"], "validation_split": 0.3}},
    # uint8 [8, 8, 3] frames (16x16 renders stored at half the size) + six state columns ->
    # two actions.
    "pixels": {"template": "reach_pixels_bc", "dataset": {
        "decode": {"image": {"format": "png", "shape": [16, 16, 3], "downscale": 2}},
        "validation_split": 0.3}},
}


def _template(kind: str) -> dict[str, Any]:
    template = load_template(KINDS[kind]["template"])
    template["dataset"].update(copy.deepcopy(KINDS[kind]["dataset"]))
    template["federated"] = {
        "sites": [{"name": s, "hub": f"sites/{s}/datahub", "query": None} for s in SITES],
        "rounds": 2, "strategy": "fedavg", "fraction_fit": 1.0, "min_sites": 2,
        "local_epochs": 1, "proximal_mu": None}
    return template


def _seed(kind: str, hub: Path, index: int) -> None:
    if kind == "arrays":
        from arf_trainer.datahub.seed import seed_demo

        seed_demo(hub, episodes=10, seed=index, force=False)
    else:
        from arf_trainer.datahub.seed_pixels import seed_pixels

        seed_pixels(hub, episodes=4 + 2 * index, seed=index, force=False, frame_size=16)


@pytest.fixture(scope="module", params=list(KINDS))
def sites(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Any]:
    """A run workspace whose two sites were prepared as a federated DAG prepares them: each in
    `<run>/sites/<site>/` from its own hub (different episodes and sizes: non-IID)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"federated-{kind}")
    results = {}
    for index, site in enumerate(SITES):
        hub = root / f"hub-{site}"
        _seed(kind, hub, index)
        template = _template(kind)
        template["federated"]["sites"] = [s for s in template["federated"]["sites"]
                                          if s["name"] == site]
        env = _env(root / "run" / "sites" / site, "prepare", template, {"site": site}, hub)
        results[site] = run_prepare(env)
    return {"kind": kind, "root": root, "workspace": root / "run", "results": results}


def _federate_env(sites: dict[str, Any], workspace: Path, from_metadata: bool,
                  south: dict[str, Any] | None = None):
    """The federate step's env and sites: each site's reported metadata (Kubernetes; `south`
    replaces south's) or its folder (local)."""
    metadata = {s: r[SITE_METADATA_KEY] for s, r in sites["results"].items()}
    metadata["south"] = south or metadata["south"]
    given = [{"name": s, "manifest": metadata[s]} if from_metadata else
             {"name": s, "data_dir": str(sites["workspace"] / "sites" / s / "prepare")}
             for s in SITES]
    env = _env(workspace, "federate", _template(sites["kind"]), {"sites": given},
               sites["root"] / "hub-north")
    return env, site_dirs(env)


def _folders(sites: dict[str, Any]) -> list[Path]:
    return [sites["workspace"] / "sites" / s / "prepare" for s in SITES]


def test_the_model_shape_from_metadata_is_central_trainings(sites, tmp_path):
    """The federate step (metadata only, no rows) describes the model central training
    describes from the rows (`describe_data` with the loader's flattened feature width)."""
    env, given = _federate_env(sites, tmp_path / "superlink", from_metadata=True)
    plan_, info = plan(env, given)
    assert not (tmp_path / "superlink").exists()  # it read no site's folder
    files_env, files = _federate_env(sites, sites["workspace"], from_metadata=False)
    assert plan(files_env, files)[0] == plan_

    manifest = load_manifest(_folders(sites)[0])
    source = MemorySource.read(manifest)
    recipe = get_recipe(info.recipe)
    hp = Hyperparameters.parse(info.recipe, env.spec.hyperparameters)
    assert info == recipe.describe_data(manifest, hp, source.labels, source.feature_width)
    assert ModelInfo.from_json(plan_["model_info"]) == info
    if sites["kind"] == "arrays":
        assert (info.features, info.n_features, info.n_outputs) == (["obs"], 10, 2)
    else:
        assert (info.recipe, info.arrays["image"], info.input_width) == ("bc_pixels",
                                                                         [8, 8, 3], 6)
        assert info.downscale == {"image": 2}  # served at the sites' camera size
        # A site that stored its frames from another camera size is refused too.
        other = copy.deepcopy(sites["results"]["south"][SITE_METADATA_KEY])
        other["decode"]["image"] = {"format": "png", "shape": [32, 32, 3], "downscale": 4}
        env, given = _federate_env(sites, tmp_path / "superlink", True, south=other)
        with pytest.raises(TrainingError, match=r"decode their frames differently \(image: "
                                                r"\{'format': 'png', 'shape': \[16, 16, 3\], "
                                                r"'downscale': 2\} vs"):
            plan(env, given)
    # the first site's shapes define the model: another frame or vector size is refused
    metadata = copy.deepcopy(sites["results"]["south"][SITE_METADATA_KEY])
    for column in metadata["columns"]:
        column["shape"] = [2 * n for n in column["shape"]]
    env, given = _federate_env(sites, tmp_path / "superlink", True, south=metadata)
    with pytest.raises(TrainingError, match="'north' and 'south' prepared columns of different "
                                            "per-row shapes"):
        plan(env, given)


def _recipe(sites: dict[str, Any]) -> str:
    return "bc" if sites["kind"] == "arrays" else "bc_pixels"


def _sites_data(sites: dict[str, Any]):
    """(model_info from north's metadata, the recipe, each site's loaded data)."""
    metadata = sites["results"]["north"][SITE_METADATA_KEY]
    name = _recipe(sites)
    info = model_info(site_manifest({"name": "north", "manifest": metadata}), name,
                      Hyperparameters.parse(name, HP))
    recipe = get_recipe(info.recipe)
    return info, recipe, [load_site(folder, info, recipe) for folder in _folders(sites)]


def test_pooled_normalization_is_central_trainings(sites):
    """The sites' statistics pool to the statistics central training stores in the model, per
    flattened element of the array columns; for bc_pixels only the state's (the model scales
    frames by a constant), so no per-pixel statistics leave a site."""
    info, recipe, data = _sites_data(sites)
    stats = [statistics(d, recipe) for d in data]
    width = 10 if sites["kind"] == "arrays" else 6
    assert all(s["x_mean"].shape == (width,) and s["y_mean"].shape == (2,) for s in stats)
    federated = recipe.build_model(info)
    recipe.set_inputs_normalization(federated, *pooled_stats(stats))

    # Central: the union of both sites' training rows, through the in-memory loader's path.
    names = info.features + info.targets
    splits = [read_split(load_manifest(f), "train", names) for f in _folders(sites)]
    union = {n: np.concatenate([s[n] for s in splits]) for n in names}
    central = recipe.build_model(info)
    _, targets = recipe.columns_to_tensors(info, union, "training")
    recipe.set_normalization(central, mean_std(feature_matrix(union, info.features)),
                             mean_std(targets.numpy()))
    buffers = dict(central.named_buffers())
    assert buffers.keys() == dict(federated.named_buffers()).keys()
    for name, value in federated.named_buffers():
        torch.testing.assert_close(value, buffers[name], rtol=1e-6, atol=1e-6, msg=name)
    assert float(buffers[next(iter(buffers))].abs().sum()) > 0  # not the identity


def _in_process(info: ModelInfo, recipe: Any, data: list, rounds: int = 2,
                **extra: Any):
    """The ServerApp's sequence without Flower: pooled normalization, then per round every
    site's `fit` from the global weights and their sample-weighted mean in site order."""
    torch.manual_seed(SEED)
    model = recipe.build_model(info)
    recipe.set_inputs_normalization(model, *pooled_stats([statistics(d, recipe) for d in data]))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hp = Hyperparameters.parse(info.recipe, {**HP, **extra})
    rows = sum(d.train_rows for d in data)
    metrics = []
    for server_round in range(1, rounds + 1):
        updates = [fit(info, weights, d, hp, epochs=1, seed=SEED, server_round=server_round,
                       site_index=i) for i, d in enumerate(data)]
        weights = {k: sum(u[k] * (d.train_rows / rows) for (u, _), d in zip(updates, data))
                   for k in weights}
        metrics.append([m for _, m in updates])
    return weights, metrics


def test_site_updates_are_deterministic(sites):
    """Two federations in one process give bitwise-equal global weights; the sites trained
    (the core moved) on rows of the described shape and report finite losses."""
    info, recipe, data = _sites_data(sites)
    first, metrics = _in_process(info, recipe, data)
    again, _ = _in_process(info, recipe, data)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    torch.manual_seed(SEED)
    initial = recipe.build_model(info).state_dict()
    assert any(not torch.equal(first[k], initial[k]) for k in first if k.startswith("net."))
    for site in metrics[-1]:
        assert np.isfinite(site["train_loss"]) and np.isfinite(site["val_loss"])
    assert sum(site["val-examples"] for site in metrics[-1]) > 0  # evaluated on val rows


def test_sites_shift_their_frames_reproducibly(sites):
    """bc_pixels' random_shift on a site: drawn per (seed, round, site, step), so a second
    federation gives the same bits, and the shifts change what the sites learn."""
    if sites["kind"] == "arrays":
        pytest.skip("random_shift is bc_pixels' only")
    info, recipe, data = _sites_data(sites)
    shifted, _ = _in_process(info, recipe, data, random_shift=1)
    again, _ = _in_process(info, recipe, data, random_shift=1)
    plain, _ = _in_process(info, recipe, data)
    assert all(torch.equal(shifted[k], again[k]) for k in shifted)
    assert any(not torch.equal(shifted[k], plain[k]) for k in shifted)


def test_a_site_whose_rows_do_not_fit_the_described_model_says_so(sites, tmp_path):
    """A manifest without per-row shapes (written before prepare recorded them) describes
    array columns as scalars; the site then refuses to train a model of the wrong width."""
    folder = tmp_path / "prepare"
    shutil.copytree(_folders(sites)[0], folder)
    raw = json.loads((folder / "manifest.json").read_text())
    for column in raw["columns"]:
        column.pop("shape")
    (folder / "manifest.json").write_text(json.dumps(raw))
    hp = Hyperparameters.parse("bc", HP)
    info = model_info(load_manifest(folder), "bc", hp)
    if sites["kind"] == "pixels":  # the vision recipe needs the shapes, and says so
        with pytest.raises(TrainingError, match="records no fixed shape"):
            model_info(load_manifest(folder), "bc_pixels", hp)
        return
    assert info.n_features == 1
    with pytest.raises(TrainingError, match=r"gives 10 input and 2 target values a row, but "
                                            r"the federation's model takes 1 and 1"):
        load_site(folder, info, get_recipe("bc"))


def test_a_classifier_cannot_federate(sites):
    manifest = load_manifest(_folders(sites)[0])
    with pytest.raises(TrainingError, match="'classifier' cannot federate"):
        model_info(manifest, "classifier", Hyperparameters.parse("classifier", HP))
