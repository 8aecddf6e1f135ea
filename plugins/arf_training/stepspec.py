"""The step contract: what every backend receives to run one step of a training DAG.

A step is a container command (`arf-trainer <step>` or a template's own command) plus an
environment of `ARF_*` variables, a JSON job spec, resources and the distributed shape. The local
backend runs it as a process group (torchrun when world size > 1); the Kubernetes backend as a
Pod or PyTorchJob. Both receive the same `StepSpec`, built at task run time by `build_step_spec`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from arf_training import __version__, custom_launch
from arf_training.params import NIGHTLY_PARAM, resolve_conf
from arf_training.settings import REPO_ROOT, ArfSettings
from arf_training.templates import LoadedTemplate, Resources

JOB_SPEC_VERSION = 1
STEPS = ("choose", "prepare", "train", "register", "evaluate")
DEFAULT_IMAGE = "ghcr.io/arf/arf-trainer:0.1.0"


@dataclass(frozen=True)
class RunIdentity:
    dag_id: str
    run_id: str
    task_id: str
    try_number: int = 1
    logical_date: str | None = None
    data_interval_start: str | None = None
    """ISO 8601 with zone; None for a run without a data interval (some manual runs)."""
    data_interval_end: str | None = None
    run_after: str | None = None
    """When the DagRun was created to run (ISO 8601): with the run id, it names one DagRun (a
    run deleted and triggered again under its id has another; arf_trainer.dag_run_dir)."""


@dataclass(frozen=True)
class StepSpec:
    """One step, backend-independent. `env` holds every ARF_* variable the step reads."""

    step: str
    image: str
    command: list[str]
    env: dict[str, str]
    job_spec: dict[str, Any]
    workspace: Path
    resources: Resources
    nodes: int = 1
    procs_per_node: int = 1
    timeout_s: float = 3600.0
    grace_s: float = 30.0
    result_path: Path = field(default=Path())
    setup_command: tuple[str, ...] = ()
    """Run once before `command` on every start, in the default image (a template's own
    training command: `arf-trainer custom-setup`, see arf_training.custom_launch)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """Package version and, in a git checkout, the commit (and whether the tree is dirty)."""
    info = {"package": __version__}
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True, timeout=5)
            info["git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _safe(part: str) -> str:
    """One path segment per id, and another one for another id: `%`-escapes what a file name
    should not hold (`~` and `_` stay apart: both are allowed in run ids), and the dots of `.`
    and `..`, which Airflow accepts as run ids but which would name the DAG's own folder or the
    workspace root."""
    text = quote(part, safe=":+=")  # letters, digits and _.-~ stay as they are
    return text.replace(".", "%2E") if text in (".", "..") else text


def workspace_for(settings: ArfSettings, dag_id: str, run_id: str) -> Path:
    return settings.workspace_root / _safe(dag_id) / _safe(run_id)


def build_step_spec(
    loaded: LoadedTemplate,
    step: str,
    run: RunIdentity,
    conf: dict[str, Any] | None,
    settings: ArfSettings,
    inputs: dict[str, Any] | None = None,
    trial: dict[str, Any] | None = None,
) -> StepSpec:
    """Resolve template + trigger conf into the spec of one step (validates the conf first).

    `trial` (a template with `hpo:`, train step only) is one trial asked by the study, as the
    ask task returns it (`{"number": n, "params": {...}}`): the step trains that trial, with
    its params and the per-trial budget, in ``<workspace>/trials/trial-<n>/``. Without it, the
    train step of an `hpo:` template trains the study's best trial (chosen in the container).
    """
    template = loaded.template
    inputs = dict(inputs or {})
    values = resolve_conf(template, conf)
    seed = values.pop("seed")
    query_override = values.pop("dataset_query", None)
    values.pop(NIGHTLY_PARAM, None)  # the night's recipe, a conf entry (choose_recipe)
    hyperparameters = values
    workspace = workspace_for(settings, run.dag_id, run.run_id)
    train_dir = "train"
    extra_env: dict[str, str] = {}
    if trial is not None and (template.hpo is None or step != "train"):
        from arf_training.errors import ArfError

        raise ArfError(f"template {template.name!r}: a trial is trained by the train step of a "
                       "template with an 'hpo' section only")
    if template.hpo is not None and step == "train":
        from arf_training import hpo

        inputs["hpo"] = hpo.step_inputs(template, run, trial)
        if not settings.from_secret(hpo.STORAGE_ENV):  # its URL carries a password
            extra_env[hpo.STORAGE_ENV] = hpo.storage_url(settings)
        if trial is not None:
            hyperparameters = hpo.trial_hyperparameters(template, hyperparameters, trial)
            train_dir = inputs["hpo"]["train_dir"]
            inputs["train_dir"] = train_dir
    template_dict = template.model_dump(mode="json", by_alias=True)
    if query_override is not None:
        from arf_training.errors import ConfError
        from arf_training.templates import rewrite_query_macros

        try:
            query_override = rewrite_query_macros(query_override)
        except ValueError as exc:
            raise ConfError(f"invalid trigger conf for {template.name!r}: dataset_query {exc}") \
                from None
    if query_override is not None and query_override.strip() != template.dataset.query.strip():
        # Recorded as a conf entry so lineage shows the query that really ran.
        conf = {**(conf or {}), "dataset_query": query_override}
    job_spec = {
        "spec_version": JOB_SPEC_VERSION,
        "step": step,
        "template": template_dict,
        "template_path": str(loaded.path),
        "template_sha256": loaded.sha256,
        "conf": dict(conf or {}),
        "hyperparameters": hyperparameters,
        "seed": seed,
        "run": {"dag_id": run.dag_id, "run_id": run.run_id, "task_id": run.task_id,
                "try_number": run.try_number, "logical_date": run.logical_date,
                # Bound to the dataset query's $data_interval_start/... by the prepare step.
                "data_interval_start": run.data_interval_start,
                "data_interval_end": run.data_interval_end,
                "run_after": run.run_after},
        "inputs": inputs,
        "code_version": code_version(),
    }
    training = template.training
    custom = training.command if step == "train" else None
    distributed = step == "train"
    # One evaluate task may score several versions: each gets its own result file.
    step_dir = (f"{step}-{_safe(inputs['model_name'])}-v{_safe(str(inputs['model_version']))}"
                if "model_name" in inputs else step)
    if train_dir != "train":
        step_dir = train_dir
    result_path = workspace / step_dir / "result.json"
    env = {
        "ARF_STEP": step,
        "ARF_WORKSPACE": str(workspace),
        "ARF_DAG_RUN_DIR": str(workspace),  # the folder a site's or trial's step claims too
        "ARF_RESULT_PATH": str(result_path),
        "ARF_TRACKING_URI": settings.tracking_uri,
        "ARF_ARTIFACT_ROOT": settings.artifact_root,
        "ARF_DATAHUB_URI": settings.datahub_uri,
        "ARF_DAG_ID": run.dag_id,
        "ARF_RUN_ID": run.run_id,
        "ARF_TASK_ID": run.task_id,
        "ARF_TRY_NUMBER": str(run.try_number),
        "ARF_SEED": str(seed),
        "ARF_PREEMPTION_GRACE_S": str(training.preemption_grace_seconds),
        "ARF_CHECKPOINT_DIR": str(workspace / train_dir / "checkpoints"),
        "ARF_DATA_DIR": str(workspace / "prepare"),
        "ARF_OUTPUT_DIR": str(workspace / train_dir / "output"),
        **extra_env,
    }
    if custom:
        env.update(custom_launch.env_for(workspace / train_dir))
    elif distributed:
        # arf-trainer records each rank's exit code there: torchrun reports a rank's exit 75
        # ("preempted, resume me") as its own exit 1, and the backends read the ranks' codes.
        env["ARF_EXIT_DIR"] = str(workspace / train_dir / custom_launch.EXIT_DIR)
    return StepSpec(
        step=step,
        image=custom.image if custom else DEFAULT_IMAGE,
        command=custom_launch.wrap(custom.command) if custom else ["arf-trainer", step],
        setup_command=custom_launch.SETUP_COMMAND if custom else (),
        env=env,
        job_spec=job_spec,
        workspace=workspace,
        resources=training.resources,
        nodes=training.distributed.nodes if distributed else 1,
        procs_per_node=training.distributed.procs_per_node if distributed else 1,
        timeout_s=training.timeout_minutes * 60.0,
        grace_s=float(training.preemption_grace_seconds),
        result_path=result_path,
    )


def config_hash(job_spec: dict[str, Any]) -> str:
    """Hash of what determines the model: template, hyperparameters, seed (not run identity)."""
    canonical = json.dumps({k: job_spec[k] for k in ("template", "hyperparameters", "seed")},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
