"""A SuperNode killed mid-round, in the real `arf-trainer federate` step (Flower 1.42, loopback).

The round the dead site was in completes with the other sites when `federated.min_sites` allows
(Flower answers for the vanished node with a "node unavailable" error once its heartbeats stop,
about 60 s), else the step fails naming min_sites; meanwhile the step restarts the SuperNode
under a new node identity and the site rejoins the next round. Slow (each case waits out
Flower's heartbeat expiry); runs in the federation venv (`make federation-venv`).
"""

from __future__ import annotations

import os
import signal
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


def _start(tmp_path: Path, sites: list[str], rounds: int, min_sites: int
           ) -> tuple[subprocess.Popen, Path]:
    return start_federate_step(
        tmp_path, "faults", sites, rounds=rounds, min_sites=min_sites, timeout_minutes=10,
        hyperparameters={"hidden_size": 64, "num_layers": 1, "batch_size": 64},
        log=tmp_path / "step.log")


def _supernodes(home: Path, site: str) -> list[int]:
    """The flower-supernode processes of `site` in the federation whose FLWR_HOME is `home`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ, cmdline = (proc / "environ").read_bytes(), (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"FLWR_HOME={home}\0".encode() in environ + b"\0" and b"flower-supernode" in cmdline \
                and f'site="{site}"'.encode() in cmdline:
            found.append(int(proc.name))
    return found


def _wait_round(proc: subprocess.Popen, log: Path, round_: int) -> str:
    """The ServerApp's log once it has started round `round_`."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if f"[ROUND {round_}/" in text:
            return text
        time.sleep(0.2)
    pytest.fail(f"round {round_} never started; step exit {proc.poll()}; "
                f"{log.read_text(errors='replace')[-2000:] if log.is_file() else ''}")


def _kill(workspace: Path, *sites: str) -> None:
    for site in sites:
        (pid,) = _supernodes(workspace / "federate" / "flwr-home", site)
        os.kill(pid, signal.SIGKILL)


def _round_lines(text: str, round_: int) -> str:
    return text.split(f"[ROUND {round_}/", 1)[1].split("[ROUND ", 1)[0]


def test_killed_supernodes_rounds_continue_above_min_sites_rejoin_and_fail_below(tmp_path):
    """One federation (3 sites, min_sites 2), to pay Flower's ~60 s heartbeat expiry twice only:
    south dies in round 2, which completes with north and west; the step restarts south, which
    is sampled again in round 3; west and south die in round 3, which leaves one reply, fewer
    than min_sites, and the step fails saying so."""
    proc, workspace = _start(tmp_path, ["north", "south", "west"], rounds=4, min_sites=2)
    log = workspace / "federate" / "flwr-run.log"
    try:
        _wait_round(proc, log, 2)
        _kill(workspace, "south")
        text = _wait_round(proc, log, 3)
        _kill(workspace, "west", "south")
        code = proc.wait(timeout=900)
    finally:
        proc.kill()
    output = (tmp_path / "step.log").read_text()
    text = log.read_text(errors="replace")
    # Round 2: the dead site is a failure, the others are aggregated.
    assert "round 2: 2 site(s) replied (site indices [0, 2]), 1 failed" in \
        _round_lines(text, 2), text[-3000:]
    # The step restarted south under a new identity; round 3 sampled all three sites again.
    assert "restarting it under a new node identity (1 of 3)" in output
    assert "Sampled 3 nodes (out of 3)" in _round_lines(text, 3), text[-3000:]
    # Round 3: one reply is below min_sites=2: the step fails and says why.
    assert code != 0, output[-4000:]
    assert "round 3: 1 site(s) replied (2 failed), fewer than federated.min_sites=2" in output, \
        output[-4000:]
    assert not (workspace / "train" / "model.pt").exists()
