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
    run_after: str | None = None
    """With the run id, names one DagRun (absent in a job spec from before it was recorded)."""


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
        return self._section("dataset")

    @property
    def model(self) -> dict[str, Any]:
        return self._section("model")

    @property
    def training(self) -> dict[str, Any]:
        return self._section("training")

    def _section(self, name: str) -> dict[str, Any]:
        try:
            return _field(self.template, name, dict, "template.")
        except KeyError:
            raise SpecError(f"job spec template has no {name!r} section; rebuild the spec "
                            "from a validated template") from None

    @property
    def evaluation(self) -> dict[str, Any] | None:
        return self.template.get("evaluation")

    @classmethod
    def from_dict(cls, raw: Any) -> "JobSpec":
        if not isinstance(raw, dict):
            raise SpecError(f"job spec must be a JSON object, not {type(raw).__name__}; "
                            "rebuild it with arf-training")
        try:
            if raw.get("spec_version") != SPEC_VERSION:
                raise SpecError(
                    f"job spec has spec_version={raw.get('spec_version')!r}; this arf-trainer "
                    f"reads version {SPEC_VERSION}: rebuild the spec with a matching arf-training"
                )
            run = _field(raw, "run", dict)
            template = _field(raw, "template", dict)
            conf = _finite("conf", _field(raw, "conf", dict, default={}))
            hyperparameters = _finite("hyperparameters",
                                      _field(raw, "hyperparameters", dict, default={}))
            seed = _finite("", {"seed": raw["seed"]})["seed"]
            if isinstance(seed, bool) or not isinstance(seed, (int, float)) \
                    or int(seed) != seed:
                raise SpecError(f"job spec seed={seed!r} must be an integer; fix "
                                "training.seed or the trigger conf")
            try_number = run.get("try_number", 1)
            if isinstance(try_number, str) and try_number.isdigit():
                try_number = int(try_number)
            if isinstance(try_number, bool) or not isinstance(try_number, int):
                raise SpecError(f"job spec run.try_number={try_number!r} must be an integer")
            return cls(
                step=_field(raw, "step", str),
                template=template,
                template_sha256=raw["template_sha256"],
                conf=conf,
                hyperparameters=hyperparameters,
                seed=int(seed),
                run=RunIdentity(
                    dag_id=_field(run, "dag_id", str, "run."),
                    run_id=_field(run, "run_id", str, "run."),
                    task_id=_field(run, "task_id", str, "run."),
                    try_number=try_number,
                    run_after=_field(run, "run_after", str, "run.", default=None),
                ),
                inputs=_field(raw, "inputs", dict, default={}),
                code_version=_field(raw, "code_version", dict, default={}),
                raw=raw,
            )
        except KeyError as exc:
            raise SpecError(f"job spec is missing the field {exc.args[0]!r}") from exc


_REQUIRED = object()


def _field(raw: dict[str, Any], key: str, kind: type, where: str = "",
           default: Any = _REQUIRED) -> Any:
    """raw[key] if it is a `kind` (absent or null: `default`, else `SpecError`)."""
    value = raw.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if value is None and key not in raw:
        raise KeyError(f"{where}{key}")
    if not isinstance(value, kind):
        raise SpecError(f"job spec {where}{key} must be a JSON "
                        f"{'object' if kind is dict else 'string'}, not {value!r:.80}; "
                        "rebuild the spec with arf-training")
    return value


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
                text, origin = path.read_text(encoding="utf-8"), str(path)
            except (OSError, UnicodeDecodeError) as exc:
                raise SpecError(f"cannot read job spec {path}: {exc}") from exc
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            # RecursionError: nesting deeper than the interpreter's limit is not a job spec.
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
