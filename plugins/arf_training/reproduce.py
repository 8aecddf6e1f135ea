"""`arf training reproduce RUN_ID`: re-run a training run from its recorded lineage and compare.

The MLflow run of every training step records the resolved template, trigger conf, seed, data
table versions, world size and the final weights' sha256. This re-runs `prepare` and `train`
with the local backend in a fresh workspace, with every table pinned to the recorded version,
and reports whether the data fingerprint and the weights' sha256 match. Nothing is registered.
A template's own command logs into the MLflow run `arf-trainer custom-setup` opened for the
re-run; without a register step to complete it, this ends it (FINISHED, tagged with the run it
reproduces) so that it does not stay RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from arf_training.backends.local import LocalStepRunner
from arf_training.errors import ArfError
from arf_training.settings import ArfSettings, venv_bin
from arf_training.stepspec import RunIdentity, build_step_spec
from arf_training.templates import LoadedTemplate, TrainingTemplate

REPRODUCE_DAG_ID = "arf_reproduce"
CUSTOM_RUN_FILE = "custom_run.json"  # arf_trainer.custom_setup.RUN_FILE, in the train dir


def fetch_lineage(run_id: str, settings: ArfSettings) -> dict[str, Any]:
    proc = subprocess.run([venv_bin("arf-trainer"), "lineage", run_id, "--tracking-uri",
                           settings.tracking_uri], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArfError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                       else f"arf-trainer lineage exited {proc.returncode}")
    start = proc.stdout.find("\n{")
    return json.loads(proc.stdout[start + 1 if start >= 0 else 0:])


def pinned_template(lineage: dict[str, Any]) -> LoadedTemplate:
    """The recorded template with every table pinned to the version the run read."""
    data = json.loads(json.dumps(lineage["template"]))
    data["dataset"]["tables"] = {**data["dataset"].get("tables", {}),
                                 **{k: int(v) for k, v in lineage["data_tables"].items()}}
    base, version = data["model"].get("base_model"), lineage.get("base_model_version")
    if base and version:
        # The version the run started from, not its alias again (which may have moved since).
        name = re.split(r"[@/]", base[len("models:/"):])[0]
        data["model"]["base_model"] = f"models:/{name}/{version}"
    template = TrainingTemplate.model_validate(data)
    return LoadedTemplate(template=template, path=Path(f"mlflow-run-{lineage['run_id']}"),
                          sha256=lineage.get("template_sha256") or "")


def folder_sha256(folder: Path) -> str:
    """sha256 over sorted relative paths and bytes (the container side's custom.folder_sha256,
    which this side may not import)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def reproduce(run_id: str, log: logging.Logger | None = None) -> dict[str, Any]:
    log = log or logging.getLogger("arf.reproduce")
    settings = ArfSettings.from_env()
    lineage = fetch_lineage(run_id, settings)
    loaded = pinned_template(lineage)
    identity = RunIdentity(dag_id=REPRODUCE_DAG_ID,
                           run_id=f"{run_id}-{time.strftime('%Y%m%dT%H%M%S')}",
                           task_id="reproduce")
    results: dict[str, Any] = {}
    for step in ("prepare", "train"):
        spec = build_step_spec(loaded, step, identity, lineage["conf"], settings)
        workspace = spec.workspace
        if step == "train":
            if spec.world_size != lineage["world_size"]:
                raise ArfError(f"recorded world size {lineage['world_size']} differs from the "
                               f"template's {spec.world_size}; the weights cannot be compared")
            if spec.job_spec["hyperparameters"] != lineage["hyperparameters"] or \
                    spec.job_spec["seed"] != lineage["seed"]:
                raise ArfError("the recorded conf does not resolve to the recorded "
                               "hyperparameters/seed; the run's record is inconsistent")
        results[step] = LocalStepRunner(log).run(spec)
    rerun_run_id = results["train"].get("mlflow_run_id")
    if spec.setup_command:
        rerun_run_id = _end_custom_run(Path(spec.env["ARF_OUTPUT_DIR"]).parent, settings, run_id)
    # A custom command's result need not name its weights: hash its output folder as register
    # does (arf_trainer.custom.folder_sha256).
    rerun_sha = results["train"].get("weights_sha256") or \
        folder_sha256(Path(spec.env["ARF_OUTPUT_DIR"]))
    checks = {
        "data_fingerprint": (lineage["data_fingerprint"], results["prepare"]["fingerprint"]),
        "weights_sha256": (lineage["weights_sha256"], rerun_sha),
    }
    notes = lineage_notes(lineage)
    return {
        "run_id": run_id,
        "match": all(a == b for a, b in checks.values()),
        "checks": {k: {"recorded": a, "rerun": b, "match": a == b} for k, (a, b) in checks.items()},
        "world_size": lineage["world_size"],
        "rerun_training_run_id": rerun_run_id,
        "base_model": lineage.get("base_model_version") and loaded.template.model.base_model,
        "workspace": str(workspace),
        "notes": notes,
    }


def lineage_notes(lineage: dict[str, Any]) -> list[str]:
    """What the report should say besides the checks: why a mismatch may be expected."""
    notes = []
    here = lineage.get("local_torch_version")
    if lineage.get("torch_version") and here and lineage["torch_version"] != here:
        notes.append(f"torch {lineage['torch_version']} recorded, {here} here")
    if lineage.get("bitwise_reproducible") == "false":
        notes.append("the run is recorded as not bitwise reproducible, so a weights mismatch "
                     f"is expected: {lineage.get('bitwise_reproducible_reason')}")
    return notes


def _end_custom_run(train_dir: Path, settings: ArfSettings, reproduced: str) -> str | None:
    """End the MLflow run custom-setup opened for the re-run's command; its id."""
    path = train_dir / CUSTOM_RUN_FILE
    if not path.exists():
        return None
    run_id = json.loads(path.read_text())["run_id"]
    from mlflow import MlflowClient  # at run time only, never at DAG parse

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    client.set_tag(run_id, "arf.reproduce_of", reproduced)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def format_report(report: dict[str, Any]) -> str:
    lines = [f"reproduce {report['run_id']} (world size {report['world_size']}, workspace "
             f"{report['workspace']})"]
    for name, check in report["checks"].items():
        lines.append(f"  {name:17} recorded {check['recorded'][:16]}  re-run "
                     f"{check['rerun'][:16]}  {'match' if check['match'] else 'MISMATCH'}")
    lines += [f"  note: {n}" for n in report["notes"]]
    lines.append(f"result: {'match' if report['match'] else 'mismatch'}")
    return "\n".join(lines)


def main(run_id: str, as_json: bool = False) -> int:
    # The steps' output goes to stderr, so stdout holds only the report (JSON for scripts).
    log = logging.getLogger("arf.reproduce")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    report = reproduce(run_id, log)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0 if report["match"] else 1
