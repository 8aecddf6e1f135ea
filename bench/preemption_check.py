"""Cost of the ranks' preemption agreement: an all_reduce every step vs `dist.StopAgreement`.

One `torchrun --nproc-per-node=2` run (gloo, CPU, OMP_NUM_THREADS=1) trains the digits_smoke
model (the classifier recipe's MLP, AdamW, DDP) on sklearn's digits with the trainer's step:
forward, backward (DDP's gradient all_reduce), optimizer step, `loss.item()`. Blocks of steps
with no agreement, with an all_reduce of the stop flag every step (`dist.any_rank`) and with
the trainer's `dist.StopAgreement` (every ~0.25 s) rotate in the same processes, so that a
neighbour's load hits all sides alike (on a shared machine it swings the absolute rates by
2x within a minute: read the per-round ratios). The small per-rank batch is
the worst case: the cheaper the step, the larger the agreement's share.

    .venv/bin/python bench/preemption_check.py [--batch 32] [--steps 100] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as torch_dist
    from sklearn.datasets import load_digits
    from torch.nn.parallel import DistributedDataParallel as DDP

    from arf_trainer.trainer import dist
    from arf_trainer.trainer.dist import DistEnv
    from arf_trainer.trainer.recipes import Hyperparameters, get_recipe

    denv = DistEnv.from_environ()
    device = dist.init(denv)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    recipe = get_recipe("classifier")
    hp = Hyperparameters.parse("classifier", {"epochs": 1, "batch_size": args.batch, "lr": 0.01,
                                              "hidden_size": 64, "num_layers": 1})
    features = [f"pixel_{i}" for i in range(x.shape[1])]
    info = recipe.describe(features, ["label"], hp, digits.target[:, None])
    y = recipe.encode_targets(info, digits.target[:, None], "training")
    torch.manual_seed(0)
    model = recipe.build_model(info)
    recipe.fit_normalization(model, digits.data.astype("float32"), y)
    ddp = DDP(model, forward_sync_buffers=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr)
    per_rank = hp.per_rank_batch_size(denv.world_size)
    batches = [(x[i:i + per_rank], y[i:i + per_rank])
               for i in range(denv.rank * per_rank, len(x) - per_rank, per_rank * denv.world_size)]

    def block(mode: str) -> float:
        agreement = dist.StopAgreement(denv, device)
        torch_dist.barrier()
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            xb, yb = batches[step % len(batches)]
            loss = recipe.loss(model, ddp(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
            if mode == "every step" and dist.any_rank(denv, False, device):
                raise RuntimeError("unexpected stop")
            if mode == "StopAgreement" and agreement.stop(step, False):
                raise RuntimeError("unexpected stop")
        return args.steps * per_rank * denv.world_size / (time.perf_counter() - start)

    modes = ["none", "every step", "StopAgreement"]
    for mode in modes:
        block(mode)  # warm-up
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in modes[round_ % 3:] + modes[:round_ % 3]:
            rates[mode].append(block(mode))
    n = 2000
    torch_dist.barrier()
    start = time.perf_counter()
    for _ in range(n):
        dist.any_rank(denv, False, device)
    alone_us = (time.perf_counter() - start) / n * 1e6
    if denv.is_main:
        print("RESULT" + json.dumps({"rates": rates, "any_rank_us": alone_us,
                                     "per_rank_batch": per_rank}), flush=True)
    dist.teardown(denv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="global batch (2 ranks)")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=30, help="A/B rounds")
    parser.add_argument("--verbose", action="store_true", help="print every block's rate")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", __file__, "--worker",
         f"--batch={args.batch}", f"--steps={args.steps}", f"--rounds={args.rounds}"],
        env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    result = json.loads(lines[0][len("RESULT"):])
    raw = result["rates"]
    print(f"torchrun x2, gloo, CPU, per-rank batch {result['per_rank_batch']}, "
          f"{args.rounds} rounds x {args.steps} steps per side; medians, and the median of the "
          "per-round ratios to that round's baseline block")
    for mode, values in raw.items():
        ratio = statistics.median(v / b for v, b in zip(values, raw["none"]))
        label = "(baseline)" if mode == "none" else \
            f"ratio {ratio:.3f} ({(1 - ratio) * 100:+.1f}% cost)"
        print(f"agreement: {mode:14s} {statistics.median(values):9,.0f} samples/s  {label}")
    print(f"one any_rank all_reduce alone: {result['any_rank_us']:.0f} us")
    if args.verbose:
        print(json.dumps(result["rates"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
