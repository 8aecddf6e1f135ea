"""The embedded default: each step is a local process group (torchrun when world size > 1).

`LocalStepRunner` owns the processes (the "hook"); `LocalStepOperator` and
`LocalEvaluateOperator` are the Airflow operators built on it. A step runs with an explicit
environment (not the Airflow worker's), in its own session so that a timeout or a killed task
stops every process it started, and its output is streamed line by line into the task log.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from arf_training import custom_launch
from arf_training.backends.base import Backend
from arf_training.backends.evaluate_each import evaluate_each
from arf_training.backends.loopback_torchrun import free_port, torchrun_command
from arf_training.backends.memory import Ceiling, step_ceiling
from arf_training.backends.step_tree import DRAIN_S, STEP_UMASK, StepTree, step_folder
from arf_training.errors import BAD_INPUT_EXIT, SKIP_EXIT, StepFailed, StepSkipped, StepTimeout
from arf_training.links import STEP_LINKS
from arf_training.runtime import (
    emit_model_event,
    fail_fast_on_bad_input,
    models_to_evaluate,
    run_identity,
    task_log,
    trigger_conf,
)
from arf_training.settings import ArfSettings, venv_bin
from arf_training.stepspec import StepSpec, build_step_spec

if TYPE_CHECKING:
    from arf_training.templates import LoadedTemplate

# Variables a step may inherit from the worker; everything else it gets is in the StepSpec.
PASSTHROUGH_ENV = ("HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "CUDA_VISIBLE_DEVICES",
                   "MUJOCO_GL", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "OPENBLAS_CORETYPE",
                   "OPENBLAS_L2_SIZE")
# The trainer's fault-injection hooks (arf_trainer/trainer/testhooks.py), by name: only these
# pass, not every ARF_TEST_* variable of the worker.
TEST_HOOKS = ("ARF_TEST_STEP_DELAY_S", "ARF_TEST_CHECKPOINT_DELAY_S", "ARF_TEST_CRASH_AT_STEP",
              "ARF_TEST_CRASH_RANK", "ARF_TEST_CRASH_MODE", "ARF_TEST_CRASH_TRIAL")
TAIL_LINES = 60
# Restarts after "preempted, resume me" (exit 75) within one task try: many on a spot pool that
# is reclaimed often, but bounded so that a command that always exits 75 cannot loop forever.
MAX_PREEMPTIONS = 100
# Beyond the step's own grace period: time for torchrun to pass SIGTERM on and reap workers.
KILL_MARGIN_S = 5.0
# The step's Python logging prefix ("2026-12-03 17:42:12,099 INFO name: ...", MLflow's
# "2026/12/03 17:42:12 INFO ..."). The task log stamps every relayed line itself, so the
# step's own time is dropped and its level kept.
_STEP_LOG_PREFIX = re.compile(r"\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)? "
                              r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def relay_line(line: str) -> tuple[int, str]:
    """(logging level, text) under which one line of step output enters the task log: whole,
    with one timestamp (the task log's) and the step's own level."""
    match = _STEP_LOG_PREFIX.match(line)
    if match is None:
        return logging.INFO, line
    return logging.getLevelName(match["level"]), line[match.end():]


def _threads(spec: StepSpec) -> str:
    try:
        cpu = float(spec.resources.cpu) if not str(spec.resources.cpu).endswith("m") \
            else float(str(spec.resources.cpu)[:-1]) / 1000
    except ValueError:
        cpu = 1.0
    return str(max(1, int(cpu)))


class LocalStepRunner:
    """Runs one StepSpec as local process groups and waits for them."""

    def __init__(self, log: logging.Logger | Any | None = None):
        self.log = log or logging.getLogger(__name__)
        self._procs: list[subprocess.Popen] = []
        self._tree = StepTree([])  # the running start's groups and what left them
        self._grace_s = 30.0
        self._stopped = False  # kill() found processes running: their exit codes are ours
        self.preemptions = 0  # starts that ended with exit 75 and were restarted

    def commands(self, spec: StepSpec) -> list[list[str]]:
        """One command per local "node": plain for a single process, torchrun otherwise."""
        command = list(spec.command)
        if command[0] == "arf-trainer":
            command[0] = venv_bin("arf-trainer")
        if spec.world_size == 1:
            return [command]
        # torchrun whose TCP stores listen on loopback only (backends/loopback_torchrun.py).
        torchrun = [*torchrun_command(), f"--nproc-per-node={spec.procs_per_node}"]
        if spec.nodes == 1:
            return [torchrun + ["--standalone", "--no-python", *command]]
        endpoint = f"127.0.0.1:{free_port()}"
        rdzv = [f"--nnodes={spec.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={abs(hash(str(spec.workspace))) % 10**9}"]
        return [torchrun + rdzv + [f"--node-rank={rank}", "--no-python", *command]
                for rank in range(spec.nodes)]

    def environment(self, spec: StepSpec, job_spec_path: Path) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        # Fault-injection hooks (arf_trainer.trainer.testhooks) reach the steps, so end-to-end
        # tests can fail one step through the real DAG; the trainer warns when one is set.
        env.update({k: os.environ[k] for k in TEST_HOOKS if k in os.environ})
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                       os.environ.get("PATH", "/usr/bin:/bin")])
        env["PYTHONUNBUFFERED"] = "1"
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        env["OMP_NUM_THREADS"] = _threads(spec)
        if spec.nodes > 1:
            # torch 2.13's torchrun shares one rendezvous store across restarts without a
            # per-attempt prefix: a restarted rank may read a dead predecessor's address.
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        env.update(spec.env)
        env["ARF_JOB_SPEC"] = str(job_spec_path)
        return env

    def run(self, spec: StepSpec) -> dict[str, Any]:
        env = self.environment(spec, step_folder(spec))
        commands = self.commands(spec)
        self._grace_s = spec.grace_s
        self.log.info("step %s: world size %d, workspace %s", spec.step, spec.world_size,
                      spec.workspace)
        # Before anything runs: a bad setting or an unusable cgroup fails the step here.
        ceiling = step_ceiling(spec.step, str(spec.resources.memory), spec.procs_per_node,
                               len(commands))
        try:
            codes, tail = self._starts(spec, env, commands, ceiling)
        finally:
            ceiling.close(self.log)  # a cgroup goes, with whatever was left in it
        failed = [(i, c) for i, c in enumerate(codes) if c != 0]
        if failed and all(c == SKIP_EXIT for _, c in failed):
            # The step's last line says why (e.g. no new rows in the data interval).
            reason = next((line for line in reversed(tail) if line.strip()), "")
            raise StepSkipped(f"step {spec.step!r} found nothing to do (exit code {SKIP_EXIT}): "
                              f"{reason}")
        if failed:
            # Under torchrun a rank's exit 2 arrives as 1: the ranks' recorded codes tell.
            bad = custom_launch.bad_input(custom_launch.exit_dir(env, spec.workspace, spec.step))
            what = ", ".join(f"node {i} exit code {c}" for i, c in failed) + (
                f"; a rank exited {BAD_INPUT_EXIT}: bad input" if bad else "")
            note = "" if self._stopped else ceiling.failure_note(codes, tail)
            raise StepFailed(f"step {spec.step!r} failed ({what}). Last lines of its output:\n"
                             + "\n".join(tail) + note,
                             retryable=not bad and any(c != BAD_INPUT_EXIT for _, c in failed))
        if not spec.result_path.exists():
            raise StepFailed(f"step {spec.step!r} exited 0 but wrote no result at "
                             f"{spec.result_path}; a step must write its result JSON last")
        return json.loads(spec.result_path.read_text())

    def _starts(self, spec: StepSpec, env: dict[str, str], commands: list[list[str]],
                ceiling: Ceiling) -> tuple[list[int], collections.deque[str]]:
        """The step's starts until one is not preempted: (exit codes, tail) of the last."""
        exit_dir = custom_launch.exit_dir(env, spec.workspace, spec.step)
        # One time limit for all starts of the step: preemptions do not extend it.
        deadline = time.monotonic() + spec.timeout_s
        for start in range(MAX_PREEMPTIONS + 1):
            if spec.setup_command:
                self._setup(spec, env, ceiling, deadline)
            custom_launch.clear_exit_codes(exit_dir)
            codes, tail = self._start(spec, env, commands, deadline, ceiling)
            rank_codes = custom_launch.rank_exit_codes(exit_dir)
            if self._stopped or not custom_launch.was_preempted(codes, rank_codes,
                                                                spec.world_size):
                break
            # Exit 75: preempted, resume me. Not a failure: no Airflow retry is spent.
            self.log.warning("step %s was preempted (exit code %d; ranks %s): restarting it to "
                             "resume from its checkpoint (restart %d of at most %d)", spec.step,
                             custom_launch.PREEMPTED_EXIT, rank_codes or codes, start + 1,
                             MAX_PREEMPTIONS)
            self.preemptions += 1
        return codes, tail

    def _setup(self, spec: StepSpec, env: dict[str, str], ceiling: Ceiling,
               deadline: float) -> None:
        """`spec.setup_command` (arf-trainer custom-setup), its output into the task log. It runs
        under the step's memory ceiling (node 0's cgroup in cgroup mode) and time limit, as the
        init container runs under the pod's limits on Kubernetes."""
        command = [venv_bin(spec.setup_command[0]), *spec.setup_command[1:]]
        self.log.info("$ %s", " ".join(command))
        proc = subprocess.Popen(ceiling.wrap(command, 0), env=env, cwd=spec.workspace,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                errors="replace", umask=STEP_UMASK)
        self._procs = [proc]  # on_kill reaches it
        self._tree = StepTree(self._procs)
        ceiling.apply(proc.pid)
        try:
            output, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise StepTimeout(f"step {spec.step!r}: {' '.join(spec.setup_command)} ran past the "
                              f"step's timeout of {spec.timeout_s:.0f}s "
                              "(training.timeout_minutes) before the command started") from None
        lines = output.splitlines()
        for line in lines:
            self.log.log(*relay_line(line))
        if proc.returncode != 0:
            tail = lines[-TAIL_LINES:]
            note = "" if self._stopped else ceiling.failure_note([proc.returncode], tail)
            raise StepFailed(f"step {spec.step!r}: {' '.join(spec.setup_command)} failed (exit "
                             f"code {proc.returncode}) before the command started:\n"
                             + "\n".join(tail) + note,
                             retryable=proc.returncode != BAD_INPUT_EXIT)

    def _start(self, spec: StepSpec, env: dict[str, str], commands: list[list[str]],
               deadline: float, ceiling: Ceiling) -> tuple[list[int], collections.deque[str]]:
        """One start of the step's process groups, waited for: (exit codes, tail)."""
        self._procs = []
        lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        for node, command in enumerate(commands):
            self.log.info("$ %s", " ".join(command))
            # A new session per node: killpg() then reaches torchrun and all of its workers.
            # In cgroup mode the process joins its node's cgroup before it runs (ceiling.wrap).
            proc = subprocess.Popen(ceiling.wrap(command, node), env=env, cwd=spec.workspace,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                    errors="replace", bufsize=1, umask=STEP_UMASK)
            self._procs.append(proc)
            if not ceiling.apply(proc.pid):  # see arf_training.backends.memory for why so
                self.log.warning("no memory ceiling on this OS (prlimit is Linux only)")
            threading.Thread(target=self._pump, args=(node, proc, lines), daemon=True).start()
        self.log.info("memory ceiling: %s", ceiling.describe())
        self._tree = tree = StepTree(self._procs)
        open_nodes, drained = set(range(len(self._procs))), {}
        prefix = len(self._procs) > 1
        try:
            while open_nodes:
                tree.snapshot()
                for node in tree.drain(open_nodes):  # a leftover holds a finished node's output
                    if time.monotonic() - drained.setdefault(node, time.monotonic()) > DRAIN_S:
                        self.log.warning("node %d exited, but a process outside its group holds "
                                         "its output; not waiting for it", node)
                        open_nodes.discard(node)
                if time.monotonic() > deadline:
                    self.kill()
                    raise StepTimeout(
                        f"step {spec.step!r} ran past its timeout of {spec.timeout_s:.0f}s "
                        f"(training.timeout_minutes) and was stopped. Last lines:\n"
                        + "\n".join(tail))
                try:
                    node, line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    open_nodes.discard(node)
                    continue
                level, text = relay_line(line)
                text = f"[node {node}] {text}" if prefix else text
                tail.append(text)
                self.log.log(level, "%s", text)
            codes = [proc.wait() for proc in self._procs]
        finally:
            self.kill()
        return codes, tail

    @staticmethod
    def _pump(node: int, proc: subprocess.Popen, lines: queue.Queue) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((node, line.rstrip("\n")))
        lines.put((node, None))

    def kill(self) -> None:
        """Stop every process group still running: SIGTERM, the step's grace period (to write a
        checkpoint that a retry resumes from), then SIGKILL."""
        self._tree.snapshot(force=True)  # who left the groups: killed with them below
        alive = [p for p in self._procs if p.poll() is None]
        self._stopped = self._stopped or bool(alive)
        for proc in alive:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self._grace_s + KILL_MARGIN_S
        for proc in alive:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._tree.kill_all()  # SIGKILL: the groups' leftovers and those that left them


class LocalStepOperator(BaseOperator):
    """Runs `arf-trainer <step>` (or the template's own command) as a local process group.

    :param loaded: the validated template (with its path and content hash).
    :param step: prepare, train or register.
    :param trial: for the mapped trial tasks of an `hpo:` template, the trial to train (one
        element of the ask task's list: number, params, label).
    """

    ui_color = "#e8f4ea"
    operator_extra_links = STEP_LINKS  # MLflow run, model version (arf_training.links)

    def __init__(self, *, loaded: LoadedTemplate, step: str,
                 trial: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.loaded = loaded
        self.step = step
        self.trial = trial
        self._runner: LocalStepRunner | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        with task_log(context, self.log) as log, fail_fast_on_bad_input():
            spec = build_step_spec(self.loaded, self.step, run_identity(context),
                                   trigger_conf(context), ArfSettings.from_env(),
                                   trial=self.trial)
            self._runner = LocalStepRunner(log)
            result = self._runner.run(spec)
        if self.step == "register":
            emit_model_event(context, self.loaded, result)
        return result

    def on_kill(self) -> None:
        if self._runner is not None:
            self._runner.kill()


class LocalEvaluateOperator(BaseOperator):
    """Evaluates each model version of the run as its template (not the run's conf) says."""

    ui_color = "#fdf2e0"
    operator_extra_links = STEP_LINKS

    def __init__(self, *, templates: dict[str, LoadedTemplate], **kwargs: Any):
        super().__init__(**kwargs)
        self.templates = templates
        self._runner: LocalStepRunner | None = None
        self._killed = False

    def execute(self, context: Any) -> list[dict[str, Any]]:
        with task_log(context, self.log) as log, fail_fast_on_bad_input():
            targets = models_to_evaluate(context, self.templates)
            return evaluate_each(context, targets, lambda t: self._evaluate(context, t, log),
                                 log, lambda: self._killed)

    def _evaluate(self, context: Any, target: dict[str, str], log: Any) -> dict[str, Any]:
        with fail_fast_on_bad_input():
            spec = build_step_spec(self.templates[target["model_name"]], "evaluate",
                                   run_identity(context), {}, ArfSettings.from_env(), inputs=target)
            self._runner = LocalStepRunner(log)
            return self._runner.run(spec)

    def on_kill(self) -> None:
        self._killed = True
        if self._runner is not None:
            self._runner.kill()


class LocalBackend(Backend):
    """Steps as local processes; `torchrun` for multi-process training (gloo on CPU)."""

    name: ClassVar[str] = "local"

    def step_task(self, *, task_id: str, loaded: LoadedTemplate, step: str, **kwargs: Any):
        return LocalStepOperator(task_id=task_id, loaded=loaded, step=step, **kwargs)

    def trial_task(self, *, task_id: str, loaded: LoadedTemplate, trials: Any, **kwargs: Any):
        return LocalStepOperator.partial(task_id=task_id, loaded=loaded, step="train",
                                         **kwargs).expand(trial=trials)

    def evaluate_task(self, *, task_id: str, templates: dict[str, LoadedTemplate], **kwargs: Any):
        return LocalEvaluateOperator(task_id=task_id, templates=templates, **kwargs)

    def site_task(self, *, task_id: str, loaded: LoadedTemplate, **kwargs: Any):
        """A template's `federated:` prepare, mapped over its sites (backends/local_federated)."""
        from arf_training.backends.local_federated import LocalSiteStepOperator

        sites = [site.name for site in loaded.template.federated.sites]
        return LocalSiteStepOperator.partial(task_id=task_id, loaded=loaded,
                                             map_index_template="{{ task.site }}",
                                             **kwargs).expand(site=sites)

    def federate_task(self, *, task_id: str, loaded: LoadedTemplate, **kwargs: Any):
        from arf_training.backends.local_federated import LocalFederateOperator

        return LocalFederateOperator(task_id=task_id, loaded=loaded, **kwargs)
