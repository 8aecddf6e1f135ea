"""The federated DAG's step specs: a prepare per site, and the federate step.

Backend-independent (pure functions of a StepSpec, like `stepspec.build_step_spec`):

* `site_spec`: the prepare step of one site. Its data hub is the site's (ARF_DATAHUB_URI) and
  its workspace is ``<run workspace>/sites/<site>/``: it can neither query another site's hub
  (the prepare sandbox reads hub tables only) nor write beside another site's shards.
* `federate_spec`: `arf-trainer federate` in the federation venv (Flower needs protobuf < 7,
  see the Makefile), told where each site's prepared shards lie.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from arf_training.errors import ArfError
from arf_training.settings import REPO_ROOT, ArfSettings
from arf_training.stepspec import StepSpec

SITES_DIR = "sites"


def site_hub(settings: ArfSettings, hub: str) -> str:
    """A site's hub as a path: absolute, file:// or relative to ARF_HOME."""
    if hub.startswith("file://"):
        return hub[len("file://"):]
    path = Path(hub)
    return str(path if path.is_absolute() else settings.home / path)


def _site(template: Any, name: str) -> Any:
    for site in template.federated.sites:
        if site.name == name:
            return site
    raise ArfError(f"template {template.name!r} has no federated site {name!r}; sites: "
                   f"{[s.name for s in template.federated.sites]}")


def site_workspace(spec: StepSpec, name: str) -> Path:
    return spec.workspace / SITES_DIR / name


def site_spec(spec: StepSpec, template: Any, name: str, settings: ArfSettings) -> StepSpec:
    """`spec` (the run's prepare step) narrowed to site `name`: its hub, its folder, its query."""
    site = _site(template, name)
    workspace = site_workspace(spec, name)
    job_spec = copy.deepcopy(spec.job_spec)
    if site.query is not None:
        job_spec["template"]["dataset"]["query"] = site.query
    job_spec["inputs"] = {**job_spec.get("inputs", {}), "site": name}
    # Not even the other sites' hub locations reach this site's step.
    job_spec["template"]["federated"]["sites"] = [
        s for s in job_spec["template"]["federated"]["sites"] if s["name"] == name]
    env = {**spec.env, "ARF_WORKSPACE": str(workspace),
           "ARF_RESULT_PATH": str(workspace / "prepare" / "result.json"),
           "ARF_DATAHUB_URI": site_hub(settings, site.hub),
           "ARF_DATA_DIR": str(workspace / "prepare")}
    for name_ in ("ARF_CHECKPOINT_DIR", "ARF_OUTPUT_DIR"):
        env.pop(name_, None)
    return dataclasses.replace(spec, env=env, job_spec=job_spec, workspace=workspace,
                               result_path=workspace / "prepare" / "result.json")


def federation_venv() -> Path:
    return Path(os.environ.get("ARF_FEDERATION_VENV") or REPO_ROOT / ".federation-venv")


def federate_spec(spec: StepSpec, template: Any, local: bool) -> StepSpec:
    """`spec` (built for step "federate") with the sites' data folders and, locally, the
    federation venv's arf-trainer (in the image it is on PATH)."""
    sites = [{"name": s.name, "data_dir": str(site_workspace(spec, s.name) / "prepare")}
             for s in template.federated.sites]
    job_spec = {**spec.job_spec, "inputs": {**spec.job_spec.get("inputs", {}), "sites": sites}}
    command = list(spec.command)
    if local:
        trainer = federation_venv() / "bin" / "arf-trainer"
        if not trainer.exists():
            raise ArfError(f"no Flower installation at {federation_venv()}: the federate step "
                           "runs in its own venv (Flower 1.42 needs protobuf < 7). Create it "
                           "with `make federation-venv`, or point ARF_FEDERATION_VENV at one")
        command[0] = str(trainer)
    # The federate step reads no hub: only the sites' prepared folders (listed above).
    env = {**spec.env, "ARF_DATAHUB_URI": str(spec.workspace / "federate" / "no-hub")}
    return dataclasses.replace(spec, command=command, job_spec=job_spec, env=env)
