"""`arf-trainer federate`: a real SuperLink + one SuperNode per site on loopback (Flower 1.42).

Runs in the federation venv (`make federation-venv`; ARF_FEDERATION_VENV overrides), because
Flower needs protobuf < 7. Each site's prepared shards lie in its own folder; the step trains
the global model and writes it in the train step's layout, tracked in MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


import pytest

from trainer_testkit import (
    fresh_tracking_uri,
    make_spec,
    prepare_reach,
    start_federate_step,
    step_environ,
)

REPO = Path(__file__).resolve().parents[2]
FED_VENV = Path(os.environ.get("ARF_FEDERATION_VENV") or REPO / ".federation-venv")
SITES = ["north", "south"]

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.skipif(
    not (FED_VENV / "bin" / "flwr").exists(),
    reason=f"no federation venv at {FED_VENV}: run `make federation-venv`")]


def _federate(tmp_path: Path, run_id: str, tracking: str) -> tuple[subprocess.CompletedProcess,
                                                                   Path]:
    workspace = tmp_path / run_id
    for i, site in enumerate(SITES):
        prepare_reach(workspace / "sites" / site, rows=200 + 100 * i)
    spec = make_spec("reach_bc", "federate", run_id=run_id,
                     hyperparameters={"hidden_size": 64, "num_layers": 2, "batch_size": 64},
                     training={"distributed": {"nodes": 1, "procs_per_node": 1}})
    # FedAvgM with server momentum and FedProx's term, as the shipped template (the momentum is
    # server state: a re-run must still be bitwise)
    spec["template"]["federated"] = {
        "sites": [{"name": s, "hub": f"/hubs/{s}", "query": None} for s in SITES],
        "rounds": 2, "strategy": "fedavgm", "fraction_fit": 1.0, "min_sites": 2,
        "local_epochs": 1, "proximal_mu": 0.01, "server_momentum": 0.7, "server_lr": None}
    spec_path = workspace / "federate.json"
    spec_path.write_text(json.dumps(spec))
    env = step_environ(spec_path, workspace, tracking, tmp_path / "artifacts", run_id,
                       step="federate")
    proc = subprocess.run([str(FED_VENV / "bin" / "arf-trainer"), "federate"], env=env,
                          capture_output=True, text=True, timeout=1500)
    return proc, workspace


def test_federate_trains_a_global_model_and_reruns_bitwise(tmp_path):
    tracking = fresh_tracking_uri(tmp_path / "mlflow")
    first, ws1 = _federate(tmp_path, "run1", tracking)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((ws1 / "train" / "result.json").read_text())
    assert result["federated"]["rounds"] == 2
    assert set(result["federated"]["sites"]) == set(SITES)
    assert result["federated"]["sites"]["south"]["train_rows"] == 270  # 300 rows, 10 % val
    assert (ws1 / "train" / "model.pt").is_file()
    # TLS on the SuperLink, with a CA made for this step
    assert (ws1 / "federate" / "tls" / "ca.pem").is_file()
    assert "https://127.0.0.1" in (ws1 / "federate" / "superlink.log").read_text()
    rounds = json.loads((ws1 / "federate" / "rounds.json").read_text())["rounds"]
    assert [len(r["sites"]) for r in rounds] == [2, 2]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    run = client.get_run(result["mlflow_run_id"])
    assert set(json.loads(run.data.tags["arf.federated.sites"])) == set(SITES)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "round_bytes")] == [1, 2]
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert {c.data.tags["arf.federated.site"] for c in children} == set(SITES)

    _assert_pooled_normalization(ws1)

    second, ws2 = _federate(tmp_path, "run2", tracking)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = json.loads((ws2 / "train" / "result.json").read_text())
    assert again["weights_sha256"] == result["weights_sha256"]  # bitwise re-run


def _assert_pooled_normalization(workspace: Path) -> None:
    """The global model standardizes with the statistics of the union of the sites' training
    rows (what central training computes), from the sites' statistics before round 1."""
    import numpy as np
    import torch

    from arf_trainer.trainer.data import feature_matrix, load_manifest, read_split
    from arf_trainer.trainer.recipes import mean_std

    xs, ys = [], []
    for site in SITES:
        manifest = load_manifest(workspace / "sites" / site / "prepare")
        columns = read_split(manifest, "train", manifest.features + manifest.targets)
        xs.append(feature_matrix(columns, manifest.features))
        ys.append(feature_matrix(columns, manifest.targets))
    weights = torch.load(workspace / "train" / "model.pt", weights_only=True)
    for prefix, rows in (("input", xs), ("output", ys)):
        mean, std = mean_std(np.concatenate(rows))
        # the same buffers every round; only FedAvg's float32 weighted mean may round them
        torch.testing.assert_close(weights[f"{prefix}_mean"], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights[f"{prefix}_std"], std, rtol=1e-5, atol=1e-6)


