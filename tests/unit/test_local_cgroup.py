"""ARF_LOCAL_MEMORY_CEILING=cgroup: a local step runs in a memory cgroup of resources.memory, as
in a pod. Real cgroups, no mocks: the tests that need one skip where this process cannot create
a memory cgroup (not root, no memory controller); the error paths run everywhere."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from arf_training.backends.cgroup import CgroupUnavailable, MemoryCgroup, default_parent
from arf_training.backends.local import LocalStepRunner
from arf_training.backends.memory import CgroupCeiling
from arf_training.errors import StepFailed, StepTimeout
from arf_training.stepspec import StepSpec
from arf_training.templates import Resources


def _cgroup_problem() -> str:
    """Why no memory cgroup can be made here, or '' when one can."""
    try:
        MemoryCgroup(2**26, name=f"arf-probe-{os.getpid()}").create().remove()
    except (CgroupUnavailable, OSError) as exc:
        return str(exc)
    return ""


_PROBLEM = _cgroup_problem()
needs_cgroup = pytest.mark.skipif(
    bool(_PROBLEM), reason=f"the memory cgroup hierarchy is not writable here: {_PROBLEM}")


@pytest.fixture
def cgroup_mode(monkeypatch):
    monkeypatch.setenv("ARF_LOCAL_MEMORY_CEILING", "cgroup")
    monkeypatch.delenv("ARF_LOCAL_CGROUP_PARENT", raising=False)


def _spec(tmp_path: Path, code: str, memory: str, timeout: float = 60.0) -> StepSpec:
    result = tmp_path / "step" / "result.json"
    return StepSpec(
        step="train", image="img", command=[sys.executable, "-c", code],
        env={"ARF_WORKSPACE": str(tmp_path), "ARF_RESULT_PATH": str(result)},
        job_spec={"run": {"try_number": 1}}, workspace=tmp_path,
        resources=Resources(memory=memory), timeout_s=timeout, result_path=result, grace_s=1.0)


def _leftovers() -> list[str]:
    """This test process's step cgroups still in place (their names carry its pid)."""
    return [p.name for p in default_parent().glob(f"arf-*-{os.getpid()}-*")]


# The step reports the cgroup it runs in, that cgroup's limit and its own RLIMIT_DATA.
REPORT_CGROUP = (
    "import json, os, pathlib, resource\n"
    "mine = [l.split(':', 2)[2] for l in open('/proc/self/cgroup').read().splitlines()\n"
    "        if '/arf-train-' in l][0]\n"
    "files = [pathlib.Path('/sys/fs/cgroup/memory' + mine, 'memory.limit_in_bytes'),\n"
    "         pathlib.Path('/sys/fs/cgroup' + mine, 'memory.max')]\n"
    "limit = next(int(f.read_text()) for f in files if f.exists())\n"
    "p = pathlib.Path(os.environ['ARF_RESULT_PATH']); p.parent.mkdir(parents=True, exist_ok=True)\n"
    "p.write_text(json.dumps({'cgroup': mine, 'limit': limit,\n"
    "                         'data': list(resource.getrlimit(resource.RLIMIT_DATA))}))\n"
)


@needs_cgroup
def test_step_within_the_limit_runs_in_its_cgroup_which_is_removed_after(tmp_path, cgroup_mode,
                                                                         caplog):
    caplog.set_level("INFO")
    result = LocalStepRunner().run(_spec(tmp_path, REPORT_CGROUP, "256Mi"))
    assert result["limit"] == 256 * 2**20  # resources.memory exactly, for the whole step
    # The cgroup is the limit: no RLIMIT_DATA is set on the step (it keeps the worker's own).
    assert result["data"] == list(resource.getrlimit(resource.RLIMIT_DATA))
    assert "a memory cgroup of resources.memory: 256Mi" in caplog.text
    assert Path(result["cgroup"]).name.startswith(f"arf-train-{os.getpid()}-")
    assert not _leftovers()


