"""How well does bc_pixels learn the reach task from frames? A quick measurement outside the
DAG: the recipe's own model, data path pieces and rollouts, without Airflow, MLflow or DDP.

    python bench/pixels_bc.py HUB [--epochs 20] [--batch-size 64] [--lr 1e-3]
                              [--hidden-size 256] [--num-layers 2] [--episodes 200]

HUB is a data hub seeded with `arf-trainer datahub seed --hub HUB --pixels`. Trains on the
successful demonstrations of episodes < --episodes (every 10th episode held out for the
validation loss, as an episode split would), then rolls the policy out on the evaluation seeds
of reach_pixels_bc (100000-100049) and prints the success rate with its 95 % Wilson interval,
the mean final distance and the training time. The figure that counts for a registered model
is `arf_evaluate`'s (`arf demo --template reach_pixels_bc`); this is the cheap way to try
settings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from arf_trainer.datahub.tables import open_table
from arf_trainer.sim import reach, reach_pixels
from arf_trainer.stats import wilson_interval
from arf_trainer.trainer.data import feature_matrix, read_table_columns
from arf_trainer.trainer.recipes import Hyperparameters, mean_std
from arf_trainer.trainer.recipes_vision import PixelBehaviourCloning

FEATURES = ["image", *reach_pixels.STATE_COLUMNS]
TARGETS = ["act_0", "act_1"]
EVAL_SEEDS = range(100_000, 100_050)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hub", type=Path)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    table = open_table(args.hub, "reach_pixels").dataset.to_table()
    table = table.filter(pc.and_(table["success"], pc.less(table["episode"], args.episodes)))
    columns = read_table_columns(table, FEATURES + TARGETS + ["episode"], "reach_pixels")
    held_out = columns["episode"] % 10 == 0
    train = {k: v[~held_out] for k, v in columns.items()}
    val = {k: v[held_out] for k, v in columns.items()}
    recipe = PixelBehaviourCloning()
    hp = Hyperparameters(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         hidden_size=args.hidden_size, num_layers=args.num_layers)
    size = columns["image"].shape[1]
    shapes = {"image": [size, size, 3], **{n: [] for n in FEATURES[1:] + TARGETS}}
    info = recipe.describe_shapes(FEATURES, TARGETS, hp, shapes)
    model = recipe.build_model(info)
    x, y = recipe.columns_to_tensors(info, train, "training")
    recipe.set_normalization(model, mean_std(feature_matrix(train, FEATURES)),
                             mean_std(y.numpy()))
    x, y = recipe.training_tensors(model, x, y)
    x_val, y_val = recipe.columns_to_tensors(info, val, "validation")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    n = len(y)
    print(f"{n} training frames ({size}x{size}), {len(y_val)} held out", flush=True)

    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.net.train()
        order, total = torch.randperm(n), 0.0
        for i in range(0, n, args.batch_size):
            batch = order[i:i + args.batch_size]
            loss = recipe.training_loss(model.net({k: v[batch] for k, v in x.items()}), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            val_loss = recipe.loss(model, model(x_val), y_val).item()
        print(f"epoch {epoch + 1} train_loss {total / n:.4f} val_loss {val_loss:.4f} "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    train_s = time.perf_counter() - started

    @torch.no_grad()
    def act(frame: np.ndarray, state: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(frame[None].copy()),
                     torch.from_numpy(state[None].astype(np.float32)))[0].numpy()

    renderer, env = reach_pixels.FrameRenderer(size), reach.make_env()
    done = [reach.rollout(reach_pixels.seen_by(act, renderer), s, env=env) for s in EVAL_SEEDS]
    successes = sum(r.success for r in done)
    low, high = wilson_interval(successes, len(done))
    print(f"success rate {successes}/{len(done)} = {successes / len(done):.2f} "
          f"(95 % CI {low:.2f}-{high:.2f}), mean final distance "
          f"{np.mean([r.final_distance for r in done]):.4f} m, training {train_s:.0f} s on "
          f"{n} frames of {args.episodes} episodes")


if __name__ == "__main__":
    main()
