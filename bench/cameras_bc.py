"""Does bc_pixels learn from each of several cameras, and what does a second camera cost?

    python bench/cameras_bc.py [--rows 4000] [--epochs 15] [--rounds 3] [--size 32]

A task no single camera can solve: a scene camera (size x size) shows a bright dot at (x1, y1),
a wrist camera (3/4 size high) one at (x2, y2), on noise; the action is (x1, y2). Knowing one
camera, the best prediction of the other coordinate is its mean, so a one-camera policy's
validation loss (MSE in standardized action units: 1.0 is predicting the mean) cannot go below
~0.5; a policy that reads both can approach 0. Three bc_pixels models, trained the trainer's
way (recipe's model, standardized core, AdamW, seeded shuffles; one thread), on the same rows:
scene only, wrist only, both. `--rounds` trains them again in turns, for the time ratio of two
cameras to one (this VM's speed drifts, so per round).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pixel_fit import fit_net  # noqa: E402

from arf_trainer.trainer.recipes import Hyperparameters, mean_std  # noqa: E402
from arf_trainer.trainer.recipes_vision import PixelBehaviourCloning  # noqa: E402

TARGETS = ["act_0", "act_1"]
STATE = ["s0", "s1"]


def _frames(rng: np.random.Generator, rows: int, height: int, width: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Noisy dark frames with a 3x3 white dot; (frames, dot positions in [-1, 1] as (x, y))."""
    frames = rng.integers(0, 60, (rows, height, width, 3), dtype=np.uint8)
    ys = rng.integers(1, height - 1, rows)
    xs = rng.integers(1, width - 1, rows)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            frames[np.arange(rows), ys + dy, xs + dx] = 255
    return frames, np.stack([xs / (width - 1) * 2 - 1, ys / (height - 1) * 2 - 1], axis=1)


def make_rows(rows: int, size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scene, at_scene = _frames(rng, rows, size, size)
    wrist, at_wrist = _frames(rng, rows, size * 3 // 4, size)
    state = rng.normal(size=(rows, 2)).astype(np.float32)
    return {"scene": scene, "wrist": wrist, "s0": state[:, 0], "s1": state[:, 1],
            "act_0": at_scene[:, 0].astype(np.float32),
            "act_1": at_wrist[:, 1].astype(np.float32)}


def fit(cameras: list[str], train: dict, val: dict, hp: Hyperparameters) -> dict:
    recipe = PixelBehaviourCloning()
    features = [cameras[0], *STATE, *cameras[1:]]
    shapes = {**{c: list(train[c].shape[1:]) for c in cameras},
              **{n: [] for n in STATE + TARGETS}}
    info = recipe.describe_shapes(features, TARGETS, hp, shapes)
    torch.manual_seed(0)
    model = recipe.build_model(info)
    x, y = recipe.columns_to_tensors(info, train, "training")
    state_stats = mean_std(np.stack([train[n] for n in STATE], axis=1))
    recipe.set_inputs_normalization(model, state_stats, mean_std(y.numpy()))
    x, y = recipe.training_tensors(model, x, y)
    x_val, y_val = recipe.columns_to_tensors(info, val, "validation")
    seconds = fit_net(recipe, model, x, y, hp)
    with torch.no_grad():
        val_loss = recipe.loss(model, model(x_val), y_val).item()
    return {"val_loss": val_loss, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hp = Hyperparameters(epochs=args.epochs, batch_size=64, lr=1e-3, hidden_size=128,
                         num_layers=2)
    train = make_rows(args.rows, args.size, seed=1)
    val = make_rows(args.rows // 4, args.size, seed=2)
    print(f"{args.rows} training rows, {args.rows // 4} validation rows; scene "
          f"{args.size}x{args.size}, wrist {args.size * 3 // 4}x{args.size}; {args.epochs} "
          "epochs, batch 64, one thread", flush=True)
    sides = {"scene only": ["scene"], "wrist only": ["wrist"], "both": ["scene", "wrist"]}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, cameras in sides.items():
            results[name].append(fit(cameras, train, val, hp))
            print(f"round {round_ + 1} {name:10s} val_loss {results[name][-1]['val_loss']:.4f} "
                  f"{results[name][-1]['seconds']:.1f} s", flush=True)
    print("\n| cameras | val loss (1.0 = the mean) | training s (median) |\n|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {runs[0]['val_loss']:.4f} | "
              f"{np.median([r['seconds'] for r in runs]):.1f} |")
    ratios = [both["seconds"] / scene["seconds"]
              for both, scene in zip(results["both"], results["scene only"])]
    print(f"\ntraining time, both / scene only, per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f})")
    same = all(r["val_loss"] == runs[0]["val_loss"] for runs in results.values() for r in runs)
    print(f"val losses identical across rounds (seeded, one thread): {same}")


if __name__ == "__main__":
    main()
