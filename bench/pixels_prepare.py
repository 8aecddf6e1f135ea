"""Camera frames through prepare: PNG bytes (what the `reach_pixels` seed writes) against the
same frames as `UTINYINT[H][W][3]` arrays (what it wrote before), paired in one run.

Seeds `reach_pixels` into a scratch hub (`arf-trainer datahub seed --pixels`; reused with
--hub), writes the same frames decoded into an array column as table `reach_pixels_arrays`,
then runs `arf-trainer prepare` with reach_pixels_bc's dataset section over each (the array
side without `dataset.decode`), order alternating by round. Printed per run: seconds, peak RSS
of the step process (ru_maxrss) and the fingerprint, which must be equal on both sides (PNG is
lossless and prepare writes the decoded column).

    .venv/bin/python bench/pixels_prepare.py [--episodes 200] [--frame-size 64] [--rounds 2]
                                             [--hub DIR] [--memory 8Gi]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from datahub_prepare import run_measured  # bench/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _arrays_table(hub: Path, size: int) -> None:
    """`reach_pixels` with its PNG frames decoded into a uint8 array column."""
    from arf_trainer.datahub.decode import ImageDecoder
    from arf_trainer.datahub.tables import list_tables, open_table, write_table

    if "reach_pixels_arrays" in list_tables(hub):
        return
    table = open_table(hub, "reach_pixels").dataset.to_table()
    frames = ImageDecoder("image", "png", (size, size, 3)).decode(
        table["image"].combine_chunks(), lambda i: f"row {i}")
    write_table(hub, "reach_pixels_arrays",
                table.set_column(table.schema.get_field_index("image"), "image", frames))


def _spec(side: str, size: int, memory: str) -> dict[str, Any]:
    import yaml

    template = yaml.safe_load((REPO / "config_templates" / "reach_pixels_bc.yaml").read_text())
    dataset = template["dataset"]
    if side == "arrays":
        dataset["query"] = dataset["query"].replace("reach_pixels", "reach_pixels_arrays")
        dataset.pop("decode")
    else:
        dataset["decode"]["image"]["shape"] = [size, size, 3]
    template["training"]["resources"]["memory"] = memory
    return {"spec_version": 1, "step": "prepare", "template": template,
            "template_sha256": "0" * 64, "conf": {}, "hyperparameters": {}, "seed": 0,
            "run": {"dag_id": "arf_reach_pixels_bc", "run_id": f"bench__{side}",
                    "task_id": "prepare", "try_number": 1}}


def _prepare(hub: Path, work: Path, side: str, size: int, memory: str) -> dict[str, Any]:
    workspace = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
    env = {**os.environ, "ARF_JOB_SPEC_JSON": json.dumps(_spec(side, size, memory)),
           "ARF_WORKSPACE": str(workspace), "ARF_DATAHUB_URI": str(hub),
           "ARF_TRACKING_URI": f"sqlite:///{workspace}/unused.db",
           "ARF_DAG_ID": "arf_reach_pixels_bc", "ARF_RUN_ID": f"bench__{side}"}
    result = run_measured([str(BIN / "arf-trainer"), "prepare"], env)
    manifest = json.loads((workspace / "prepare" / "manifest.json").read_text())
    return {"side": side, "s": round(result["s"], 1),
            "peak_rss_mib": round(result["peak_rss_mib"]), "rows": manifest["rows"],
            "fingerprint": manifest["fingerprint"][:12], "load": result["load"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--frame-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", default="8Gi", help="resources.memory (reach_pixels_bc's)")
    parser.add_argument("--hub", type=Path, help="a hub to seed or reuse (default: scratch)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="arf-pixels-prepare-"))
    hub = args.hub or work / "hub"
    started = time.perf_counter()
    subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub", str(hub), "--pixels",
                    "--episodes", str(args.episodes), "--frame-size", str(args.frame_size)],
                   check=True, capture_output=True, env={**os.environ, "MUJOCO_GL": "egl"})
    _arrays_table(hub, args.frame_size)
    print(f"hub {hub} ready in {time.perf_counter() - started:.0f} s; {os.cpu_count()} cores",
          flush=True)
    runs = []
    for round_ in range(args.rounds):
        order = ("png", "arrays") if round_ % 2 == 0 else ("arrays", "png")
        result = {side: _prepare(hub, work, side, args.frame_size, args.memory)
                  for side in order}
        for side in order:
            print("  " + json.dumps({"round": round_, **result[side]}), flush=True)
        runs.append(result)
    same = all(r["png"]["fingerprint"] == r["arrays"]["fingerprint"] for r in runs)
    time_ratio = [round(r["arrays"]["s"] / r["png"]["s"], 2) for r in runs]
    rss_ratio = [round(r["png"]["peak_rss_mib"] / r["arrays"]["peak_rss_mib"], 2) for r in runs]
    speed, memory = statistics.median(time_ratio), statistics.median(rss_ratio)
    print(f"\n{runs[0]['png']['rows']} frames of {args.frame_size}x{args.frame_size}, "
          f"resources.memory {args.memory}: PNG prepare is {speed:.2f}x as fast as arrays "
          f"(rounds {time_ratio}), peak RSS PNG/arrays {memory:.2f} (rounds {rss_ratio}); "
          f"same fingerprint: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