def _flower_processes(home: str) -> list[int]:
    """Processes whose environment names this step's FLWR_HOME (every Flower process it ran)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"FLWR_HOME={home}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_stopped_federate_step_leaves_no_flower_process(tmp_path):
    import signal
    import time

    proc, workspace = start_federate_step(tmp_path, "stop", SITES, rounds=50)
    home = str(workspace / "federate" / "flwr-home")
    deadline = time.monotonic() + 900
    while len(_flower_processes(home)) < 4 and time.monotonic() < deadline:  # link, 2 nodes, +
        time.sleep(1)
    assert len(_flower_processes(home)) >= 4, "the federation did not start"
    proc.send_signal(signal.SIGTERM)  # what the local backend sends first
    assert proc.wait(timeout=120) != 0
    time.sleep(2)
    assert _flower_processes(home) == []


INTRUDER = r'''
import json, subprocess, sys, time
from pathlib import Path
from arf_trainer.federated.launch import Federation, _free_port
from arf_trainer.federated.tls import make_node_key

work = Path(sys.argv[1])
fed = Federation(work, [{"name": "north", "index": 0, "data_dir": work / "north"}])
try:
    fed.start()  # the SuperLink, north's key registered, north's SuperNode
    key = make_node_key(work / "intruder", "intruder")  # a valid key nobody registered
    intruders = {name: fed._start(f"supernode-{name}", [
        str(fed.bin / "flower-supernode"), "--root-certificates", str(fed.certs["ca"]),
        "--superlink", f"127.0.0.1:{fed.port}", *extra, "--host", "127.0.0.1",
        "--port", str(_free_port())])
        for name, extra in (("unregistered", ["--auth-supernode-private-key", str(key["key"])]),
                            ("keyless", []))}  # Flower's default: it registers itself
    deadline = time.monotonic() + 90
    while any(p.poll() is None for p in intruders.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    # The SuperLink's node list is closed to every local process (apps._refuse_control_calls),
    # so its refusal is reported, not a list.
    listing = subprocess.run([str(fed.bin / "flwr"), "supernode", "list", "arf", "--format",
                              "json"], env=fed.environment(), capture_output=True, text=True,
                             cwd=work)
    print(json.dumps({"exits": {n: p.poll() for n, p in intruders.items()},
                      "listing": listing.stdout + listing.stderr,
                      "north_running": fed.procs["supernode-north"].poll() is None}))
finally:
    fed.stop()
'''


def test_the_superlink_admits_registered_supernodes_only(tmp_path):
    """Node authentication: the step registers each site's key; a SuperNode with any other key
    (valid TLS, valid key format) fails to activate, one without a key (Flower's default, which
    registers itself) is refused too, and no Flower process outlives stop()."""
    work = tmp_path / "federate"
    work.mkdir()
    script = tmp_path / "intruder.py"
    script.write_text(INTRUDER)
    proc = subprocess.run([str(FED_VENV / "bin" / "python"), str(script), str(work)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "training_container")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("unregistered", "keyless"):
        assert report["exits"][name] not in (None, 0), report  # refused: it exited (code 305)
    assert "Failed to activate SuperNode" in (work / "supernode-unregistered.log").read_text()
    assert "All SuperNodes must be registered" in (work / "supernode-keyless.log").read_text()
    assert "refused the Control API call ListNodes" in report["listing"], report
    assert report["north_running"]
    assert "SuperNode authentication is disabled" not in (work / "superlink.log").read_text()
    assert _flower_processes(str(work / "flwr-home")) == []
