"""The local backend runs a step as its own process group: output streamed, failures with the
tail of the log, timeouts and kills stop every process, the environment is explicit."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from arf_training.backends.local import LocalStepRunner
from arf_training.backends.memory import MemoryCeiling
from arf_training.errors import StepFailed, StepTimeout
from arf_training.stepspec import StepSpec
from arf_training.templates import Resources


@pytest.fixture(autouse=True)
def _rlimit_ceiling(monkeypatch):
    """These tests are about the default ceiling (RLIMIT_DATA); test_local_cgroup.py has the
    cgroup one, whatever the environment running the suite asks for."""
    monkeypatch.delenv("ARF_LOCAL_MEMORY_CEILING", raising=False)


def _spec(tmp_path: Path, code: str, *, timeout: float = 60.0, procs: int = 1,
          grace: float = 30.0) -> StepSpec:
    result = tmp_path / "step" / "result.json"
    return StepSpec(
        step="train", image="img", command=[sys.executable, "-c", code],
        env={"ARF_WORKSPACE": str(tmp_path), "ARF_RESULT_PATH": str(result), "ARF_X": "1"},
        job_spec={"run": {"try_number": 1}}, workspace=tmp_path, resources=Resources(),
        procs_per_node=procs, timeout_s=timeout, result_path=result, grace_s=grace,
    )


WRITE_RESULT = (
    "import json, os, pathlib; p = pathlib.Path(os.environ['ARF_RESULT_PATH']); "
    "p.parent.mkdir(parents=True, exist_ok=True); "
    "p.write_text(json.dumps({'env_x': os.environ.get('ARF_X'), "
    "'leak': os.environ.get('ARF_TEST_SECRET'), 'spec': os.environ['ARF_JOB_SPEC']}))"
)


def test_success_returns_result_and_streams_output(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ARF_TEST_SECRET", "must-not-leak")
    caplog.set_level(logging.INFO)
    runner = LocalStepRunner(logging.getLogger("t"))
    result = runner.run(_spec(tmp_path, "print('hello from the step'); " + WRITE_RESULT))
    assert result["env_x"] == "1"
    assert result["leak"] is None  # only PASSTHROUGH_ENV and the spec's env reach the step
    assert json.loads(Path(result["spec"]).read_text()) == {"run": {"try_number": 1}}
    assert "hello from the step" in caplog.text


def test_step_log_lines_are_relayed_whole_with_one_timestamp_and_their_level(tmp_path, caplog):
    # The trainer's logging format (arf_trainer/cli.py): its own time, level, logger name.
    words = " ".join(f"word{i}" for i in range(80))  # ~550 characters
    code = ("import logging, sys\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stdout,\n"
            "                    format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
            "logging.getLogger('arf_trainer.trainer.run').info('epoch 1/2 | " + words + "')\n"
            "logging.getLogger('arf_trainer.x').warning('disk almost full')\n"
            # MLflow's own format: another date style.
            "h = logging.StreamHandler(sys.stdout)\n"
            "h.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s',\n"
            "                                 datefmt='%Y/%m/%d %H:%M:%S'))\n"
            "m = logging.getLogger('mlflow.store'); m.addHandler(h); m.propagate = False\n"
            "m.info('Creating initial MLflow database tables...')\n"
            "print('a plain print stays as it is')\n" + WRITE_RESULT)
    caplog.set_level(logging.INFO, logger="relay")
    LocalStepRunner(logging.getLogger("relay")).run(_spec(tmp_path, code))
    records = {r.getMessage(): r for r in caplog.records if r.name == "relay"}
    epoch = f"arf_trainer.trainer.run: epoch 1/2 | {words}"
    assert epoch in records, sorted(records)  # no second timestamp, nothing cut
    assert records["arf_trainer.x: disk almost full"].levelno == logging.WARNING
    assert records["a plain print stays as it is"].levelno == logging.INFO
    assert "mlflow.store: Creating initial MLflow database tables..." in records


def test_failure_carries_the_tail_of_the_log(tmp_path):
    code = "import sys\nfor i in range(100): print('line', i)\nsys.exit(3)"
    with pytest.raises(StepFailed) as info:
        LocalStepRunner().run(_spec(tmp_path, code))
    message = str(info.value)
    assert "exit code 3" in message and "line 99" in message and "line 10\n" not in message


def test_exit_zero_without_result_is_a_failure(tmp_path):
    with pytest.raises(StepFailed, match="wrote no result"):
        LocalStepRunner().run(_spec(tmp_path, "print('nothing')"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


SPAWN_CHILD = (
    "import subprocess, sys, time, os, pathlib\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "pathlib.Path(os.environ['ARF_WORKSPACE'], 'child.pid').write_text(str(child.pid))\n"
    "print('spawned', flush=True)\n"
    "time.sleep(600)\n"
)


def _dies(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for(path: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.1)
    return int(path.read_text())


def test_timeout_kills_the_whole_process_group(tmp_path):
    start = time.monotonic()
    with pytest.raises(StepTimeout, match="ran past its timeout"):
        LocalStepRunner().run(_spec(tmp_path, SPAWN_CHILD, timeout=3))
    assert time.monotonic() - start < 20
    child = _wait_for(tmp_path / "child.pid")
    assert _dies(child), "grandchild survived the timeout"


def test_kill_from_on_kill_stops_everything(tmp_path):
    runner = LocalStepRunner()
    errors = []

    def run():
        try:
            runner.run(_spec(tmp_path, SPAWN_CHILD))
        except StepFailed as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    child = _wait_for(tmp_path / "child.pid")
    runner.kill()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors and "failed" in str(errors[0])
    assert _dies(child), "grandchild survived on_kill"


def test_multi_process_uses_torchrun(tmp_path):
    spec = _spec(tmp_path, "", procs=2)
    spec = StepSpec(**{**spec.__dict__, "command": ["arf-trainer", "train"]})
    [command] = LocalStepRunner().commands(spec)
    # torchrun, with its TCP stores on loopback (arf_training.backends.loopback_torchrun)
    assert command[:4] == [sys.executable, "-P", "-m", "arf_training.backends.loopback_torchrun"]
    assert "--standalone" in command and "--nproc-per-node=2" in command
    assert command[-3] == "--no-python" and Path(command[-2]).name == "arf-trainer"
    assert command[-1] == "train"


GRACEFUL = (
    "import os, pathlib, signal, sys, time\n"
    "ws = pathlib.Path(os.environ['ARF_WORKSPACE'])\n"
    "def on_term(*_):\n"
    "    time.sleep(1.0)  # a checkpoint being written\n"
    "    (ws / 'checkpointed').write_text('yes')\n"
    "    sys.exit(75)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "(ws / 'ready').write_text('1')\n"
    "time.sleep(600)\n"
)

STUBBORN = (
    "import os, pathlib, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "pathlib.Path(os.environ['ARF_WORKSPACE'], 'ready').write_text(str(os.getpid()))\n"
    "time.sleep(600)\n"
)


def test_timeout_gives_the_step_its_grace_period_to_checkpoint(tmp_path):
    with pytest.raises(StepTimeout):
        LocalStepRunner().run(_spec(tmp_path, GRACEFUL, timeout=2, grace=10))
    assert (tmp_path / "checkpointed").read_text() == "yes"


def test_a_step_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    start = time.monotonic()
    with pytest.raises(StepTimeout):
        LocalStepRunner().run(_spec(tmp_path, STUBBORN, timeout=2, grace=1))
    elapsed = time.monotonic() - start
    pid = int((tmp_path / "ready").read_text())
    assert _dies(pid)
    assert elapsed < 2 + 1 + 5 + 5  # timeout + grace + margin + slack


# --- memory ceiling (issue 13): every step process runs under resources.memory -------------

REPORT_LIMITS = (
    "import json, os, pathlib, resource, subprocess, sys\n"
    "own = resource.getrlimit(resource.RLIMIT_DATA)\n"
    "probe = 'import resource; print(resource.getrlimit(resource.RLIMIT_DATA)[0])'\n"
    "child = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True)\n"
    "p = pathlib.Path(os.environ['ARF_RESULT_PATH']); p.parent.mkdir(parents=True, exist_ok=True)\n"
    "p.write_text(json.dumps({'own': list(own), 'child': int(child.stdout)}))\n"
)


def _with_memory(spec: StepSpec, memory: str) -> StepSpec:
    return dataclasses.replace(spec, resources=Resources(memory=memory))


def test_step_and_its_children_run_under_a_ceiling_from_resources_memory(tmp_path):
    result = LocalStepRunner().run(_with_memory(_spec(tmp_path, REPORT_LIMITS), "512Mi"))
    ceiling = 512 * 2**20 + 2 * 2**30  # resources.memory + the default headroom
    # Hard limit too: the step cannot raise it; its children (torchrun's workers) inherit it.
    assert result == {"own": [ceiling, ceiling], "child": ceiling}


# The setup command (arf-trainer custom-setup before a template's own command) reports the
# limits it runs under into the workspace.
SETUP_REPORTS = ("import json, os, pathlib, resource; pathlib.Path(os.environ['ARF_WORKSPACE'],"
                 " 'setup.json').write_text(json.dumps(resource.getrlimit(resource.RLIMIT_DATA)))")


def test_setup_command_runs_under_the_steps_ceiling(tmp_path):
    # As the init container runs under the pod's limit on Kubernetes.
    spec = dataclasses.replace(_with_memory(_spec(tmp_path, WRITE_RESULT), "512Mi"),
                               setup_command=[sys.executable, "-c", SETUP_REPORTS])
    LocalStepRunner().run(spec)
    ceiling = 512 * 2**20 + 2 * 2**30
    assert json.loads((tmp_path / "setup.json").read_text()) == [ceiling, ceiling]


def test_setup_command_counts_against_the_steps_timeout(tmp_path):
    spec = dataclasses.replace(_spec(tmp_path, WRITE_RESULT, timeout=2),
                               setup_command=[sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.monotonic()
    with pytest.raises(StepTimeout) as info:
        LocalStepRunner().run(spec)
    assert "ran past the step's timeout of 2s" in str(info.value)
    assert "before the command started" in str(info.value)
    assert time.monotonic() - started < 15
    assert not (tmp_path / "step" / "result.json").exists()  # the command never started


def test_ceiling_is_shared_by_a_nodes_processes_plus_headroom(monkeypatch):
    assert MemoryCeiling("1Gi", 2).bytes == 2**29 + 2 * 2**30
    monkeypatch.setenv("ARF_STEP_MEMORY_HEADROOM", "512Mi")
    assert MemoryCeiling("1Gi", 1).bytes == 2**30 + 2**29
    assert "resources.memory: 1Gi + 512Mi headroom" in MemoryCeiling("1Gi", 1).describe()
    monkeypatch.setenv("ARF_STEP_MEMORY_HEADROOM", "lots")
    with pytest.raises(StepFailed, match="ARF_STEP_MEMORY_HEADROOM='lots'.*e.g. 512Mi") as info:
        MemoryCeiling("1Gi", 1)
    assert not info.value.retryable


def test_ceiling_never_raises_a_lower_limit_the_worker_already_has():
    import resource
    import subprocess

    lower = 3 * 10**9  # below 2Gi + 2Gi: e.g. a worker started under its own ulimit -d
    child = subprocess.Popen(  # a test-only preexec_fn: this process has no other threads
        [sys.executable, "-c", "import time; time.sleep(30)"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (lower, lower)))
    try:
        ceiling = MemoryCeiling("2Gi", 1)
        assert ceiling.apply(child.pid)
        assert resource.prlimit(child.pid, resource.RLIMIT_DATA) == (lower, lower)
        assert "lowered to 2.79 GiB (the worker's own hard limit)" in ceiling.describe()
    finally:
        child.kill()
        child.wait()


def test_allocation_over_the_ceiling_fails_naming_the_limit(tmp_path):
    # 3 GiB is over 256Mi + 2Gi. Without a ceiling the (untouched) allocation would succeed.
    spec = _with_memory(_spec(tmp_path, "bytearray(3 * 2**30)"), "256Mi")
    with pytest.raises(StepFailed) as info:
        LocalStepRunner().run(spec)
    message = str(info.value)
    assert "MemoryError" in message
    assert "memory ceiling of 2.25 GiB" in message and "resources.memory: 256Mi" in message
    assert "raise training.resources.memory" in message


def _prepare_spec(tmp_path: Path, query: str, memory: str) -> StepSpec:
    """The real prepare step of a digits_smoke variant over a small `digits` table."""
    import pyarrow as pa
    import yaml

    from arf_trainer.datahub.tables import write_table
    from arf_training.settings import REPO_ROOT, ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec
    from arf_training.templates import load_template

    hub = tmp_path / "hub"
    write_table(hub, "digits", pa.table({"pixel_0": [float(i) for i in range(40)],
                                         "label": [i % 10 for i in range(40)]}))
    raw = yaml.safe_load((REPO_ROOT / "config_templates" / "digits_smoke.yaml").read_text())
    raw["dataset"]["query"] = query
    raw["training"]["resources"]["memory"] = memory
    path = tmp_path / "digits_smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = ArfSettings(home=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                           datahub_uri=str(hub), artifact_root=str(tmp_path / "artifacts"))
    run = RunIdentity("digits_smoke", f"manual__{tmp_path.name}", "prepare_data")
    return build_step_spec(load_template(path), "prepare", run, {}, settings)


@pytest.mark.parametrize("query", [
    # The issue's query: repeat()'s strings are allocated outside DuckDB's memory_limit.
    pytest.param("SELECT *, repeat('x', 200000000) FROM digits", id="repeat"),
    # Another value DuckDB builds outside its buffer manager: printf's padding.
    pytest.param("SELECT *, printf('%200000000d', label) AS padded FROM digits", id="printf-pad"),
])
def test_prepare_query_escaping_duckdbs_limit_stops_at_the_ceiling(tmp_path, query):
    # As in the issue: DuckDB's limit is ~2 GB and the query grows past it, here until a
    # malloc fails at the process's ceiling (2Gi + 2Gi headroom) instead of at 8+ GiB.
    started = time.monotonic()
    with pytest.raises(StepFailed) as info:
        LocalStepRunner().run(_prepare_spec(tmp_path, query, "2Gi"))
    message = str(info.value)
    # DuckDB gets an eighth of resources.memory (the rest: what DuckDB holds beyond its own
    # limit, the streamed batches and the writers).
    assert "needs more than its memory limit of 256MiB within resources.memory: 2Gi" in message
    # malloc failed at the rlimit, or (printf's values are sorted by the streaming prepare, under
    # DuckDB's buffer manager) DuckDB's own limit stopped the query first.
    assert re.search("bad allocation|Allocation failure|failed to allocate data of size", message)
    assert "raise resources.memory in the template's training section" in message
    # ... and the backend names the OS limit that stopped it.
    assert "memory ceiling of 4 GiB of data memory per process (RLIMIT_DATA)" in message
    assert not info.value.retryable  # bad input (exit 2): a retry would fail the same way
    assert time.monotonic() - started < 120


def test_prepare_of_a_normal_query_fits_under_the_same_ceiling(tmp_path):
    result = LocalStepRunner().run(_prepare_spec(tmp_path, "SELECT * FROM digits", "256Mi"))
    assert (result["rows"], result["train_rows"], result["val_rows"]) == (40, 32, 8)
