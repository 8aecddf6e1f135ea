"""What does `dataset.decode.<c>.downscale` buy and cost a pixel policy? bc_pixels on the reach
task from frames rendered at --size, trained on them as they are and stored k times smaller,
each evaluated by rendering the camera's full --size frames (the downscaled models make them
smaller themselves, as when served).

    python bench/pixels_downscale.py HUB [--factors 1 2 4] [--epochs 20] [--episodes 200]

HUB is a data hub seeded with `arf-trainer datahub seed --hub HUB --pixels --frame-size 128`.
Every side trains the recipe's model the trainer's way (pixels_bc.py's loop: standardized
core, AdamW, seeded shuffles, one thread) on the same successful demonstrations (episodes <
--episodes; every 10th held out), with the template's hyperparameters, and is rolled out on
reach_pixels_bc's 50 evaluation seeds. Printed: one table of success rate (95 % Wilson
interval), mean final distance, stored frame bytes, training time and validation loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pixel_fit import fit_net  # noqa: E402
from pixels_bc import EVAL_SEEDS, PIXEL_FEATURES, TARGETS, _rollouts, _split  # noqa: E402

from arf_trainer.datahub.tables import open_table  # noqa: E402
from arf_trainer.downscale import block_mean  # noqa: E402
from arf_trainer.stats import wilson_interval  # noqa: E402
from arf_trainer.trainer.data import feature_matrix  # noqa: E402
from arf_trainer.trainer.recipes import Hyperparameters, mean_std  # noqa: E402
from arf_trainer.trainer.recipes_vision import PixelBehaviourCloning  # noqa: E402


def fit(hub: Path, size: int, factor: int, hp: Hyperparameters, episodes: int,
        seed: int = 0) -> dict:
    recipe = PixelBehaviourCloning()
    train, val, demos = _split(hub, "reach_pixels", PIXEL_FEATURES + TARGETS, episodes)
    for split in (train, val):
        split["image"] = block_mean(split["image"], factor)
    stored = size // factor
    shapes = {"image": [stored, stored, 3], **{n: [] for n in PIXEL_FEATURES[1:] + TARGETS}}
    info = recipe.describe_shapes(PIXEL_FEATURES, TARGETS, hp, shapes, {"image": factor})
    torch.manual_seed(seed)  # the model's initial weights
    model = recipe.build_model(info)
    x, y = recipe.columns_to_tensors(info, train, "training")
    recipe.set_normalization(model, mean_std(feature_matrix(train, PIXEL_FEATURES)),
                             mean_std(y.numpy()))
    x, y = recipe.training_tensors(model, x, y)
    x_val, y_val = recipe.columns_to_tensors(info, val, "validation")
    seconds = fit_net(recipe, model, x, y, hp, lambda epoch, s: print(
        f"  downscale {factor}: epoch {epoch} {s:.0f} s", flush=True), seed)
    with torch.no_grad():
        val_loss = recipe.loss(model, model(x_val), y_val).item()

    @torch.no_grad()
    def act(frame: np.ndarray, state: np.ndarray) -> np.ndarray:  # the camera's full frame
        return model(torch.from_numpy(frame[None].copy()),
                     torch.from_numpy(state[None].astype(np.float32)))[0].numpy()

    wins, distance = _rollouts(act, True, size)
    return {"factor": factor, "stored": stored, "frames": len(y), "demos": demos,
            "bytes": int(train["image"].nbytes), "seconds": seconds, "val_loss": val_loss,
            "wins": wins, "distance": distance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hub", type=Path)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = open_table(args.hub, "reach_pixels").dataset.head(1)["frame_size"][0].as_py()
    # reach_pixels_bc's template defaults but the epochs
    hp = Hyperparameters(epochs=args.epochs, batch_size=64, lr=1e-3, hidden_size=256,
                         num_layers=2)
    rows = [fit(args.hub, size, k, hp, args.episodes) for k in args.factors]
    print(f"\nframes rendered at {size}x{size}; {args.epochs} epochs; {len(EVAL_SEEDS)} "
          "evaluation seeds, rendered at the camera's size; one thread\n"
          "| downscale | trained on | success (95 % CI) | mean final distance | training "
          "frames (demos) | stored frame bytes | training time | val loss |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = wilson_interval(r["wins"], len(EVAL_SEEDS))
        print(f"| {r['factor']} | {r['stored']}x{r['stored']} | "
              f"{r['wins'] / len(EVAL_SEEDS):.0%} ({low:.0%}-{high:.0%}) | "
              f"{r['distance'] * 1000:.1f} mm | {r['frames']} ({r['demos']}) | "
              f"{r['bytes'] / 1e6:.1f} MB | {r['seconds']:.0f} s | {r['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
