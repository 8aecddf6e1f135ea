"""`arf-trainer federate`: one SuperLink and one SuperNode per site on loopback, then `flwr run`.

Layout (inside the DAG run's workspace)::

    sites/<site>/prepare/     each site's prepared shards (its own prepare task wrote them);
                              SuperNode <site> is given this folder and no other
    federate/                 plan.json, initial.pt, global.pt, rounds.json, the Flower logs
    train/                    model.pt, model_info.json, result.json: the train step's layout,
                              so that register and evaluate work unchanged

This process reads each site's manifest (column names, table versions, fingerprint: metadata,
never rows; from the job spec when given, else the site's manifest.json: manifests.py) for the
model shape and the lineage, and tracks the federation in
MLflow: the DAG run's run holds per-round aggregated metrics, bytes exchanged and every site's
sample counts; one nested run per site holds that site's per-round losses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from arf_trainer.errors import TrainingError
from arf_trainer.spec import StepEnv

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
MAX_RESTARTS = 3  # per site and federate step: a SuperNode that keeps dying is left down
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "arf-federated"
version = "1.0.0"
description = "arf-trainer federate: the ServerApp and ClientApp of arf_trainer.federated.apps"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "arf"

[tool.flwr.app.components]
serverapp = "arf_trainer.federated.apps:server_app"
clientapp = "arf_trainer.federated.apps:client_app"

[tool.flwr.app.config]
work-dir = ""
"""


