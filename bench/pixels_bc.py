"""How well does bc_pixels learn the reach task from frames, next to the state MLP on the same
demonstrations? A measurement outside the DAG: the recipes' own models, data path pieces and
rollouts, without Airflow, MLflow or DDP.

    python bench/pixels_bc.py HUB [--epochs 30] [--batch-size 64] [--lr 1e-3]
                              [--hidden-size 256] [--num-layers 2] [--episodes 200]
                              [--state-epochs 30] [--no-state]

HUB is a data hub seeded with `arf-trainer datahub seed --hub HUB --pixels`. Both policies
train on the successful demonstrations of episodes < --episodes (every 10th episode held out
for the validation loss, as an episode split would): bc_pixels on `reach_pixels` (frame + joint
state, no target), the state MLP (`bc`, reach_bc's default hyperparameters) on `reach_demos`
(the same episodes' 10-float observation, target included). Each is rolled out on the
evaluation seeds of reach_pixels_bc (100000-100049) and the bench prints one table: success
rate with its 95 % Wilson interval, mean final distance, demonstrations, training frames and
training time. The figure that counts for a registered model is `arf_evaluate`'s (`arf demo
--template reach_pixels_bc`); this is the cheap way to try settings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from arf_trainer.datahub.decode import ImageDecoder
from arf_trainer.datahub.tables import open_table
from arf_trainer.sim import reach, reach_pixels
from arf_trainer.stats import wilson_interval
from arf_trainer.trainer.data import feature_matrix, read_table_columns, target_matrix
from arf_trainer.trainer.recipes import BehaviourCloning, Hyperparameters, mean_std
from arf_trainer.trainer.recipes_vision import PixelBehaviourCloning

PIXEL_FEATURES = ["image", *reach_pixels.STATE_COLUMNS]
STATE_FEATURES = [f"obs_{j}" for j in range(reach.OBS_DIM)]
TARGETS = ["act_0", "act_1"]
EVAL_SEEDS = range(100_000, 100_050)


def _split(hub: Path, table_name: str, columns: list[str], episodes: int):
    table = open_table(hub, table_name).dataset.to_table()
    table = table.filter(pc.and_(table["success"], pc.less(table["episode"], episodes)))
    if "image" in columns:  # PNG bytes, decoded as prepare does for reach_pixels_bc
        size = table["frame_size"][0].as_py()
        decoder = ImageDecoder("image", "png", (size, size, 3))
        frames = decoder.decode(table["image"].combine_chunks(), lambda i: f"row {i}")
        table = table.set_column(table.schema.get_field_index("image"), "image", frames)
    data = read_table_columns(table, columns + ["episode"], table_name)
    held_out = data["episode"] % 10 == 0
    demos = len(np.unique(data["episode"]))
    return ({k: v[~held_out] for k, v in data.items()},
            {k: v[held_out] for k, v in data.items()}, demos)


def _fit(recipe, hp: Hyperparameters, features: list[str], hub: Path, table: str,
         episodes: int, shapes: dict | None, label: str) -> dict:
    """Train `recipe`'s model as the trainer does (standardized core, AdamW, seeded shuffles)."""
    torch.manual_seed(0)
    train, val, demos = _split(hub, table, features + TARGETS, episodes)
    if shapes is None:
        info = recipe.describe(features, TARGETS, hp, target_matrix(train, TARGETS))
    else:
        info = recipe.describe_shapes(features, TARGETS, hp, shapes)
    model = recipe.build_model(info)
    x, y = recipe.columns_to_tensors(info, train, "training")
    recipe.set_normalization(model, mean_std(feature_matrix(train, features)),
                             mean_std(y.numpy()))
    x, y = recipe.training_tensors(model, x, y)
    x_val, y_val = recipe.columns_to_tensors(info, val, "validation")
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    n = len(y)
    print(f"{label}: {n} training frames of {demos} demonstrations, {len(y_val)} held out",
          flush=True)
    started = time.perf_counter()
    take = (lambda b: {k: v[b] for k, v in x.items()}) if isinstance(x, dict) else x.__getitem__
    for epoch in range(hp.epochs):
        model.net.train()
        order, total = torch.randperm(n), 0.0
        for i in range(0, n, hp.batch_size):
            batch = order[i:i + hp.batch_size]
            loss = recipe.training_loss(model.net(take(batch)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            val_loss = recipe.loss(model, model(x_val), y_val).item()
        print(f"  epoch {epoch + 1} train_loss {total / n:.4f} val_loss {val_loss:.4f} "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return {"model": model, "train_s": time.perf_counter() - started, "frames": n,
            "demos": demos, "val_loss": val_loss}


def _rollouts(act, pixels: bool, size: int) -> tuple[int, float]:
    env = reach.make_env()
    if pixels:
        renderer = reach_pixels.FrameRenderer(size)
        act = reach_pixels.seen_by(act, renderer)
    done = [reach.rollout(act, s, env=env) for s in EVAL_SEEDS]
    return sum(r.success for r in done), float(np.mean([r.final_distance for r in done]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hub", type=Path)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--state-epochs", type=int, default=30)
    parser.add_argument("--no-state", action="store_true", help="skip the state MLP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []

    hp = Hyperparameters(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         hidden_size=args.hidden_size, num_layers=args.num_layers)
    size = open_table(args.hub, "reach_pixels").dataset.head(1)["frame_size"][0].as_py()
    shapes = {"image": [size, size, 3], **{n: [] for n in PIXEL_FEATURES[1:] + TARGETS}}
    fit = _fit(PixelBehaviourCloning(), hp, PIXEL_FEATURES, args.hub, "reach_pixels",
               args.episodes, shapes, f"bc_pixels ({size}x{size})")
    model = fit["model"]

    @torch.no_grad()
    def act_pixels(frame: np.ndarray, state: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(frame[None].copy()),
                     torch.from_numpy(state[None].astype(np.float32)))[0].numpy()

    rows.append((f"bc_pixels, {size}x{size} frame + joint state", fit,
                 *_rollouts(act_pixels, True, size), args.epochs))

    if not args.no_state:
        # reach_bc's template defaults (config_templates/reach_bc.yaml)
        hp_state = Hyperparameters(epochs=args.state_epochs, batch_size=256, lr=3e-3,
                                   hidden_size=256, num_layers=3)
        state_fit = _fit(BehaviourCloning(), hp_state, STATE_FEATURES, args.hub, "reach_demos",
                         args.episodes, None, "bc (state MLP)")
        mlp = state_fit["model"]

        @torch.no_grad()
        def act_state(obs: np.ndarray) -> np.ndarray:
            return mlp(torch.from_numpy(obs[None].astype(np.float32)))[0].numpy()

        rows.append(("bc, 10-float state (target included)", state_fit,
                     *_rollouts(act_state, False, size), args.state_epochs))

    print(f"\n{len(EVAL_SEEDS)} evaluation seeds, one thread\n"
          "| policy | success (95 % CI) | mean final distance | demonstrations | training frames "
          "| epochs | training time | val loss |\n|---|---|---|---|---|---|---|---|")
    for label, fit, wins, dist, epochs in rows:
        low, high = wilson_interval(wins, len(EVAL_SEEDS))
        print(f"| {label} | {wins / len(EVAL_SEEDS):.0%} ({low:.0%}-{high:.0%}) | "
              f"{dist * 1000:.1f} mm | {fit['demos']} | {fit['frames']} | {epochs} | "
              f"{fit['train_s']:.0f} s | {fit['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
