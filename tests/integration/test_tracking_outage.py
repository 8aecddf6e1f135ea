"""Tracking outages lose nothing: a real `mlflow server` hung, killed and restarted under a real
`arf-trainer train`; then `register`, after which every spooled metric point is in MLflow once.

Note: MLflow's SQL store itself drops a metric point identical in (key, step, timestamp, value)
to one already stored, so this test cannot see a double send; tests/unit/test_tracking_spool.py
checks the de-duplication against a store that appends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from trainer_testkit import (
    VENV_BIN,
    fresh_tracking_uri,
    make_env,
    make_spec,
    prepare_digits,
    step_environ,
)

from arf_trainer.publisher import run_register
from arf_trainer.spec import read_json

pytestmark = pytest.mark.integration

HTTP_TIMEOUT_S = 2  # the trainer's MLFLOW_HTTP_REQUEST_TIMEOUT here (5 s by default)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class MlflowServer:
    """`mlflow server` on a sqlite store, in its own process group (killpg stops it all)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.store = fresh_tracking_uri(folder)  # an already migrated database
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "server.log", "ab")
        # The job runner (a dozen huey workers) is not needed and doubles the start time.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", self.store,
             "--default-artifact-root", str(self.folder / "server-artifacts"),
             "--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1], "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        wait_for(self.healthy, 120, f"mlflow server at {self.uri}")

    def healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            (self.folder / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.kill()


class Trainer:
    """`arf-trainer train` in the background, its output lines timestamped as they come."""

    def __init__(self, tmp: Path, name: str, tracking_uri: str, epochs: int,
                 step_delay_s: float = 0.0) -> None:
        self.workspace = tmp / name
        prepare_digits(self.workspace)
        spec = make_spec("digits_smoke", run_id=f"manual__{name}",
                         hyperparameters={"epochs": epochs, "hidden_size": 32})
        spec_path = tmp / f"{name}-spec.json"
        spec_path.write_text(json.dumps(spec))
        env = step_environ(spec_path, self.workspace, tracking_uri, tmp / "artifacts",
                           f"manual__{name}")
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(HTTP_TIMEOUT_S)
        env["ARF_TRACKING_SEND_INTERVAL_S"] = "1"  # 5 s by default; keeps the test short
        if step_delay_s:
            env["ARF_TEST_STEP_DELAY_S"] = str(step_delay_s)
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen([str(VENV_BIN / "arf-trainer"), "train"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def epochs_after(self, t: float) -> int:
        return sum(1 for when, line in list(self.lines) if when >= t and "| step " in line)

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait(self, timeout: float) -> float:
        """Wait for the process; return its wall time."""
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert self.proc.returncode == 0, f"train failed:\n{self.output()[-5000:]}"
        return time.monotonic() - self.started

    @property
    def acked(self) -> dict[str, Any]:
        path = self.workspace / "train" / "tracking-spool.acked"
        return read_json(path) if path.is_file() else {}

    def spool(self) -> list[dict[str, Any]]:
        text = (self.workspace / "train" / "tracking-spool.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]


def register(tmp: Path, name: str, workspace: Path, tracking_uri: str) -> dict[str, Any]:
    spec = make_spec("digits_smoke", "register", run_id=f"manual__{name}",
                     hyperparameters={"hidden_size": 32})
    return run_register(make_env(spec, workspace, tracking_uri, tmp / "artifacts"))


def assert_everything_arrived_once(trainer: Trainer, tracking_uri: str) -> Any:
    """Every spooled metric point is in the run exactly once; params, tags, status are there."""
    from mlflow import MlflowClient

    records = trainer.spool()
    result = read_json(trainer.workspace / "train" / "result.json")
    assert trainer.acked["acked"] == records[-1]["seq"]  # nothing left to send
    assert trainer.acked["run_id"] == result["mlflow_run_id"] is not None
    client = MlflowClient(tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    points = [(r["key"], r["step"], r["ts"], r["value"]) for r in records
              if r["kind"] == "metric"]
    assert len(points) > 50
    for key in {p[0] for p in points}:
        sent = Counter(p[1:] for p in points if p[0] == key)
        history = Counter((m.step, m.timestamp, m.value)
                          for m in client.get_metric_history(run.info.run_id, key))
        assert history == sent, key
    for record in records:
        if record["kind"] == "param":
            assert run.data.params[record["key"]] == record["value"]
    last_tags = {r["key"]: r["value"] for r in records if r["kind"] == "tag"}
    assert {k: run.data.tags.get(k) for k in last_tags} == last_tags
    assert run.data.tags["arf.weights_sha256"] == result["weights_sha256"]
    assert run.info.status == "FINISHED"
    assert run.inputs.dataset_inputs[0].dataset.name == "digits_smoke-train"
    return run


def test_training_rides_out_a_hung_then_dead_server(tmp_path: Path,
                                                    server: MlflowServer) -> None:
    trainer = Trainer(tmp_path, "outage", server.uri, epochs=50, step_delay_s=0.008)
    wait_for(lambda: trainer.epochs_after(0) >= 1, 120, "the first epoch")
    assert trainer.acked.get("run_id"), "the run is created before training while MLflow is up"

    # Hang: the server accepts connections but answers nothing; requests time out, and the
    # server applies them later, after SIGCONT (sent, applied, never acknowledged).
    server.signal(signal.SIGSTOP)
    hung_at = time.monotonic()
    time.sleep(HTTP_TIMEOUT_S + 1)
    acked_in_hang = trainer.acked["acked"]
    server.signal(signal.SIGCONT)
    # A synchronous logger would have been stuck for a whole timeout at the first epoch end.
    assert trainer.epochs_after(hung_at) - trainer.epochs_after(hung_at + HTTP_TIMEOUT_S) >= 2
    wait_for(lambda: trainer.acked["acked"] > acked_in_hang, 30, "delivery after the hang")

    # Dead: the rest of training, its end and the final drain happen with no server at all.
    server.kill()
    assert trainer.proc.poll() is None, "training ended before the outage; raise epochs"
    died_at = time.monotonic()
    epochs_before = trainer.epochs_after(0)
    trainer.wait(timeout=120)
    last_epoch_at = max(when for when, line in trainer.lines if "| step " in line)
    assert trainer.epochs_after(died_at) >= 1 and epochs_before < 50
    assert time.monotonic() - last_epoch_at < 15, "the final drain must not wait for MLflow"
    out = trainer.output()
    assert "is unreachable" in out and "re-sending records" in out, out[-5000:]
    assert trainer.acked["acked"] < trainer.spool()[-1]["seq"]  # left for register

    server.start()  # same port, same database
    registered = register(tmp_path, "outage", trainer.workspace, server.uri)
    run = assert_everything_arrived_once(trainer, server.uri)
    assert registered["training_run_id"] == run.info.run_id


def test_run_is_created_by_register_when_mlflow_was_down_throughout(
        tmp_path: Path, server: MlflowServer) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    trainer = Trainer(tmp_path, "down", nowhere, epochs=12)
    wall = trainer.wait(timeout=120)
    result = read_json(trainer.workspace / "train" / "result.json")
    assert result["mlflow_run_id"] is None and not trainer.acked.get("run_id")
    assert wall < 90

    registered = register(tmp_path, "down", trainer.workspace, server.uri)
    run = assert_everything_arrived_once(trainer, server.uri)
    assert registered["training_run_id"] == run.info.run_id
    assert read_json(trainer.workspace / "train" / "result.json")["mlflow_run_id"] == \
        run.info.run_id
    # Dated when training started, not when register created it.
    first = trainer.spool()[0]
    assert first["kind"] == "run" and run.info.start_time == first["ts"]
    assert run.info.run_name == "arf_digits_smoke/manual__down"
