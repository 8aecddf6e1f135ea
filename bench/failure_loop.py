"""The failure-learning loop, measured (issue 6): weak champion -> N nights of field failures,
expert corrections, nightly fine-tunes and the promotion gate, all through the real DAGs and
commands; then a from-scratch retrain on all the data for the compute comparison.

    .venv/bin/python bench/failure_loop.py [--nights 4] [--demos 50] [--field-episodes 150] [--seed 0]
                                           [--finetune-conf '{"epochs": 5}'] [--home DIR]

Same as `arf demo failure-loop`. Prints a table per night (success rate with its 95 % interval
on the evaluation seeds, the gate's decision, optimizer steps and wall time), the from-scratch
reference, the ratios and which goals hold; writes failure-loop.json and failure-loop.png in
the loop's home and logs them to MLflow there (experiment `arf-failure-loop`). Exit 0 when
every goal holds, 1 otherwise (the figures are printed either way).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from arf_training.failure_loop import LoopConfig, run_failure_loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--demos", type=int, default=50)
    parser.add_argument("--field-episodes", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the demonstrations and the field episodes (0-99)")
    parser.add_argument("--finetune-conf", default="{}", help="nightly trigger conf (JSON)")
    parser.add_argument("--home", type=Path, help="a new folder for the loop (default: "
                        "$ARF_HOME/failure-loop/<time>)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    config = LoopConfig(nights=args.nights, demos=args.demos,
                        field_episodes=args.field_episodes, seed=args.seed,
                        finetune_conf=json.loads(args.finetune_conf))
    summary = run_failure_loop(config, home=args.home, verbose=args.verbose)
    return 0 if all(summary["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
