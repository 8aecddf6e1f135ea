"""How a template's own training command is started, the same way by every backend.

A custom command runs in its own image, which need not contain arf-trainer; it only needs
`/bin/sh`. Before it, `arf-trainer custom-setup` (the default image: a process locally, an
init container on Kubernetes) creates or finds the DAG run's MLflow run, pins the base model and
writes an environment file (`arf_trainer.custom_setup`). Each process of the command (each rank
under torchrun / a PyTorchJob) is then started by `wrap(command)`, a POSIX shell prologue that:

1. sources that file: MLflow's standard variables for global rank 0 only (the others get
   ARF_LOG_TO_MLFLOW=false), the base model for every rank;
2. runs the command as a child and passes SIGTERM on to it (in a pod only PID 1 receives the
   kubelet's SIGTERM; torchrun signals its workers, which are these shells), so the command gets
   its ARF_PREEMPTION_GRACE_S to checkpoint;
3. records the command's exit code in `$ARF_EXIT_DIR/rank-$RANK`, because torchrun reports a
   worker's exit 75 ("preempted, resume me") as its own exit 1. A command that the SIGTERM it
   was passed killed outright (143: no handler yet, e.g. still importing) counts as 75 too:
   whatever it checkpointed before is all there is, and a restart resumes from it.
"""

from __future__ import annotations

import signal
from pathlib import Path

PREEMPTED_EXIT = 75
"""A step's exit code for "preempted, rerun me to resume" (the container side's
arf_trainer.errors.PREEMPTED_EXIT; this side must not import it)."""

BAD_INPUT_EXIT = 2  # arf_training.errors.BAD_INPUT_EXIT, the container side's SpecError code
SETUP_COMMAND = ("arf-trainer", "custom-setup")
ENV_FILE = "custom_env.sh"  # arf_trainer.custom_setup.ENV_FILE
EXIT_DIR = "exits"

# $0 is the name shown in `ps`; "$@" the command. The trap is set before the child exists
# (a SIGTERM in between is remembered and passed on once the child runs).
PROLOGUE = r"""
if [ -n "$ARF_CUSTOM_ENV" ] && [ -f "$ARF_CUSTOM_ENV" ]; then . "$ARF_CUSTOM_ENV"; fi
child=
term=
trap 'term=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM
"$@" &
child=$!
[ -n "$term" ] && kill -TERM "$child" 2>/dev/null
wait "$child"; code=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done
if [ -n "$term" ] && [ "$code" = 143 ]; then code=75; fi
if [ -n "$ARF_EXIT_DIR" ]; then
  mkdir -p "$ARF_EXIT_DIR" && echo "$code" > "$ARF_EXIT_DIR/rank-${RANK:-0}"
fi
exit "$code"
""".strip()

# A PyTorchJob replica's PID 1 around torchrun (built-in recipes and custom commands: arf-trainer
# records its rank's code itself, in the same files). torchrun exits 1 when its
# workers exit 75, and the Training Operator's `restartPolicy: ExitCode` treats 1-127 as
# permanent. Every rank of this pod records its code in a folder of the pod's own; when all of
# them asked to be resumed, the pod exits 143 (as if SIGTERMed), which the operator restarts:
# a preemption costs a pod restart, not the job and not an Airflow retry. A rank's exit 2 (bad
# input), which torchrun also turns into 1, is the pod's exit 2: the task fails without
# retries. No "$(" anywhere:
# Kubernetes expands $(VAR) in a container's command (HOSTNAME is the pod's name).
POD_PROLOGUE = r"""
export ARF_EXIT_DIR="$ARF_EXIT_DIR/pod-${HOSTNAME:-local}"
rm -rf "$ARF_EXIT_DIR"
child=
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM
"$@" &
child=$!
wait "$child"; code=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done
if [ "$code" -ne 0 ] && [ -d "$ARF_EXIT_DIR" ]; then
  n=0; resume=0
  for f in "$ARF_EXIT_DIR"/rank-*; do
    [ -f "$f" ] || continue; n=`expr $n + 1`
    [ "`cat "$f"`" = 75 ] && resume=`expr $resume + 1`
  done
  if [ "$n" -eq "$ARF_PROCS_PER_POD" ] && [ "$resume" -eq "$n" ]; then
    echo "every rank of this pod exited 75 (preempted): exiting 143 so the replica restarts" >&2
    exit 143
  fi
  for f in "$ARF_EXIT_DIR"/rank-*; do
    if [ -f "$f" ] && [ "`cat "$f"`" = 2 ]; then
      echo "a rank of this pod exited 2 (bad input): exiting 2, a retry would fail the same" >&2
      exit 2
    fi
  done
fi
exit "$code"
""".strip()
RESTARTABLE_EXIT = 143


def pod_wrap(command: list[str]) -> list[str]:
    """A PyTorchJob replica's command around torchrun (see POD_PROLOGUE)."""
    return ["/bin/sh", "-c", POD_PROLOGUE, "arf-custom-pod", *command]


def wrap(command: list[str]) -> list[str]:
    """The process command of one rank of a custom command (see the module docstring)."""
    return ["/bin/sh", "-c", PROLOGUE, "arf-custom-command", *command]


def env_for(train_dir: Path) -> dict[str, str]:
    """The step variables that point the wrapper at its files in the training's folder."""
    return {"ARF_CUSTOM_ENV": str(train_dir / ENV_FILE),
            "ARF_EXIT_DIR": str(train_dir / EXIT_DIR)}


def exit_dir(env: dict[str, str], workspace: Path, step: str) -> Path:
    """Where the ranks of a local step record their exit codes."""
    return Path(env.get("ARF_EXIT_DIR") or workspace / step / EXIT_DIR)


def rank_exit_codes(exit_dir: Path) -> dict[str, int]:
    """rank -> exit code the wrapper recorded in this start (clear the folder before it)."""
    codes = {}
    for path in sorted(exit_dir.glob("rank-*")) if exit_dir.is_dir() else []:
        try:
            codes[path.name[len("rank-"):]] = int(path.read_text().strip())
        except ValueError:
            continue  # being written as the step was stopped
    return codes


def clear_exit_codes(exit_dir: Path) -> None:
    for path in exit_dir.glob("rank-*") if exit_dir.is_dir() else []:
        path.unlink(missing_ok=True)


def bad_input(exit_dir: Path) -> bool:
    """Whether a rank recorded exit 2 (bad input: a retry would fail the same way), which
    torchrun reports as its own exit 1."""
    return BAD_INPUT_EXIT in rank_exit_codes(exit_dir).values()


def was_preempted(codes: list[int], rank_codes: dict[str, int], world_size: int) -> bool:
    """Whether a start that ended with process `codes` asks to be resumed: every process exited
    75 or died of a SIGTERM the runner did not send (the caller checks that), or (under
    torchrun, which turns it into 1) every rank's command exited 75."""
    # -15: a process without a handler at that moment (e.g. the built-in trainer after its
    # guard closed, while writing its result) died of the SIGTERM; rerunning resumes it too.
    if codes and all(c in (PREEMPTED_EXIT, -signal.SIGTERM) for c in codes):
        return True
    return len(rank_codes) == world_size and all(
        c == PREEMPTED_EXIT for c in rank_codes.values())
