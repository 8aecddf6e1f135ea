"""Operators per training step: `arf-trainer train` vs the bare loop, counted on any device.

On a GPU a model as small as reach_bc's MLP is launch-bound: every aten operator the step
dispatches is a kernel launch (a few microseconds of CPU each), and the CPU's time per step
decides the throughput. Counting the operators each side dispatches per epoch is exact and
device-independent, so this runs on a CPU: a difference here is a difference in launches there.

Each side runs in this process under a TorchDispatchMode that counts every aten operator
(forward, backward, optimizer, data indexing; views included, listed apart): once with 1
epoch and once with 2; the difference is one epoch of the loop (set-up, data loading and the
final write cancel out), divided by the epoch's steps. Both sides validate every epoch.

    .venv/bin/python bench/gpu/op_count.py --inputs .devcheck [--inputs .devcheck/pixels]

(inputs: `bench/harness_overhead.py --save-inputs DIR`.) Prints per-step totals and the
operators whose counts differ between the sides.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "bench" / "gpu"),
                str(REPO / "training_container")]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from _bare_loops import SCRIPTS  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "alias",
         "detach", "as_strided", "unsqueeze", "squeeze", "permute", "reshape", "_reshape_alias",
         "split", "unbind", "view_as", "lift_fresh"}


def bare_ops(inputs: Path, recipe: str, epochs: int, device: str) -> collections.Counter:
    argv = sys.argv
    sys.argv = ["bare", str(inputs / "prepare"), str(epochs), "val", device, "fp32"]
    counter = CountOps()
    try:
        with contextlib.redirect_stdout(io.StringIO()), counter:
            exec(SCRIPTS[recipe], {"__name__": "bare"})
    finally:
        sys.argv = argv
    return counter.counts


def trainer_ops(inputs: Path, epochs: int, root: Path, tag: str,
                deterministic: bool) -> collections.Counter:
    from overhead_probe import trainer

    from arf_trainer.trainer import loop

    counter = CountOps()
    run_epoch, end_epoch = loop.run_epoch, loop.end_epoch

    # Only the epochs (the loop and its validation): set-up and the final write are the
    # same for 1 and 2 epochs anyway, and the model file's hashing would dominate the noise.
    def counted(function):
        def wrapper(*args):
            with counter:
                return function(*args)
        return wrapper

    loop.run_epoch, loop.end_epoch = counted(run_epoch), counted(end_epoch)
    try:
        trainer(inputs, epochs, root, tag, deterministic=deterministic)
    finally:
        loop.run_epoch, loop.end_epoch = run_epoch, end_epoch
    return counter.counts


def per_epoch(one: collections.Counter, two: collections.Counter) -> collections.Counter:
    diff = collections.Counter(two)
    diff.subtract(one)
    return collections.Counter({k: v for k, v in diff.items() if v})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=Path, action="append", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for inputs in args.inputs:
        spec = json.loads((inputs / "train-jobspec.json").read_text())
        recipe = spec["template"]["training"]["recipe"]
        manifest = json.loads((inputs / "prepare" / "manifest.json").read_text())
        rows = sum(s["rows"] for s in manifest["shards"]["train"])
        batch = {"bc": 256, "bc_pixels": 64}[recipe]
        steps = -(-rows // batch)
        root = Path(tempfile.mkdtemp(prefix="arf-opcount-"))
        sides = {
            "bare": per_epoch(bare_ops(inputs, recipe, 1, args.device),
                              bare_ops(inputs, recipe, 2, args.device)),
            "trainer": per_epoch(trainer_ops(inputs, 1, root, "t1", True),
                                 trainer_ops(inputs, 2, root, "t2", True)),
            "trainer-nondet": per_epoch(trainer_ops(inputs, 1, root, "n1", False),
                                        trainer_ops(inputs, 2, root, "n2", False)),
        }
        print(f"\n{recipe}: {rows} training rows, batch {batch}: {steps} steps an epoch "
              f"(+ validation), device {args.device}")
        for name, counts in sides.items():
            total = sum(counts.values())
            views = sum(v for k, v in counts.items() if k in VIEWS)
            print(f"  {name:15} {total / steps:7.1f} operators a step ({(total - views) / steps:6.1f}"
                  f" not views)")
        names = sorted(set().union(*sides.values()))
        print(f"  {'operator':28} {'bare':>8} {'trainer':>8} {'nondet':>8}   (per step)")
        for op in names:
            row = [sides[s].get(op, 0) / steps for s in ("bare", "trainer", "trainer-nondet")]
            if len({round(v, 2) for v in row}) > 1:
                print(f"  {op:28} {row[0]:8.2f} {row[1]:8.2f} {row[2]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