@needs_cgroup
def test_step_past_the_limit_is_oom_killed_and_says_so(tmp_path, cgroup_mode):
    # 300 MB written (so resident) in a 64Mi cgroup: the kernel's OOM killer stops it.
    code = "print('allocating', flush=True)\nx = b'x' * (300 * 2**20)\nprint('survived')"
    started = time.monotonic()
    with pytest.raises(StepFailed) as info:
        LocalStepRunner().run(_spec(tmp_path, code, "64Mi"))
    message = str(info.value)
    assert "step 'train' failed (node 0 exit code -9)" in message  # the existing report stays
    assert "allocating" in message and "survived" not in message
    assert "Step 'train' exceeded resources.memory=64Mi" in message
    assert "OOM-killed it in its memory cgroup (1 OOM kill(s), peak 64 MiB" in message
    assert "Raise training.resources.memory in the template" in message
    assert not _leftovers()
    assert time.monotonic() - started < 30


@needs_cgroup
def test_setup_command_runs_in_the_steps_cgroup(tmp_path, cgroup_mode):
    # Setup and command share node 0's cgroup, as an init container shares the pod's limit.
    setup = REPORT_CGROUP.replace("os.environ['ARF_RESULT_PATH']",
                                  "os.environ['ARF_WORKSPACE'] + '/setup.json'")
    spec = dataclasses.replace(_spec(tmp_path, REPORT_CGROUP, "256Mi"),
                               setup_command=[sys.executable, "-c", setup])
    result = LocalStepRunner().run(spec)
    during_setup = json.loads((tmp_path / "setup.json").read_text())
    assert during_setup["cgroup"] == result["cgroup"]
    assert during_setup["limit"] == 256 * 2**20
    assert not _leftovers()


@needs_cgroup
def test_setup_command_past_the_limit_fails_the_step_before_the_command(tmp_path, cgroup_mode):
    spec = dataclasses.replace(
        _spec(tmp_path, MARKS_THE_START, "64Mi"),
        setup_command=[sys.executable, "-c", "x = b'x' * (300 * 2**20)"])
    with pytest.raises(StepFailed) as info:
        LocalStepRunner().run(spec)
    message = str(info.value)
    assert "failed (exit code -9) before the command started" in message
    assert "Step 'train' exceeded resources.memory=64Mi: the kernel OOM-killed it" in message
    assert not (tmp_path / "ran").exists()
    assert not _leftovers()


ESCAPES_THE_SESSION = (
    "import os, pathlib, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
    "                         start_new_session=True)  # out of reach of the step's killpg\n"
    "pathlib.Path(os.environ['ARF_WORKSPACE'], 'child.pid').write_text(str(child.pid))\n"
    "time.sleep(600)\n"
)


@needs_cgroup
def test_timeout_removes_the_cgroup_and_whatever_escaped_the_session(tmp_path, cgroup_mode):
    with pytest.raises(StepTimeout):
        LocalStepRunner().run(_spec(tmp_path, ESCAPES_THE_SESSION, "256Mi", timeout=3))
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{child}/stat").read_text().split()
        if stat[2] == "Z":  # killed, not reaped yet by its new parent
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{child}").exists(), "a process outside the session survived"
    assert not _leftovers()


@needs_cgroup
def test_each_node_gets_its_own_cgroup_of_resources_memory(monkeypatch):
    # Like pods: every node of a multi-node step has the whole resources.memory to itself.
    monkeypatch.delenv("ARF_LOCAL_CGROUP_PARENT", raising=False)
    ceiling = CgroupCeiling("train", "128Mi", nodes=2)
    try:
        assert [g.path.name[-5:] for g in ceiling.groups] == ["node0", "node1"]
        assert all(int((g.path / g.files["limit"]).read_text()) == 128 * 2**20
                   for g in ceiling.groups)
        assert "resources.memory: 128Mi per node" in ceiling.describe()
    finally:
        ceiling.close(None)
    assert not any(g.path.exists() for g in ceiling.groups)
    assert not _leftovers()


# --- refused before the step starts: these need no root -------------------------------------

