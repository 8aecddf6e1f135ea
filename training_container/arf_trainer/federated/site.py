"""One site's local training: the ClientApp's work, in plain torch (no Flower imports).

A site reads only its own prepared shards (the SuperNode's `data-dir`). What leaves the site
is, once, its normalization statistics (row count, means and sums of squared deviations of the
input values the model standardizes: every flattened feature for the MLP recipes, the state for
bc_pixels, whose model scales its frames by a constant), then each round the weights after
training, the number of training rows and two losses: never rows.

The model's shape comes from manifest metadata alone (column names, per-row shapes), as the
federate step sees no rows: array columns count with their flattened width, as central
training's loaders count them.

Determinism: the shuffle and initial state of each local fit are seeded from (template seed,
round, site index), and torch runs single-threaded on CPU, so one site's update is a function
of the weights it received. The server aggregates in site order (apps.py), so the global
weights are bitwise the same on a re-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arf_trainer.errors import TrainingError
from arf_trainer.trainer.data import (Inputs, Manifest, chunks, load_manifest, read_split,
                                      rows_of, take)
from arf_trainer.trainer.recipes import (Hyperparameters, ModelInfo, Recipe, Stats, get_recipe,
                                         stats_of)


@dataclass
class SiteData:
    """A site's splits as the recipe's tensors (inputs raw, a dict of tensors for bc_pixels;
    the model normalizes)."""

    x_train: Inputs
    y_train: torch.Tensor
    x_val: Inputs | None
    y_val: torch.Tensor | None
    manifest: Manifest

    @property
    def train_rows(self) -> int:
        return int(self.y_train.shape[0])


def load_site(data_dir: Path, info: ModelInfo, recipe: Recipe) -> SiteData:
    """The site's prepared splits (sha256-checked shards under `data_dir`)."""
    manifest = load_manifest(Path(data_dir))
    if manifest.features != info.features or manifest.targets != info.targets:
        raise TrainingError(
            f"site data at {data_dir} has features {manifest.features} and targets "
            f"{manifest.targets}, but the federation's model uses {info.features} -> "
            f"{info.targets}; every site's query must return the same columns")
    names = info.features + info.targets
    x, y = recipe.columns_to_tensors(info, read_split(manifest, "train", names), "train")
    _check_widths(info, recipe, x, y, data_dir)
    x_val = y_val = None
    if manifest.rows("val"):
        x_val, y_val = recipe.columns_to_tensors(info, read_split(manifest, "val", names), "val")
    return SiteData(x, y, x_val, y_val, manifest)


def _check_widths(info: ModelInfo, recipe: Recipe, x: Inputs, y: torch.Tensor,
                  data_dir: Path) -> None:
    """The site's rows fit the model the federate step described from metadata (a manifest
    that predates per-row shapes counts every column as a scalar: see column_shapes)."""
    width = int(recipe.normalized_inputs(x).shape[1])
    expected = info.input_width if info.input_width is not None else len(info.features)
    outputs = int(y.shape[1]) if y.is_floating_point() and y.ndim == 2 else info.n_outputs
    if (width, outputs) != (expected, info.n_outputs):
        raise TrainingError(
            f"site data at {data_dir} gives {width} input and {outputs} target values a row, "
            f"but the federation's model takes {expected} and {info.n_outputs} (from the "
            "sites' manifest metadata); rerun every site's prepare with this arf-trainer, so "
            "that its manifest records each column's shape")


def column_shapes(manifest: Manifest) -> dict[str, list[int]]:
    """The per-row shape of each feature and target column, from the manifest's "columns" (a
    scalar is []). Prepare records one for every feature and target; a manifest written before
    it did has none, and its columns count as scalars (what they were then)."""
    recorded = {c.get("name"): c.get("shape") for c in manifest.raw.get("columns", [])}
    return {name: [int(n) for n in recorded.get(name) or []]
            for name in manifest.features + manifest.targets}


def model_info(manifest: Manifest, recipe_name: str, hp: Hyperparameters) -> ModelInfo:
    """The federation's model shape, from the manifest's column names and per-row shapes (a
    manifest holds no rows): what `recipe.describe_data` gives central training, with the
    flattened widths the loaders would count."""
    recipe = get_recipe(recipe_name)
    if recipe.target_labels:
        raise TrainingError(
            f"training.recipe={recipe_name!r} cannot federate: its model's classes are the "
            "distinct training labels, which the federate step would have to read from the "
            "sites' rows; use recipe 'bc' or 'bc_pixels', or train centrally")
    shapes = column_shapes(manifest)

    def width(names: list[str]) -> int:
        return sum(int(np.prod(shapes[n])) for n in names)

    # What the loaders' `labels` are for a regression recipe: no values, the targets' width.
    labels = np.zeros((0, width(manifest.targets)), dtype=np.float32)
    return recipe.describe_data(manifest, hp, labels, width(manifest.features))


def _seed(seed: int, server_round: int, site_index: int) -> int:
    return (seed * 1_000_003 + server_round * 10_007 + site_index) % (2**31)


