"""`arf training reproduce RUN_ID`: re-run a training run from its recorded lineage and compare.

The MLflow run of every training step records the resolved template, trigger conf, seed, data
table versions, world size and the final weights' sha256. This re-runs `prepare` and `train`
with the local backend in a fresh workspace, with every table pinned to the recorded version,
and reports whether the data fingerprint and the weights' sha256 match. Nothing is registered.
Result: `match` (exit 0) only when every recorded value equals the re-run's; `mismatch` (1) when
one differs; `not verified` (1) when the run did not record one. An unknown run, or a record
that cannot be re-run as it was, is bad input (2), found before anything runs.
A template's own command logs into the MLflow run `arf-trainer custom-setup` opened for the
re-run; without a register step to complete it, this ends it (FINISHED, tagged with the run it
reproduces) so that it does not stay RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from arf_training.backends.local import LocalStepRunner
from arf_training.errors import BAD_INPUT_EXIT, ArfError, ConfError
from arf_training.settings import ArfSettings, venv_bin
from arf_training.stepspec import RunIdentity, build_step_spec, code_version
from arf_training.templates import LoadedTemplate, TrainingTemplate

REPRODUCE_DAG_ID = "arf_reproduce"
CUSTOM_RUN_FILE = "custom_run.json"  # arf_trainer.custom_setup.RUN_FILE, in the train dir


def fetch_lineage(run_id: str, settings: ArfSettings) -> dict[str, Any]:
    """What the run recorded. An unknown run, or one that is not a finished training run, is
    bad input (ConfError, exit 2): never a `mismatch` (exit 1) it did not check."""
    proc = subprocess.run([venv_bin("arf-trainer"), "lineage", run_id, "--tracking-uri",
                           settings.tracking_uri], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        last = last.removeprefix("arf-trainer lineage: error: ")
        if proc.returncode == BAD_INPUT_EXIT:
            raise ConfError(last)
        raise ArfError(f"cannot read the lineage of MLflow run {run_id!r}: {last} (reproduce "
                       "needs the arf.* tags the train and register steps wrote, unedited)")
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


def rerun_weights_sha256(result: dict[str, Any], output_dir: Path, custom: bool) -> str:
    """The re-run's weights hash, computed as the recorded one was. A template's own command:
    its output folder, hashed as register hashes it (arf_trainer.custom.folder_sha256), never
    what the command's result JSON says about itself, which register ignores too."""
    if custom:
        return folder_sha256(output_dir)
    return result.get("weights_sha256") or folder_sha256(output_dir)


def folder_sha256(folder: Path) -> str:
    """sha256 over sorted relative paths and bytes (the container side's custom.folder_sha256,
    which this side may not import)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode("utf-8", "surrogateescape")
                      + b"\0")
        with open(path, "rb") as fh:  # in chunks: a model may be larger than memory
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def rerun_identity(run_id: str) -> RunIdentity:
    """A re-run's own identity, hence its own workspace: two re-runs of one run started in the
    same second shared one (the second took the first's finished steps for its own)."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    return RunIdentity(dag_id=REPRODUCE_DAG_ID, run_id=f"{run_id}-{stamp}", task_id="reproduce")


def reproduce(run_id: str, log: logging.Logger | None = None) -> dict[str, Any]:
    log = log or logging.getLogger("arf.reproduce")
    settings = ArfSettings.from_env()
    lineage = fetch_lineage(run_id, settings)
    loaded = pinned_template(lineage)
    identity = rerun_identity(run_id)
    specs = {step: build_step_spec(loaded, step, identity, lineage["conf"], settings)
             for step in ("prepare", "train")}
    spec, workspace = specs["train"], specs["train"].workspace
    # Checked before anything runs: a record that cannot be re-run as it was is bad input.
    if spec.world_size != lineage["world_size"]:
        raise ConfError(f"run {run_id}: recorded world size {lineage['world_size']} differs from "
                        f"the template's {spec.world_size}; the weights cannot be compared")
    if spec.job_spec["hyperparameters"] != lineage["hyperparameters"] or \
            spec.job_spec["seed"] != lineage["seed"]:
        raise ConfError(f"run {run_id}: the recorded conf (tag arf.conf) does not resolve to the "
                        "recorded hyperparameters/seed; the run's record is inconsistent, so "
                        "it cannot be re-run as it was")
    results = {step: LocalStepRunner(log).run(specs[step]) for step in ("prepare", "train")}
    rerun_run_id = results["train"].get("mlflow_run_id")
    if spec.setup_command:
        rerun_run_id = _end_custom_run(Path(spec.env["ARF_OUTPUT_DIR"]).parent, settings, run_id)
    rerun_sha = rerun_weights_sha256(results["train"], Path(spec.env["ARF_OUTPUT_DIR"]),
                                     custom=bool(spec.setup_command))
    verdict = compare({
        "data_fingerprint": (lineage["data_fingerprint"], results["prepare"]["fingerprint"]),
        "weights_sha256": (lineage["weights_sha256"], rerun_sha),
    })
    return {
        "run_id": run_id,
        "match": verdict["result"] == "match",
        "result": verdict["result"],
        "checks": verdict["checks"],
        "world_size": lineage["world_size"],
        "rerun_training_run_id": rerun_run_id,
        "base_model": lineage.get("base_model_version") and loaded.template.model.base_model,
        "workspace": str(workspace),
        "notes": lineage_notes(lineage) + verdict["notes"],
    }


def compare(pairs: dict[str, tuple[str | None, str | None]]) -> dict[str, Any]:
    """The checks of (recorded, re-run) pairs and the result: `match` only when every value was
    recorded and equals the re-run's; a value the run did not record is not compared (neither
    match nor mismatch), so the result is then at best `not verified`."""
    compared = {k: (None if not recorded else recorded == rerun)
                for k, (recorded, rerun) in pairs.items()}
    unchecked = [k for k, ok in compared.items() if ok is None]
    return {
        "result": ("mismatch" if False in compared.values() else
                   "not verified" if unchecked else "match"),
        "checks": {k: {"recorded": a, "rerun": b, "match": compared[k]}
                   for k, (a, b) in pairs.items()},
        "notes": [f"{k} was not recorded (tag arf.{k} missing or empty): not compared"
                  for k in unchecked],
    }


def lineage_notes(lineage: dict[str, Any]) -> list[str]:
    """What the report should say besides the checks: why a mismatch may be expected."""
    notes = []
    here = lineage.get("local_torch_version")
    if lineage.get("torch_version") and here and lineage["torch_version"] != here:
        notes.append(f"torch {lineage['torch_version']} recorded, {here} here")
    recorded, local = lineage.get("code_version") or {}, code_version()
    for key in ("git_commit", "package"):
        if recorded.get(key) and local.get(key) and recorded[key] != local[key]:
            notes.append(f"code {key} {recorded[key]} recorded, {local[key]} here: the re-run "
                         "uses the code here")
    if recorded.get("git_dirty") == "true":
        notes.append("the run's checkout had uncommitted changes: its exact code is not known")
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
        verdict = {True: "match", False: "MISMATCH", None: "not compared"}[check["match"]]
        lines.append(f"  {name:17} recorded {(check['recorded'] or '(none)')[:16]:16}  re-run "
                     f"{(check['rerun'] or '(none)')[:16]:16}  {verdict}")
    lines += [f"  note: {n}" for n in report["notes"]]
    lines.append(f"result: {report['result']}")
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
