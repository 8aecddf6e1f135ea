"""helm_values/workspace-janitor.yaml: the CronJob that sweeps the run workspace on a cluster.

Strict schema validation, the same pod security as the step pods, the volume and root that
airflow.yaml gives the steps, and its command run for real on a folder (checkov scans the file
with rbac.yaml: tests/unit/test_k8s_scanners.py). No cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from arf_trainer.dag_run_dir import claim
from arf_training.kubernetes.pod import RUN_AS_UID, restricted_container_security_context
from arf_training.stepspec import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "helm_values"
DAY = 86400


def _cronjob() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((VALUES / "workspace-janitor.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["CronJob"]
    return docs[0]


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["jobTemplate"]["spec"]["template"]


def _airflow_env() -> dict[str, str]:
    values = yaml.safe_load((VALUES / "airflow.yaml").read_text())
    return {e["name"]: e["value"] for e in values["env"] if "value" in e}


def _training_service_account() -> str:
    docs = yaml.safe_load_all((VALUES / "rbac.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_the_cronjob_strict_validates(version):
    kubernetes_validate.validate(_cronjob(), version, strict=True)


def test_the_pod_is_locked_down_like_the_step_pods():
    job = _cronjob()
    assert job["metadata"]["namespace"] == "arf-training"
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod(job)
    spec = pod["spec"]
    assert pod["metadata"]["labels"]["arf.dev/egress"] == "none"  # rbac.yaml: namespace only
    assert spec["serviceAccountName"] == _training_service_account()
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == RUN_AS_UID  # owns what the steps wrote
    assert "fsGroup" not in spec["securityContext"]  # no recursive chown of the whole volume
    [box] = spec["containers"]
    assert box["securityContext"] == restricted_container_security_context()
    assert box["image"] == DEFAULT_IMAGE
    assert box["resources"]["limits"]["memory"] and box["resources"]["limits"]["cpu"]


def test_it_sweeps_the_volume_and_root_the_steps_write_to():
    env, spec = _airflow_env(), _pod(_cronjob())["spec"]
    [box] = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
    root = box["command"][3]
    assert box["command"][:3] == ["python", "-m", "arf_training.workspace_janitor"]
    assert root == env["ARF_WORKSPACE_ROOT"]
    mount = next(path for path in mounts if root.startswith(path.rstrip("/") + "/"))
    claim_name = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
    assert claim_name == env["ARF_K8S_WORKSPACE_PVC"]
    assert volumes[mounts["/tmp"]]["emptyDir"] == {}  # the root filesystem is read-only


def _command(root: Path) -> list[str]:
    """The CronJob's command, run here: this interpreter, and `root` for the volume's root."""
    [box] = _pod(_cronjob())["spec"]["containers"]
    command = list(box["command"])
    assert command[0] == "python"
    return [sys.executable, *command[1:3], str(root), *command[4:]]


def _run_folder(root: Path, name: str, age: float) -> Path:
    folder = root / "reach_bc" / name
    claim(folder, "2026-10-01T00:00:00+00:00")
    (folder / "train").mkdir()
    (folder / "train" / "model.pt").write_bytes(b"w" * 100)
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (age, age))
    return folder


def test_its_command_deletes_old_run_folders_and_keeps_fresh_ones(tmp_path: Path):
    root = tmp_path / "runs"
    days = int(_command(root)[-1])
    old = _run_folder(root, "scheduled__2026-09-01", time.time() - (days + 1) * DAY)
    fresh = _run_folder(root, "scheduled__2026-12-01", time.time() - (days - 1) * DAY)
    proc = subprocess.run(_command(root), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed 1 run folders" in proc.stdout
    assert not old.exists() and (fresh / "train" / "model.pt").exists()


def test_its_command_before_any_run_and_with_bad_arguments(tmp_path: Path):
    proc = subprocess.run(_command(tmp_path / "runs"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "does not exist: no run has written there yet" in proc.stdout
    bad = [*_command(tmp_path)[:-1], "0"]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--retention-days must be 1 to 36500" in proc.stderr
    (tmp_path / "file").write_text("")
    proc = subprocess.run(_command(tmp_path / "file"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
