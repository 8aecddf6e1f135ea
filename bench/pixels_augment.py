"""What does bc_pixels' `random_shift` buy a pixel policy? The reach task from frames rendered
at the hub's size, trained without and with random shifts on the same demonstrations, for a
few and for many demonstrations, each evaluated by rendering reach_pixels_bc's 50 seeds.

    python bench/pixels_augment.py HUB [--shifts 0 4] [--episodes 50 200] [--epochs 30]
                                       [--seeds 3]

HUB is a data hub seeded with `arf-trainer datahub seed --hub HUB --pixels` (64x64 frames).
Every side trains the recipe's model the trainer's way (`_pixel_fit.fit_net`: standardized
core, AdamW, seeded shuffles, the recipe's augmentation keyed as in the trainer, one thread)
on the successful demonstrations among the first --episodes episodes (every 10th held out),
with reach_pixels_bc's hyperparameters, once per training seed (the initial weights, the
shuffles and the shifts); the sides of one seed run back to back. Printed: one table of the
success rate per seed and over all seeds (95 % Wilson interval), mean final distance,
validation loss (on unshifted frames) and each seed's training time over the first shift's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pixels_bc import EVAL_SEEDS  # noqa: E402
from pixels_downscale import fit  # noqa: E402

from arf_trainer.datahub.tables import open_table  # noqa: E402
from arf_trainer.stats import wilson_interval  # noqa: E402
from arf_trainer.trainer.hyperparameters import Hyperparameters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hub", type=Path)
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--episodes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3,
                        help="training seeds per side (initial weights, shuffles, shifts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = open_table(args.hub, "reach_pixels").dataset.head(1)["frame_size"][0].as_py()
    # reach_pixels_bc's template defaults
    base = Hyperparameters(epochs=args.epochs, batch_size=64, lr=1e-3, hidden_size=256,
                           num_layers=2)
    runs = []
    for episodes in args.episodes:
        for seed in range(args.seeds):
            for shift in args.shifts:  # the sides of one seed back to back
                print(f"{episodes} episodes, seed {seed}, random_shift {shift}:", flush=True)
                result = fit(args.hub, size, 1, replace(base, random_shift=shift), episodes,
                             seed)
                runs.append({**result, "episodes": episodes, "shift": shift, "seed": seed})
    n = len(EVAL_SEEDS)
    print(f"\nframes {size}x{size}; {args.epochs} epochs; {n} evaluation seeds per policy; "
          f"{args.seeds} training seeds per side; one thread\n"
          "| demonstrations (frames) | random_shift | success per training seed | success, "
          "all seeds (95 % CI) | mean final distance | val loss (mean) | training time / no "
          "shift (per seed) |\n|---|---|---|---|---|---|---|")
    for episodes in args.episodes:
        for shift in args.shifts:
            side = [r for r in runs if r["episodes"] == episodes and r["shift"] == shift]
            wins = sum(r["wins"] for r in side)
            low, high = wilson_interval(wins, n * len(side))
            ratios = []
            for r in side:
                plain = [p for p in runs if p["episodes"] == episodes and p["seed"] == r["seed"]
                         and p["shift"] == args.shifts[0]]
                ratios.append(r["seconds"] / plain[0]["seconds"])
            per_seed = ", ".join(f"{r['wins'] / n:.0%}" for r in side)
            print(f"| {side[0]['demos']} ({side[0]['frames']:,}) | {shift} | "
                  f"{per_seed} | {wins / (n * len(side)):.0%} "
                  f"({low:.0%}-{high:.0%}) | "
                  f"{np.mean([r['distance'] for r in side]) * 1000:.1f} mm | "
                  f"{np.mean([r['val_loss'] for r in side]):.4f} | "
                  f"{', '.join(f'{q:.2f}x' for q in ratios)} |")
    print(f"(the all-seeds interval pools {args.seeds} policies' rollouts on the same {n} "
          "starts, so it is narrower than independent episodes would make it)")


if __name__ == "__main__":
    main()