def fit(info: ModelInfo, weights: dict[str, torch.Tensor], data: SiteData, hp: Hyperparameters,
        *, epochs: int, seed: int, server_round: int, site_index: int,
        proximal_mu: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the received weights for `epochs` on this site; (new weights, metrics).

    The received weights already hold the federation's pooled normalization (`pooled_stats`
    before round 1); only `model.net` trains, so every site standardizes alike.
    """
    torch.manual_seed(_seed(seed, server_round, site_index))
    recipe = get_recipe(info.recipe)
    model = recipe.build_model(info)
    model.load_state_dict(weights)
    global_params = [p.detach().clone() for p in model.net.parameters()]
    x_in, y_in = recipe.training_tensors(model, data.x_train, data.y_train)
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    generator = torch.Generator().manual_seed(_seed(seed, server_round, site_index))
    model.train()
    losses = []
    step = 0
    for _epoch in range(epochs):
        order = torch.randperm(data.train_rows, generator=generator)
        for start in range(0, data.train_rows, hp.batch_size):
            index = order[start:start + hp.batch_size]
            x = recipe.augment(take(x_in, index), hp, (seed, server_round, site_index, step))
            step += 1
            loss = recipe.training_loss(model.net(x), y_in[index])
            if proximal_mu > 0:  # FedProx: stay near the round's global weights
                loss = loss + proximal_mu / 2 * sum(
                    (p - g).pow(2).sum() for p, g in zip(model.net.parameters(), global_params))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan")}
    metrics.update(evaluate(model, recipe, data))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


MIN_SHARED_ROWS = 3  # fewer rows: a column's mean and m2 give its values back


def statistics(data: SiteData, recipe: Recipe | None = None) -> dict[str, torch.Tensor]:
    """This site's sufficient statistics for the normalization, in float64: its training row
    count and, per standardized input value (`recipe.normalized_inputs`; every flattened
    feature without a recipe) and float target value, the mean and the sum of squared
    deviations from it. Aggregates over the whole split: from MIN_SHARED_ROWS rows on, no row
    can be read back from them (one row is its own mean; two are mean +- sqrt(m2 / 2)), so a
    smaller site refuses to share them, and counts as a failed site."""
    if 0 < data.train_rows < MIN_SHARED_ROWS:
        raise TrainingError(
            f"this site has {data.train_rows} training row(s): its statistics would be its rows "
            f"themselves, so it shares none (it needs at least {MIN_SHARED_ROWS}); prepare "
            "more rows at this site, or leave it out of federated.sites")
    out = {"count": torch.tensor([data.train_rows], dtype=torch.float64)}
    columns = {"x": recipe.normalized_inputs(data.x_train) if recipe else data.x_train}
    if data.y_train.is_floating_point():  # a classifier's labels are not standardized
        columns["y"] = data.y_train
    for key, values in columns.items():
        as64 = values.flatten(start_dim=1).to(torch.float64)
        mean = as64.sum(dim=0) / max(1, len(as64))  # a site with no rows adds nothing
        out[f"{key}_mean"], out[f"{key}_m2"] = mean, (as64 - mean).pow(2).sum(dim=0)
    return out


def pooled_stats(sites: list[dict[str, torch.Tensor]]) -> tuple[Stats, Stats | None]:
    """(input, target) mean/std of the union of the sites' training rows, from their
    `statistics` (Chan et al.'s pairwise combination): the statistics central training computes
    on the pooled data, to float64 rounding (`Recipe.set_inputs_normalization` stores them).
    Averaging the sites' own standard deviations instead would leave out the variance between
    sites, which a non-IID split makes large."""
    count = sum(float(s["count"][0]) for s in sites)
    if count == 0:
        raise TrainingError("no site has training rows: check the sites' prepare results")

    def combine(key: str) -> Stats | None:
        if f"{key}_mean" not in sites[0]:
            return None
        mean = sum(s[f"{key}_mean"] * float(s["count"][0]) for s in sites) / count
        m2 = sum(s[f"{key}_m2"] + float(s["count"][0]) * (s[f"{key}_mean"] - mean).pow(2)
                 for s in sites)
        return stats_of(mean.numpy(), (m2 / count).sqrt().numpy())

    return combine("x"), combine("y")


def update_problem(update: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                   num_examples: float, train_rows: int) -> str | None:
    """Why the server must not aggregate a site's reply to a round, or None if it may.

    The reply must hold the arrays the round sent (names, shapes, dtypes), finite, and weigh
    by the training rows the site's own manifest reported: FedAvg weights each update by its
    claimed row count, so a site claiming more rows than it prepared would dominate the
    global model, and one NaN would poison it for every site.
    """
    if list(update) != list(sent):
        return (f"its arrays are {sorted(update)[:6]}, the round sent {sorted(sent)[:6]}")
    for name, value in update.items():
        want = sent[name]
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            return (f"its array {name!r} is {value.dtype} {list(value.shape)}, the round "
                    f"sent {want.dtype} {list(want.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"its array {name!r} holds NaN or infinite values"
    if num_examples != train_rows:
        return (f"it weighs its update by {num_examples:g} training rows, its manifest "
                f"reports {train_rows}")
    return None


VAL_EXAMPLES = "val-examples"


@torch.no_grad()
def evaluate(model: Any, recipe: Recipe, data: SiteData) -> dict[str, float]:
    """The validation loss of `model` on this site's val split and its row count. Every site
    reports both keys (Flower refuses replies whose metric keys differ): a site whose episode
    split left no validation rows reports 0 rows, and the step weights val_loss by rows."""
    if data.x_val is None or data.y_val is None:
        return {"val_loss": 0.0, VAL_EXAMPLES: 0}
    model.eval()
    # In chunks, as central training's evaluation: a split of frames at once would hold
    # every frame's feature maps.
    loss_sum, rows = 0.0, 0
    for x, y in chunks(data.x_val, data.y_val):
        loss_sum += float(recipe.loss(model, model(x), y)) * len(y)
        rows += rows_of(x)
    return {"val_loss": loss_sum / rows, VAL_EXAMPLES: rows}
