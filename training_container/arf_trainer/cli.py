"""`arf-trainer`: the container entrypoint. parse -> validate -> run one step -> write result.

    arf-trainer prepare | train | register | evaluate     (configured by the ARF_* environment)
    arf-trainer custom-setup                              (before a template's own train command)
    arf-trainer datahub seed [--hub PATH] [...]           (demo data for the embedded data hub)
    arf-trainer datahub ingest | tables | describe ...     (users' data; see datahub.hub_cli)
    arf-trainer datahub compact | vacuum | restore ...    (table maintenance; datahub.maintenance)
    arf-trainer datahub correct --hub PATH [...]          (expert corrections of failed episodes)
    arf-trainer fleet --model URI --hub PATH [...]        (field rollouts: failures into the hub)

Exit codes: 0 done, 1 runtime failure, 2 bad input, 75 preempted by SIGTERM (train: rerun to
resume from its checkpoint), 99 nothing to do (the task is skipped); see arf_trainer.errors and
arf_trainer.preemption.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from arf_trainer.datahub import hub_cli
from arf_trainer.errors import NothingToDo, Preempted, TrainerError

if TYPE_CHECKING:
    from arf_trainer.spec import StepEnv

STEPS = ("choose", "prepare", "train", "register", "evaluate", "federate")


def _run_step(step: str) -> None:
    if step == "train":
        # Installed before torch is imported: a SIGTERM from here on is a preemption request
        # (exit 75, with a checkpoint once training has started), not an instant death.
        from arf_trainer.preemption import sigterm_guard

        with sigterm_guard():
            _dispatch(step)
    else:
        _dispatch(step)


def claim_run_dir(env: "StepEnv") -> None:
    """The run's folder made this DagRun's (on Kubernetes only the step sees it; the local
    backend has claimed it already): arf_trainer.dag_run_dir."""
    from pathlib import Path

    from arf_trainer.dag_run_dir import DIR_ENV, claim

    folder = os.environ.get(DIR_ENV)
    if folder:
        run = env.spec.run
        claim(Path(folder), run.run_after, dag_id=run.dag_id, run_id=run.run_id)


def _dispatch(step: str) -> None:
    fresh = "pyarrow" not in sys.modules  # this process is the step's own, not a caller's
    if step == "prepare" and fresh:
        # Arrow's default allocator (mimalloc) keeps freed pages and reserves address space up
        # front; under a memory ceiling the system allocator returned ~110 MiB of peak RSS on a
        # sorted 1.5 M-row scan (and RLIMIT_DATA counts what mimalloc reserves). Read by Arrow
        # at its first allocation, so it is set before pyarrow is imported.
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    from arf_trainer.spec import StepEnv, write_json_atomic

    env = StepEnv.from_environ()
    claim_run_dir(env)
    if step == "prepare" and fresh:  # process-wide: never resized under an in-process caller
        _arrow_threads(env)
    if env.spec.step != step:
        from arf_trainer.errors import SpecError

        raise SpecError(f"command is 'arf-trainer {step}' but the job spec is for step {env.spec.step!r}")
    if step == "choose":  # the nightly recipe (a template with a nightly: section)
        from arf_trainer.nightly.step import run_choose as run
    elif step == "prepare":
        from arf_trainer.datahub.prepare import run_prepare as run
    elif step == "train":
        from arf_trainer.trainer.run import run_train as run
    elif step == "federate":  # runs in the federation venv (Flower), see arf_trainer.federated
        from arf_trainer.federated.step import run_federate as run
    elif step == "register" and env.spec.training.get("command"):
        from arf_trainer.custom import register_custom as run
    elif step == "register":
        from arf_trainer.publisher import run_register as run
    else:
        from arf_trainer.evaluator import run_evaluate as run
    result = run(env)
    # Only one process writes the result: under torchrun that is global rank 0.
    if result is not None:
        write_json_atomic(env.result_path, result)


def _aware_time(text: str):
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time; write e.g. "
                                         "2026-11-26T01:00:00+00:00") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add one, e.g. "
                                         f"{text}+00:00")
    return when


def _seed_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        first, last = int(start), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:STOP; write e.g. "
                                         "200000:200100 (STOP excluded)") from None
    if not 0 <= first < last:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < STOP")
    return first, last


def _arrow_threads(env: StepEnv) -> None:
    """Arrow's CPU and I/O pools sized to the step's CPU request, as DuckDB's threads are
    (arf_trainer.datahub.dataset_query.cpu_threads): its dataset scan reads ahead per thread."""
    from arf_trainer.datahub.dataset_query import cpu_threads

    threads = cpu_threads(env)
    if threads is not None:
        import pyarrow as pa

        pa.set_cpu_count(threads)
        pa.set_io_thread_count(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arf-trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for step in STEPS:
        sub.add_parser(step, help=f"run the {step} step described by the ARF_* environment")
    hub = sub.add_parser("datahub", help="embedded data hub utilities")
    hub_sub = hub.add_subparsers(dest="hub_command", required=True)
    hub_cli.add_parsers(hub_sub)  # ingest | tables | describe | compact | vacuum | restore | ...
    seed = hub_sub.add_parser("seed", help="create the demo tables (reach demonstrations, digits)")
    seed.add_argument("--hub", required=True, help="data hub root directory")
    seed.add_argument("--episodes", type=int, default=200, help="expert reach episodes to record")
    seed.add_argument("--seed", type=int, default=0, help="RNG seed of the demonstrations")
    seed.add_argument("--force", action="store_true", help="append a new version even if seeded")
    seed.add_argument("--pixels", action="store_true", help="also seed reach_pixels: the same "
                      "episodes as camera frames (slow: a few ms a frame)")
    seed.add_argument("--frame-size", type=int, default=64,
                      help="reach_pixels frame width and height in pixels (default 64)")
    seed.add_argument("--collected-at", type=_aware_time, default=None,
                      help="collected_at to record, ISO 8601 with a zone; default: the fixed "
                      "2026-01-01T00:00:00+00:00, so that seeding is a function of --seed and "
                      "--episodes (the same rows, the same dataset fingerprint, on any machine)")
    correct = hub_sub.add_parser(
        "correct", help="relabel failed evaluation episodes with the scripted expert (DAgger) "
        "into the corrections table, as the teleoperation module uploads corrections")
    correct.add_argument("--hub", required=True, help="data hub root directory")
    correct.add_argument("--collected-at", type=_aware_time, default=None,
                         help="upload time to record, ISO 8601 with a zone "
                         "(e.g. 2026-11-26T01:00:00+00:00); default: now")
    correct.add_argument("--model", help="only this model's failures (default: all)")
    correct.add_argument("--limit", type=int, help="at most this many episodes, oldest first")
    correct.add_argument("--seeds", type=_seed_range, help="only episodes with START <= seed < "
                         "STOP, e.g. 200000:200100 (keep the evaluation seeds out of training)")
    correct.add_argument("--states", choices=("failed", "all"), default="failed",
                         help="failed: the failed episodes' states; all: every state of every "
                         "field episode, successful ones too (DAgger; table field_episodes)")
    fleet = sub.add_parser(
        "fleet", help="roll a registered model out on field seeds, as deployed robots would, "
        "and record the failed episodes in the data hub's failures table")
    fleet.add_argument("--model", required=True,
                       help="registry URI, e.g. models:/reach_bc_policy@champion")
    fleet.add_argument("--hub", required=True, help="data hub root directory")
    fleet.add_argument("--first-seed", type=int, required=True,
                       help="seed of the first episode; keep clear of the evaluation seeds")
    fleet.add_argument("--episodes", type=int, default=100, help="episodes to roll out")
    fleet.add_argument("--recorded-at", type=_aware_time, default=None,
                       help="time to record, ISO 8601 with a zone; default: now")
    fleet.add_argument("--label", default="manual", help="recorded as eval_run_id fleet:LABEL")
    fleet.add_argument("--tracking-uri", help="MLflow tracking URI (default: ARF_TRACKING_URI)")
    sub.add_parser("custom-setup", help="before a template's own training command: its MLflow "
                   "run, base model and environment file (arf_trainer.custom_setup)")
    lineage = sub.add_parser("lineage", help="print what a training run recorded (JSON)")
    lineage.add_argument("run_id", help="MLflow run id of a training run")
    lineage.add_argument("--tracking-uri", help="MLflow tracking URI (default: ARF_TRACKING_URI)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        if args.command in STEPS:
            _run_step(args.command)
        elif args.command == "custom-setup":
            from arf_trainer.custom_setup import run_custom_setup
            from arf_trainer.spec import StepEnv

            env = StepEnv.from_environ()
            claim_run_dir(env)
            run_custom_setup(env)
        elif args.command == "lineage":
            import json
            import os

            from arf_trainer.errors import SpecError
            from arf_trainer.lineage import read_lineage

            uri = args.tracking_uri or os.environ.get("ARF_TRACKING_URI")
            if not uri:
                raise SpecError("no tracking URI: pass --tracking-uri or set ARF_TRACKING_URI")
            print(json.dumps(read_lineage(uri, args.run_id), indent=2, sort_keys=True))
        elif args.command == "fleet":
            import datetime as dt
            import json
            import os

            from arf_trainer.errors import SpecError
            from arf_trainer.fleet import run_fleet
            from arf_trainer.spec import uri_to_path

            uri = args.tracking_uri or os.environ.get("ARF_TRACKING_URI")
            if not uri:
                raise SpecError("no tracking URI: pass --tracking-uri or set ARF_TRACKING_URI")
            summary = run_fleet(tracking_uri=uri, model_uri=args.model,
                                hub=uri_to_path(args.hub), first_seed=args.first_seed,
                                episodes=args.episodes, label=args.label,
                                recorded_at=args.recorded_at or dt.datetime.now(dt.UTC))
            print(json.dumps(summary, indent=2, sort_keys=True))
        elif args.hub_command in hub_cli.COMMANDS:
            return hub_cli.run(args)
        elif args.hub_command == "correct":
            import datetime as dt
            import json

            from arf_trainer.datahub.failures import correct_failures
            from arf_trainer.spec import uri_to_path

            summary = correct_failures(uri_to_path(args.hub),
                                       collected_at=args.collected_at or dt.datetime.now(dt.UTC),
                                       model_name=args.model, limit=args.limit, seeds=args.seeds,
                                       states=args.states)
            print(json.dumps(summary, indent=2, sort_keys=True))
        else:
            from arf_trainer.datahub.seed import seed_demo
            from arf_trainer.spec import uri_to_path

            summary = seed_demo(uri_to_path(args.hub), episodes=args.episodes, seed=args.seed,
                                force=args.force, pixels=args.pixels,
                                frame_size=args.frame_size, collected_at=args.collected_at)
            import json

            print(json.dumps(summary, indent=2, sort_keys=True))
    except NothingToDo as exc:
        # The last line of the output: the local backend shows it as the skip reason.
        print(f"arf-trainer {args.command}: skipped: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code  # SKIP_EXIT
    except Preempted as exc:
        print(f"arf-trainer {args.command}: preempted: {exc}", file=sys.stderr, flush=True)
        _record_rank_exit(exc.exit_code)
        return exc.exit_code  # PREEMPTED_EXIT
    except TrainerError as exc:
        from arf_trainer.tracking import hide_secrets

        print(f"arf-trainer {args.command}: error: {hide_secrets(str(exc))}", file=sys.stderr,
              flush=True)
        if args.command == "train":
            _record_rank_exit(exc.exit_code)  # torchrun turns a bad-input 2 into 1
        if args.command == "train" and _is_rank_of_a_group():
            _exit_failed_worker(exc.exit_code)
        return exc.exit_code
    except Exception:
        if args.command == "train" and _is_rank_of_a_group():
            import traceback

            traceback.print_exc()
            _exit_failed_worker(1)
        raise
    return 0


def _is_rank_of_a_group() -> bool:
    """True in a process that torchrun (or a PyTorchJob) started as one of several ranks."""
    import os

    return int(os.environ.get("WORLD_SIZE") or 1) > 1


def _record_rank_exit(code: int) -> None:
    """Write this rank's exit code to `$ARF_EXIT_DIR/rank-$RANK` (the train step sets it).

    torchrun exits 1 once it was SIGTERMed, or when a worker failed, whatever its workers
    exited: the backends read the ranks' own codes to tell "every rank preempted, resume me"
    (75) and "bad input, do not retry" (2) from a failure, as they do for a template's own
    command (arf_training.custom_launch writes the same files)."""
    import os

    folder = os.environ.get("ARF_EXIT_DIR")
    if not folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        rank = os.environ.get("RANK") or "0"
        tmp = os.path.join(folder, f".rank-{rank}.tmp")  # not matched by rank-*
        with open(tmp, "w") as f:
            f.write(f"{code}\n")
        os.replace(tmp, os.path.join(folder, f"rank-{rank}"))
    except OSError as exc:  # the exit code still tells a single process's backend
        print(f"arf-trainer: could not record exit code {code} in {folder}: {exc}",
              file=sys.stderr, flush=True)


def _exit_failed_worker(code: int) -> NoReturn:
    """End a failed rank of a multi-process job at once, without interpreter shutdown.

    Why: freeing the DDP Reducer (when the exception's frames are released, or at shutdown)
    runs ProcessGroupGloo's destructor, which joins gloo's worker threads while holding the
    GIL; a worker thread destroying an in-flight AsyncWork needs the GIL, so both wait
    forever (seen with py-spy). The peers then sit in their collective until gloo's timeout
    and torchrun never learns of the failure. `os._exit` closes the sockets now: the peers'
    collectives fail, torchrun sees a failed worker and stops the job. What is worth keeping
    (checkpoints, the MLflow run's FAILED status, the error line) is written by then.
    """
    import os

    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
