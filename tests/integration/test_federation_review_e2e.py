"""The real SuperLink of `arf-trainer federate` (Flower 1.42, loopback) against a foreign caller.

Flower's Control API authenticates no caller: before the guard (apps.superlink_main), any
process that reached the port ran its own app with `flwr run`, whose ClientApp read every
site's shards inside the SuperNodes and sent them back; `flwr supernode register` admitted any
key. Slow (one federation); runs in the federation venv (`make federation-venv`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from trainer_testkit import start_federate_step

REPO = Path(__file__).resolve().parents[2]
FED_VENV = Path(os.environ.get("ARF_FEDERATION_VENV") or REPO / ".federation-venv")

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.skipif(
    not (FED_VENV / "bin" / "flwr").exists(),
    reason=f"no federation venv at {FED_VENV}: run `make federation-venv`")]

FOREIGN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreign"
version = "1.0.0"
description = "reads the sites' shards"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "foreign"

[tool.flwr.app.components]
serverapp = "foreign:server_app"
clientapp = "foreign:client_app"

[tool.flwr.app.config]
"""
FOREIGN_APP = """\
import json
from pathlib import Path
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server_app = ServerApp()
client_app = ClientApp()

@server_app.main()
def main(grid, context):
    replies = grid.send_and_receive([Message(RecordDict({"c": ConfigRecord({"x": 1})}), node,
                                             MessageType.QUERY) for node in grid.get_node_ids()])
    Path(STOLEN).write_text(json.dumps([dict(r.content["rows"]) for r in replies
                                        if not r.has_error()]))

@client_app.query()
def rows(msg, context):
    shard = sorted(Path(str(context.node_config["data-dir"])).rglob("*.parquet"))[0]
    return Message(RecordDict({"rows": ConfigRecord({"shard": shard.read_bytes().hex()})}),
                   reply_to=msg)
"""


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    # COLUMNS: Flower's error boxes would cut the message short
    env = {**os.environ, "FLWR_HOME": str(home), "COLUMNS": "400"}
    return subprocess.run([str(FED_VENV / "bin" / "flwr"), *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=home)


def test_a_foreign_caller_can_neither_run_its_app_nor_register_a_supernode(tmp_path):
    proc, workspace = start_federate_step(
        tmp_path, "review", ["north", "south"], rounds=3, timeout_minutes=5,
        hyperparameters={"hidden_size": 16, "num_layers": 1, "batch_size": 64},
        log=tmp_path / "step.log")
    federate = workspace / "federate"
    try:
        deadline = time.monotonic() + 300
        while "[ROUND 1/" not in ((federate / "flwr-run.log").read_text(errors="replace")
                                  if (federate / "flwr-run.log").is_file() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "step.log").read_text()[-3000:]
            time.sleep(0.2)
        # The caller knows the address and trusts the CA (the server's certificate is no
        # secret); it has no key of the step's and no account.
        caller = tmp_path / "caller"
        (caller / "app").mkdir(parents=True)
        stolen = tmp_path / "stolen.json"
        (caller / "app" / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
        (caller / "app" / "foreign.py").write_text(f"STOLEN = {str(stolen)!r}\n" + FOREIGN_APP)
        shutil.copy(federate / "flwr-home" / "config.toml", caller / "config.toml")
        run = _flwr(caller, "run", str(caller / "app"), "arf", "--stream")
        assert "only the step's own run" in run.stdout + run.stderr, run.stdout[-2000:]
        subprocess.run([str(FED_VENV / "bin" / "python"), "-c",
                              "import sys; from pathlib import Path; from arf_trainer.federated."
                              "tls import make_node_key; make_node_key(Path(sys.argv[1]), 'x')",
                              str(caller / "keys")], check=True)
        register = _flwr(caller, "supernode", "register", str(caller / "keys" / "x.pub"), "arf")
        assert "not one of the sites' keys" in register.stdout + register.stderr, \
            register.stdout[-2000:]
        # Nor list the runs and sites (their ids, the run's config), stop the step's run or
        # drop a site, even with their ids (64-bit random: `flwr ls` was the way to learn them).
        run_id = re.search(r"started run (\d+)", (federate / "flwr-run.log").read_text()).group(1)
        node_id = re.search(r"Created node_id=(\d+)",
                            (federate / "superlink.log").read_text(errors="replace")).group(1)
        for args, call in ((("ls", "arf"), "ListRuns"), (("supernode", "ls", "arf"), "ListNodes"),
                           (("stop", run_id, "arf"), "StopRun"),
                           (("supernode", "unregister", node_id, "arf"), "UnregisterNode")):
            answer = _flwr(caller, *args)
            assert f"refused the Control API call {call}" in answer.stdout + answer.stderr, \
                f"{args}: {answer.stdout[-2000:]} {answer.stderr[-2000:]}"
        code = proc.wait(timeout=600)
    finally:  # SIGTERM: the step then stops its Flower processes (SIGKILL would orphan them)
        proc.terminate()
        proc.wait(timeout=60)
    output = (tmp_path / "step.log").read_text()
    assert code == 0, output[-4000:]  # the step's own run went on, and finished
    assert not stolen.exists()
    link = (federate / "superlink.log").read_text(errors="replace")
    assert "refused a run of app 'foreign/foreign'" in link
    assert "refused the SuperNode key" in link
    assert (workspace / "train" / "model.pt").is_file()
