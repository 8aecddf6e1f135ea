"""The training image and the RBAC manifests pass hadolint + checkov; the image's pins agree.

The scanner run needs .tools-venv (checkov + hadolint, kept apart from the Airflow venv because
checkov pins clash with Airflow's): `make tools` creates it, and CI runs it. Without it those
tests are skipped; the static checks on the Dockerfile and its pins always run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "k8s_scan" / "run_scanners.py"
TOOLS = REPO / ".tools-venv" / "bin"
DOCKERFILE = REPO / "training_container" / "Dockerfile"

needs_tools = pytest.mark.skipif(
    not (TOOLS / "checkov").exists() or not (TOOLS / "hadolint").exists(),
    reason="checkov/hadolint not installed in .tools-venv: run `make tools` (CI does)")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def _run(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *extra], capture_output=True, text=True,
                          timeout=300, cwd=REPO, check=False)


@needs_tools
@pytest.mark.timeout(300)
def test_scanners_pass_on_dockerfile_and_rbac():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_tools
@pytest.mark.timeout(300)
def test_scanners_fail_on_an_insecure_pod(tmp_path):
    bad = tmp_path / "privileged-pod.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bad", "namespace": "arf-training"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
                                 "securityContext": {"privileged": True}}]}}))
    proc = _run(str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CKV_K8S_16" in proc.stdout  # privileged container


def test_skip_list_gives_a_reason_for_every_check():
    data = yaml.safe_load((REPO / "tests" / "k8s_scan" / "checkov-skips.yaml").read_text())
    assert isinstance(data.get("skips"), list)
    for entry in data["skips"]:
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", entry.get("id", "")), entry
        assert len(str(entry.get("reason", "")).strip()) >= 20, f"explain {entry['id']}"


def test_image_pins_agree_with_constraints():
    image = _pins(REPO / "training_container" / "requirements-image.txt")
    constraints = _pins(REPO / "constraints.txt")
    assert image, "requirements-image.txt pins nothing"
    drift = {n: (v, constraints.get(n)) for n, v in image.items() if constraints.get(n) != v}
    assert not drift, f"requirements-image.txt differs from constraints.txt: {drift}"


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    instructions = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in instructions if ln.startswith("FROM ")]
    # Two stages on the base (one base: the venv copied across holds absolute paths), and the
    # federated image built on them: `--target federated` (kubernetes/federation.py's image).
    assert [f for f in froms if "python:3.11-slim-bookworm" in f] == froms[:2], froms
    assert froms[2:] == ["FROM builder AS federated-builder", "FROM runtime AS federated"], froms
    assert "--constraint training_container/requirements-federation.txt" in text
    flwr_pin = next(ln for ln in (DOCKERFILE.parent / "requirements-federation.txt").read_text()
                    .splitlines() if ln.startswith("flwr=="))
    assert f'"{flwr_pin}"' in text
    assert any(ln.startswith("FROM ") and ln.endswith("AS builder") for ln in instructions)
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["arf-trainer"]' in text
    assert "HEALTHCHECK NONE" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text and "PIP_NO_CACHE_DIR=1" in text
    # torch: the pin of the `trainer` extra, from the index the TORCH_VARIANT arg selects.
    trainer = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    torch_pin = next(r for r in trainer if r.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert '"${whl}[trainer]"' in text
    # No credentials baked in.
    assert not re.search(r"(?i)^\s*(ARG|ENV)\s+\S*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", text, re.M)


def test_dockerignore_keeps_state_out_of_the_context():
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for entry in (".git", ".venv", ".tools-venv", ".arf", "tests", "bench", "**/mlruns"):
        assert entry in ignored, entry
    # ...but never what the Dockerfile COPYs.
    for needed in ("pyproject.toml", "README.md", "plugins", "training_container"):
        assert needed not in ignored, needed


@needs_tools
@pytest.mark.timeout(600)
def test_scanners_pass_on_every_rendered_template(tmp_path):
    """What `arf templates render` prints for each shipped template: hadolint/checkov clean,
    up to the batch-pod skips in checkov-skips.yaml (which apply to rendered/ only)."""
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    arf = Path(sys.executable).parent / "arf"
    for template in sorted((REPO / "config_templates").glob("*.yaml")):
        name = yaml.safe_load(template.read_text())["metadata"]["name"]
        proc = subprocess.run([str(arf), "templates", "render", name], capture_output=True,
                              text=True, timeout=120, check=False, env=dict(
                                  os.environ, ARF_OPTUNA_STORAGE="postgresql+psycopg://optuna@"
                                  "postgres.arf.svc/optuna"))
        assert proc.returncode == 0, proc.stderr
        (rendered / f"{name}.yaml").write_text(proc.stdout)
    proc = _run(*sorted(str(p) for p in rendered.iterdir()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CKV2_K8S_6" not in proc.stdout  # the NetworkPolicy in rbac.yaml covers the pods
