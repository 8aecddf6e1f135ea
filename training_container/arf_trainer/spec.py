"""The step contract as seen from inside the container: the ARF_* environment and the job spec.

A step is `arf-trainer <step>` with:

==========================  ==================================================================
ARF_JOB_SPEC                path to the JSON job spec (or ARF_JOB_SPEC_JSON: the JSON inline)
ARF_WORKSPACE               the run workspace directory, shared by all steps of one DAG run
ARF_RESULT_PATH             where the step writes its result JSON (last, atomically)
ARF_TRACKING_URI            MLflow tracking URI (also used as registry URI)
ARF_ARTIFACT_ROOT           artifact root for experiments this run creates (optional)
ARF_DATAHUB_URI             root of the data hub (a local path or file:// URI)
ARF_DAG_ID / ARF_RUN_ID     run identity; ARF_TRY_NUMBER and ARF_TASK_ID too
==========================  ==================================================================

torchrun (or the Kubeflow PyTorchJob) adds RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.

The job spec (see `JobSpec`) carries the resolved template (`template`, the same dict the
Airflow side validated), its content hash, the trigger conf, the resolved hyperparameters and
seed, the run identity and step-specific `inputs`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from arf_trainer.errors import SpecError

SPEC_VERSION = 1
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(k|M|G|T|Ki|Mi|Gi|Ti)?")


def memory_bytes(text: Any) -> int | None:
    """Bytes of a Kubernetes memory quantity (512Mi, 2Gi, 1500000000); None if `text` is not
    one (the Airflow side's template check has already named a bad one)."""
    match = _QUANTITY.fullmatch(str(text).strip())
    return int(float(match[1]) * _UNITS[match[2] or ""]) if match else None


def uri_to_path(uri: str) -> Path:
    """Accept a plain path or a file:// URI; reject other schemes with a clear message."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else uri)
    raise SpecError(
        f"URI {uri!r} uses scheme {parsed.scheme!r}; this build of arf-trainer reads local paths "
        "or file:// URIs only (mount object storage as a volume to use it)"
    )


@dataclass(frozen=True)
class RunIdentity:
    dag_id: str
    run_id: str
    task_id: str
    try_number: int


@dataclass(frozen=True)
class JobSpec:
    """The parsed job spec. `template` is the validated template as a plain dict."""

    step: str
    template: dict[str, Any]
    template_sha256: str
    conf: dict[str, Any]
    hyperparameters: dict[str, Any]
    seed: int
    run: RunIdentity
    inputs: dict[str, Any] = field(default_factory=dict)
    code_version: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # Convenience views of the template sections.
    @property
    def name(self) -> str:
        return self.template["metadata"]["name"]

    @property
    def dataset(self) -> dict[str, Any]:
        return self.template["dataset"]

    @property
    def model(self) -> dict[str, Any]:
        return self.template["model"]

    @property
    def training(self) -> dict[str, Any]:
        return self.template["training"]

    @property
    def evaluation(self) -> dict[str, Any] | None:
        return self.template.get("evaluation")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "JobSpec":
        try:
            if raw.get("spec_version") != SPEC_VERSION:
                raise SpecError(
                    f"job spec has spec_version={raw.get('spec_version')!r}; this arf-trainer "
                    f"reads version {SPEC_VERSION}: rebuild the spec with a matching arf-training"
                )
            run = raw["run"]
            conf = _finite("conf", raw.get("conf") or {})
            hyperparameters = _finite("hyperparameters", raw.get("hyperparameters") or {})
            seed = _finite("", {"seed": raw["seed"]})["seed"]
            return cls(
                step=raw["step"],
                template=raw["template"],
                template_sha256=raw["template_sha256"],
                conf=conf,
                hyperparameters=hyperparameters,
                seed=int(seed),
                run=RunIdentity(
                    dag_id=run["dag_id"],
                    run_id=run["run_id"],
                    task_id=run["task_id"],
                    try_number=int(run.get("try_number", 1)),
                ),
                inputs=raw.get("inputs") or {},
                code_version=raw.get("code_version") or {},
                raw=raw,
            )
        except KeyError as exc:
            raise SpecError(f"job spec is missing the field {exc.args[0]!r}") from exc


def _finite(where: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values`, or `SpecError` for a NaN or infinite number among them.

    The Airflow side refuses them in the trigger conf, but a spec can come from elsewhere, and
    `json.loads` reads the non-standard `NaN` / `Infinity` tokens. A NaN learning rate would
    train garbage silently, and custom commands receive the hyperparameters as they are.
    """
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            name = f"{where}.{key}" if where else key
            raise SpecError(f"job spec {name} = {value!r} is not a finite number; NaN and "
                            "infinities are refused: fix the trigger conf or the template default")
    return values


@dataclass(frozen=True)
class StepEnv:
    """The ARF_* environment, read once."""

    workspace: Path
    result_path: Path
    tracking_uri: str
    artifact_root: str | None
    datahub: Path
    spec: JobSpec

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> "StepEnv":
        env = os.environ if environ is None else environ

        def need(name: str) -> str:
            value = env.get(name)
            if not value:
                raise SpecError(
                    f"environment variable {name} is not set; arf-trainer steps are started by "
                    "an arf-training backend, which sets every ARF_* variable (see the README's "
                    "'Step contract')"
                )
            return value

        if env.get("ARF_JOB_SPEC_JSON"):
            text, origin = env["ARF_JOB_SPEC_JSON"], "ARF_JOB_SPEC_JSON"
        else:
            path = Path(need("ARF_JOB_SPEC"))
            try:
                text, origin = path.read_text(), str(path)
            except OSError as exc:
                raise SpecError(f"cannot read job spec {path}: {exc}") from exc
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"job spec {origin} is not valid JSON: {exc}") from exc
        spec = JobSpec.from_dict(raw)
        workspace = uri_to_path(need("ARF_WORKSPACE"))
        result = env.get("ARF_RESULT_PATH") or str(workspace / spec.step / "result.json")
        return cls(
            workspace=workspace,
            result_path=Path(result),
            tracking_uri=need("ARF_TRACKING_URI"),
            artifact_root=env.get("ARF_ARTIFACT_ROOT") or None,
            datahub=uri_to_path(need("ARF_DATAHUB_URI")),
            spec=spec,
        )


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that readers see the whole file or none of it (write, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)
