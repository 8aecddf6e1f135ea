"""Isolation of local steps (an outside review): nothing a step starts listens beyond loopback,
and nothing it starts outlives it, also a process that left its process group."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from arf_training.backends.local import LocalStepRunner
from arf_training.errors import StepTimeout
from arf_training.stepspec import StepSpec
from arf_training.templates import Resources


@pytest.fixture(autouse=True)
def _rlimit_ceiling(monkeypatch):
    monkeypatch.delenv("ARF_LOCAL_MEMORY_CEILING", raising=False)


def _spec(tmp_path: Path, code: str, *, timeout: float = 60.0, procs: int = 1) -> StepSpec:
    result = tmp_path / "step" / "result.json"
    return StepSpec(
        step="train", image="img", command=[sys.executable, "-c", code],
        env={"ARF_WORKSPACE": str(tmp_path), "ARF_RESULT_PATH": str(result)},
        job_spec={"run": {"try_number": 1}}, workspace=tmp_path, resources=Resources(),
        procs_per_node=procs, timeout_s=timeout, result_path=result, grace_s=1.0,
    )


WRITE_RESULT = ("import json, os, pathlib; p = pathlib.Path(os.environ['ARF_RESULT_PATH']); "
                "p.parent.mkdir(parents=True, exist_ok=True); p.write_text('{\"ok\": 1}')\n")


def _leftover(tmp_path: Path, *, new_session: bool, keep_output: bool) -> str:
    """Step code that starts a sleeping child (its pid in leftover.pid) and goes on."""
    quiet = "" if keep_output else ", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL"
    return ("import subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
            f"start_new_session={new_session}{quiet})\n"
            f"open({str(tmp_path / 'leftover.pid')!r}, 'w').write(str(child.pid))\n")


def _dies(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own zombie (not here: the step's children are not ours)
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return False


def test_a_background_process_holding_the_output_does_not_hold_a_finished_step(tmp_path):
    # Before: the task waited for the end of the output until the step's timeout and then
    # failed a step that had finished with its result written.
    start = time.monotonic()
    code = _leftover(tmp_path, new_session=False, keep_output=True) + WRITE_RESULT
    result = LocalStepRunner().run(_spec(tmp_path, code, timeout=30))
    assert result == {"ok": 1}
    assert time.monotonic() - start < 20
    assert _dies(int((tmp_path / "leftover.pid").read_text()))


@pytest.mark.parametrize("keep_output", [pytest.param(False, id="quiet"),
                                         pytest.param(True, id="holding-the-output")])
def test_a_process_that_left_the_group_is_stopped_on_timeout(tmp_path, keep_output):
    code = (_leftover(tmp_path, new_session=True, keep_output=keep_output)
            + "import time; time.sleep(120)\n")
    with pytest.raises(StepTimeout):
        LocalStepRunner().run(_spec(tmp_path, code, timeout=4))
    assert _dies(int((tmp_path / "leftover.pid").read_text())), "setsid child survived"


def test_a_process_that_left_the_group_does_not_outlive_a_finished_step(tmp_path):
    # As a pod ends with its main process: a detached leftover must not write into the run's
    # workspace beside the next step or a retry. (The sleep lets a snapshot see it.)
    code = (_leftover(tmp_path, new_session=True, keep_output=False)
            + "import time; time.sleep(2.5)\n" + WRITE_RESULT)
    assert LocalStepRunner().run(_spec(tmp_path, code)) == {"ok": 1}
    assert _dies(int((tmp_path / "leftover.pid").read_text())), "setsid child survived"


# --- torchrun: its TCP stores listen on loopback, not on every interface -------------------

def test_torchrun_runs_through_the_loopback_launcher(tmp_path):
    spec = StepSpec(**{**_spec(tmp_path, "", procs=2).__dict__, "command": ["arf-trainer", "x"]})
    [command] = LocalStepRunner().commands(spec)
    assert command[:4] == [sys.executable, "-P", "-m", "arf_training.backends.loopback_torchrun"]
    multi = StepSpec(**{**spec.__dict__, "nodes": 2})
    for command in LocalStepRunner().commands(multi):
        endpoint = next(a for a in command if a.startswith("--rdzv-endpoint="))
        assert endpoint.split("=", 1)[1].startswith("127.0.0.1:")


def _listening(port: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_the_launchers_store_servers_listen_on_loopback_only(monkeypatch):
    dist = pytest.importorskip("torch.distributed")
    from arf_training.backends import loopback_torchrun

    monkeypatch.setattr(dist, "TCPStore", dist.TCPStore)  # undone after the test
    plain = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    # Plain torch listens on every interface whatever host it is given: the reason for all this.
    assert _listening(plain.port) - {"127.0.0.1", "::1"}
    store_cls = loopback_torchrun.install()
    server = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False, multi_tenant=True)
    assert isinstance(server, store_cls) and server.port
    assert _listening(server.port) == {"127.0.0.1"}
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    client.set("k", "v")
    assert server.get("k") == b"v"
    # A port already taken is torch's own "Address already in use" (torchrun retries on it).
    with pytest.raises(RuntimeError, match="^Address already in use$"):
        dist.TCPStore("127.0.0.1", server.port, is_master=True, wait_for_workers=False)


# --- what a step writes, and the stack's secrets, are not readable by other users ----------

@pytest.fixture
def _umask_022():
    old = os.umask(0o022)  # a usual login umask: 0644 files, 0755 folders
    yield
    os.umask(old)


WRITE_A_SECRET = (
    "import os, pathlib; ws = pathlib.Path(os.environ['ARF_WORKSPACE'])\n"
    "(ws / 'train').mkdir(); (ws / 'train' / 'custom_env.sh').write_text('secret')\n"
) + WRITE_RESULT


def test_a_steps_workspace_and_files_are_private(tmp_path, _umask_022):
    workspace = tmp_path / "workspace" / "dag" / "run"
    spec = StepSpec(**{**_spec(tmp_path, WRITE_A_SECRET).__dict__, "workspace": workspace,
                       "env": {"ARF_WORKSPACE": str(workspace),
                               "ARF_RESULT_PATH": str(workspace / "step" / "result.json")},
                       "result_path": workspace / "step" / "result.json"})
    LocalStepRunner().run(spec)
    assert workspace.stat().st_mode & 0o777 == 0o700
    assert (workspace / "train").stat().st_mode & 0o777 == 0o700
    assert (workspace / "train" / "custom_env.sh").stat().st_mode & 0o777 == 0o600


def test_an_existing_open_workspace_is_closed(tmp_path, _umask_022):
    workspace = tmp_path / "run"
    workspace.mkdir(mode=0o755)
    spec = StepSpec(**{**_spec(tmp_path, WRITE_RESULT).__dict__, "workspace": workspace})
    LocalStepRunner().run(spec)
    assert workspace.stat().st_mode & 0o777 == 0o700


def test_the_jwt_secret_is_never_readable_by_others(tmp_path, _umask_022, monkeypatch):
    from arf_training import embedded

    modes = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if "jwt_secret" in str(path):
            modes.append(os.fstat(fd).st_mode & 0o777)
        return fd

    monkeypatch.setattr(os, "open", spy)
    home = tmp_path / "airflow"
    home.mkdir()
    secret = embedded._jwt_secret(home)
    assert secret.stat().st_mode & 0o777 == 0o600 and modes == [0o600]
    assert len(secret.read_text()) >= 32
    first = secret.read_text()
    assert embedded._jwt_secret(home).read_text() == first  # created once
    assert [p.name for p in home.iterdir()] == ["jwt_secret"]  # no temporary file left


def test_the_jwt_secret_through_environment_is_0600(tmp_path, _umask_022, monkeypatch):
    from arf_training import embedded
    from arf_training.settings import ArfSettings

    monkeypatch.setenv("ARF_DB", "sqlite")
    settings = ArfSettings(home=tmp_path, tracking_uri="sqlite:///x.db", datahub_uri="hub",
                           artifact_root="art")
    seen = []
    real_write = Path.write_text

    def spy(self, data, *args, **kwargs):  # the mode the moment the secret is in the file
        result = real_write(self, data, *args, **kwargs)
        if self.name == "jwt_secret":
            seen.append(self.stat().st_mode & 0o777)
        return result

    monkeypatch.setattr(Path, "write_text", spy)
    env = embedded.environment(settings, start_database=False)
    path = tmp_path / "airflow" / "jwt_secret"
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == path.read_text().strip()
    assert all(mode == 0o600 for mode in seen) and path.stat().st_mode & 0o777 == 0o600



_RANK = """
import json, os, pathlib
import psutil
import torch, torch.distributed as td
from arf_trainer.trainer import dist
denv = dist.DistEnv.from_environ()
dist.init(denv)
port = int(os.environ["MASTER_PORT"])
seen = sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
t = torch.ones(1) * (denv.rank + 1)
td.all_reduce(t)
dist.teardown(denv)
out = pathlib.Path(os.environ["ARF_WORKSPACE"])
(out / f"rank-{denv.rank}.json").write_text(json.dumps({"listening": seen, "sum": t.item()}))
if denv.rank == 0:
    pathlib.Path(os.environ["ARF_RESULT_PATH"]).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(os.environ["ARF_RESULT_PATH"]).write_text("{}")
"""


def test_the_trainers_own_store_listens_on_loopback_when_its_master_is(tmp_path):
    """Several local nodes start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, so rank 0
    of the trainer hosts a store of its own: torch bound it on every interface although every
    peer reaches it through MASTER_ADDR=localhost."""
    spec = StepSpec(**{**_spec(tmp_path, _RANK, timeout=120).__dict__, "nodes": 2})
    LocalStepRunner().run(spec)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["listening"] == ["127.0.0.1"]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]