def site_dirs(env: StepEnv) -> list[dict[str, Any]]:
    """[{name, index, data_dir, manifest}] of the template's sites, from the job spec's inputs.

    `manifest`: the site's manifest metadata when the job spec gives it (Kubernetes: this pod
    mounts no site's folder; see manifests.py), else None (read from `data_dir`)."""
    sites = env.spec.template["federated"]["sites"]
    given = {s["name"]: s for s in env.spec.inputs.get("sites", [])}
    return [{"name": s["name"], "index": i,
             "data_dir": Path(given.get(s["name"], {}).get("data_dir") or
                              env.workspace / "sites" / s["name"] / "prepare"),
             "manifest": given.get(s["name"], {}).get("manifest")}
            for i, s in enumerate(sites)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrainingError(f"{what} exited with code {proc.returncode} before listening; "
                                f"its log ({logfile}):\n{_tail(logfile)}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TrainingError(f"{what} did not listen on 127.0.0.1:{port} within "
                        f"{STARTUP_TIMEOUT_S:.0f} s; its log ({logfile}):\n{_tail(logfile)}")


def _listen_address(external: bool) -> tuple[str, int, str]:
    """(bind host, port, the address `flwr run` dials). Locally loopback on a free port; with
    external SuperNodes (a pod) ARF_FEDERATION_LISTEN, e.g. 0.0.0.0:9092, and
    ARF_FEDERATION_ADVERTISE, the name the server certificate is for (the Service's)."""
    if not external:
        return "127.0.0.1", _free_port(), "127.0.0.1"
    listen = os.environ.get("ARF_FEDERATION_LISTEN", "0.0.0.0:9092")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise TrainingError(f"ARF_FEDERATION_LISTEN={listen!r} is not host:port; write e.g. "
                            "0.0.0.0:9092")
    return host, int(port), os.environ.get("ARF_FEDERATION_ADVERTISE", "127.0.0.1")


def _certificates(work: Path, external: bool) -> dict[str, Path]:
    """TLS on the SuperLink's one HTTP port (Fleet, Control and Runtime APIs). Locally a CA
    made for this step only, which the SuperNodes and `flwr run` trust and nothing else; with
    external SuperNodes the deployment's (a mounted Secret: ca.crt, tls.crt, tls.key)."""
    if not external:
        from arf_trainer.federated.tls import make_loopback_certificates

        return make_loopback_certificates(work / "tls")
    folder = Path(os.environ.get("ARF_FEDERATION_TLS_DIR", "/etc/arf/federation-tls"))
    certs = {"ca": folder / "ca.crt", "cert": folder / "tls.crt", "key": folder / "tls.key"}
    missing = [str(p) for p in certs.values() if not p.is_file()]
    if missing:
        raise TrainingError(f"the SuperLink's TLS files {missing} are missing: mount the "
                            "federation's TLS Secret (ca.crt, tls.crt, tls.key) at "
                            f"ARF_FEDERATION_TLS_DIR ({folder})")
    return certs


def _node_keys(work: Path, sites: list[dict[str, Any]], external: bool
               ) -> dict[str, dict[str, Path]]:
    """{site: {"pub", and locally "key"}}. Locally a fresh key pair per site (work/tls, 0600);
    with external SuperNodes each site's pod holds its own private key, and the SuperLink
    reads the public keys `<site>.pub` from ARF_FEDERATION_NODE_KEYS_DIR (a ConfigMap)."""
    if not external:
        from arf_trainer.federated.tls import make_node_key

        return {s["name"]: make_node_key(work / "tls", f"node-{s['name']}") for s in sites}
    folder = Path(os.environ.get("ARF_FEDERATION_NODE_KEYS_DIR", "/etc/arf/federation-nodes"))
    keys = {s["name"]: {"pub": folder / f"{s['name']}.pub"} for s in sites}
    missing = sorted(str(k["pub"]) for k in keys.values() if not k["pub"].is_file())
    if missing:
        raise TrainingError(f"SuperNode public keys {missing} are missing: mount each site's "
                            "public key as <site>.pub at ARF_FEDERATION_NODE_KEYS_DIR "
                            f"({folder}); the SuperLink admits registered SuperNodes only")
    return keys


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Federation:
    """The SuperLink and SuperNode processes of one federate step (each in its own session)."""

    def __init__(self, work: Path, sites: list[dict[str, Any]]):
        self.work, self.sites = work, sites
        self.bin = Path(sys.executable).parent
        self.home = work / "flwr-home"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.certs: dict[str, Path] = {}
        self.keys: dict[str, dict[str, Path]] = {}
        self.restarts: dict[str, int] = {}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # flower-superlink starts flower-superexec, flwr-serverapp and flwr-clientapp by name.
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", "/usr/bin:/bin")])
        env["FLWR_HOME"] = str(self.home)
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["OMP_NUM_THREADS"] = "1"
        return env

    def _start(self, name: str, command: list[str], env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        logfile = self.work / f"{name}.log"
        handle = open(logfile, "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**self.environment(), **(env or {})},
                                cwd=self.work, start_new_session=True)
        handle.close()
        self.procs[name] = proc
        return proc

    def _app(self) -> str:
        """Write the Flower app folder `flwr run` submits; the sha256 of the FAB it builds
        from it (Flower's build is deterministic: the SuperLink is pinned to it in advance)."""
        from flwr.cli.build import build_fab_from_disk

        app = self.work / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        return hashlib.sha256(build_fab_from_disk(app)).hexdigest()

    def start(self) -> None:
        from arf_trainer.federated import apps

        self.home.mkdir(parents=True, exist_ok=True)
        external = os.environ.get("ARF_FEDERATION_SUPERNODES") == "external"
        host, port, advertise = _listen_address(external)
        self.port = port
        self.certs = _certificates(self.work, external)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "arf"\n\n[superlink.arf]\n'
            f'address = "{advertise}:{self.port}"\n'
            f'root-certificates = {json.dumps(str(self.certs["ca"]))}\n')
        fab_sha256 = self._app()
        keys_dir = (Path(os.environ.get("ARF_FEDERATION_NODE_KEYS_DIR",
                                        "/etc/arf/federation-nodes")) if external
                    else self.work / "tls")
        # SuperNode authentication: the SuperLink admits only nodes whose public key was
        # registered through its Control API (below); any other node fails to activate. The
        # guard (apps.superlink_main) refuses any other key, and any run but this step's.
        link = self._start("superlink", [
            sys.executable, "-c", "from arf_trainer.federated.apps import superlink_main; "
            "superlink_main()", "--ssl-certfile", str(self.certs["cert"]),
            "--ssl-keyfile", str(self.certs["key"]), "--ssl-ca-certfile", str(self.certs["ca"]),
            "--host", host, "--port", str(self.port), "--database", ":flwr-in-memory:",
            "--enable-supernode-auth"], env={
                apps.PINNED_FAB: fab_sha256, apps.ADMITTED_KEYS: str(keys_dir),
                apps.PINNED_RUN_CONFIG: json.dumps(self.run_config())})
        _wait_port(self.port, link, "the Flower SuperLink", self.work / "superlink.log")
        self.keys = _node_keys(self.work, self.sites, external)
        self.register({name: keys["pub"] for name, keys in self.keys.items()})
        if external:  # Kubernetes: one SuperNode pod per site dials the Service
            return
        for site in self.sites:
            self.start_supernode(site)

    def run_config(self) -> dict[str, str]:
        return {"work-dir": str(self.work)}

    def register(self, public_keys: dict[str, Path]) -> None:
        """`flwr supernode register` of each site's public key (run side by side)."""
        runs = {name: subprocess.Popen(
            [str(self.bin / "flwr"), "supernode", "register", str(pub), "arf", "--name", name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.environment(), cwd=self.work, text=True)
            for name, pub in public_keys.items()}
        for name, run in runs.items():
            out, _ = run.communicate(timeout=STARTUP_TIMEOUT_S)
            if run.returncode != 0:
                raise TrainingError(f"registering site {name!r}'s SuperNode key "
                                    f"({public_keys[name]}) with the SuperLink failed (exit "
                                    f"{run.returncode}):\n{out}")

    def start_supernode(self, site: dict[str, Any]) -> subprocess.Popen:
        # node config: TOML values. The data folder is the only site data the node is given.
        config = (f'data-dir={json.dumps(str(site["data_dir"]))} '
                  f'site={json.dumps(site["name"])} site-index={site["index"]}')
        return self._start(f"supernode-{site['name']}", [
            str(self.bin / "flower-supernode"), "--root-certificates", str(self.certs["ca"]),
            "--superlink", f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key", str(self.keys[site["name"]]["key"]),
            "--host", "127.0.0.1", "--port", str(_free_port()), "--node-config", config])

    def run_app(self, timeout_s: float) -> None:
        app = self.work / "app"  # written by start(), whose FAB the SuperLink admits
        command = [str(self.bin / "flwr"), "run", str(app), "arf", "--stream", "--run-config",
                   " ".join(f"{k}={json.dumps(v)}" for k, v in self.run_config().items())]
        log.info("$ %s", " ".join(command))
        runner = self._start("flwr-run", command)
        deadline = time.monotonic() + timeout_s
        while runner.poll() is None:
            if time.monotonic() > deadline:
                raise TrainingError(f"the federation did not finish within {timeout_s:.0f} s "
                                    f"(training.timeout_minutes); ServerApp log:\n"
                                    f"{_tail(self.work / 'flwr-run.log')}")
            self.revive()
            time.sleep(0.5)

    def revive(self) -> None:
        """Restart each local SuperNode that exited while the federation runs: the site rejoins.

        Under a fresh key, registered like the first, so the SuperLink gives it a new node id.
        Re-activating the old identity would bring back a node the SuperLink still counts as
        online (Flower 1.42 marks a node offline after two missed 30 s heartbeats), and the
        round the dead node was in would wait for its reply until the round timeout. Under a
        new id, that round gets Flower's "node unavailable" reply once the old id expires and
        completes with the other sites if federated.min_sites allows (apps.py); later rounds
        sample the new node.
        """
        from arf_trainer.federated.tls import make_node_key

        for site in self.sites:
            name = site["name"]
            proc = self.procs.get(f"supernode-{name}")
            if proc is None or proc.poll() is None or self.restarts.get(name, 0) >= MAX_RESTARTS:
                continue
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.warning("the SuperNode of site %r exited with code %s; restarting it under a "
                        "new node identity (%d of %d)", name, proc.returncode,
                        self.restarts[name], MAX_RESTARTS)
            self.keys[name] = make_node_key(self.work / "tls",
                                            f"node-{name}-{self.restarts[name]}")
            self.register({name: self.keys[name]["pub"]})
            self.start_supernode(site)

    def stop(self) -> None:
        """Stop every Flower process of this step, grandchildren included.

        flower-superlink and flower-supernode start flower-superexec detached (own session),
        which starts flwr-serverapp/flwr-clientapp: a process-group kill misses them, and a
        SuperNode may ignore SIGTERM while it retries. So: all descendants, SIGTERM, a short
        wait, then SIGKILL. A SuperNode that died (killed, or refused by the SuperLink) leaves
        its flower-superexec orphaned, outside that tree: those are found by this step's
        FLWR_HOME in their environment.
        """
        pids = _descendants({p.pid for p in self.procs.values()} | _with_home(self.home))
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            for proc in self.procs.values():
                proc.poll()  # reap our direct children
            time.sleep(0.2)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(roots: set[int]) -> list[int]:
    """`roots` and every process below them (Linux /proc; elsewhere just the roots)."""
    tree, found, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(tree.get(pid, []))
    return found


def _with_home(home: Path) -> set[int]:
    """Processes whose environment names FLWR_HOME=`home` (Linux /proc; else none)."""
    marker, found = f"FLWR_HOME={home}\0".encode(), set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes() + b"\0":
                found.add(int(environ.parent.name))
        except OSError:
            continue
    found.discard(os.getpid())
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