MARKS_THE_START = "import os, pathlib; pathlib.Path(os.environ['ARF_WORKSPACE'], 'ran').touch()"


@pytest.mark.parametrize("parent, reason", [
    pytest.param("missing", "cannot create the memory cgroup", id="no-such-hierarchy"),
    pytest.param(".", "is not a cgroup", id="a-plain-folder"),
])
def test_unusable_hierarchy_fails_the_step_before_it_starts(tmp_path, cgroup_mode, monkeypatch,
                                                            parent, reason):
    where = tmp_path / "hierarchy" / parent
    (tmp_path / "hierarchy").mkdir()
    monkeypatch.setenv("ARF_LOCAL_CGROUP_PARENT", str(where))
    with pytest.raises(StepFailed) as info:
        LocalStepRunner().run(_spec(tmp_path, MARKS_THE_START, "256Mi"))
    message = str(info.value)
    assert message.startswith("ARF_LOCAL_MEMORY_CEILING=cgroup: ") and reason in message
    assert str(where) in message  # the path tried
    assert "run the Airflow worker as root, or delegate a cgroup" in message
    assert "ARF_LOCAL_CGROUP_PARENT" in message and "ARF_LOCAL_MEMORY_CEILING=rlimit" in message
    assert not info.value.retryable
    assert not (tmp_path / "ran").exists()
    assert list((tmp_path / "hierarchy").iterdir()) == []  # nothing left in a plain folder


def test_unknown_ceiling_is_refused_naming_the_setting_and_its_values(tmp_path, monkeypatch):
    monkeypatch.setenv("ARF_LOCAL_MEMORY_CEILING", "cgroups")
    with pytest.raises(StepFailed) as info:
        LocalStepRunner().run(_spec(tmp_path, MARKS_THE_START, "256Mi"))
    assert str(info.value) == ("ARF_LOCAL_MEMORY_CEILING='cgroups' is not a memory ceiling; use "
                               "one of ['rlimit', 'cgroup'] (or unset it for rlimit)")
    assert not info.value.retryable
    assert not (tmp_path / "ran").exists()


def test_default_stays_the_rlimit(tmp_path, monkeypatch):
    monkeypatch.delenv("ARF_LOCAL_MEMORY_CEILING", raising=False)
    code = ("import json, os, pathlib, resource\n"
            "p = pathlib.Path(os.environ['ARF_RESULT_PATH']); p.parent.mkdir(parents=True)\n"
            "p.write_text(json.dumps(resource.getrlimit(resource.RLIMIT_DATA)))\n")
    result = LocalStepRunner().run(_spec(tmp_path, code, "256Mi"))
    assert result == [256 * 2**20 + 2 * 2**30] * 2  # resources.memory + headroom, per process


@needs_cgroup
def test_stale_cgroups_of_a_gone_creator_are_swept(tmp_path):
    """A worker SIGKILLed mid-step cannot remove its cgroups; the next step's ceiling deletes
    the empty ones whose creating pid is gone (old enough), and leaves every other one."""
    import subprocess

    from arf_training.backends.cgroup import sweep_stale

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now (and not reused within this test, in practice)
    parent = default_parent()
    stale = MemoryCgroup(2**26, name=f"arf-train-{gone.pid}-0badcafe-node0").create()
    busy = MemoryCgroup(2**26, name=f"arf-train-{gone.pid}-0badcafe-node1").create()
    mine = MemoryCgroup(2**26, name=f"arf-train-{os.getpid()}-0badcafe-node0").create()
    sleeper = subprocess.Popen(busy.wrap(["sleep", "30"]))
    try:
        deadline = time.monotonic() + 5
        while not busy.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert busy.pids(), "the sleeper did not join its cgroup"
        assert sweep_stale(parent) == []  # younger than the default age: kept
        assert sweep_stale(parent, min_age_s=0) == [stale.path]
        assert not stale.path.exists()
        assert busy.path.exists() and mine.path.exists()  # holds a process / creator alive
    finally:
        sleeper.kill()
        sleeper.wait()
        for group in (stale, busy, mine):
            group.remove()
