"""Template + step -> the Kubernetes manifests the Kubernetes backend would submit.

Used by `arf templates render NAME --backend kubernetes` (a `helm template` for training DAGs)
and by tests that validate every shipped template against the Kubernetes and CRD schemas. The
StepSpec is built exactly as at task run time (`build_step_spec`), with the default trigger conf
and the workspace root set to the pod's mount path, so what is printed is what would run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arf_training.kubernetes.config import KubernetesConfigError, KubernetesSettings
from arf_training.kubernetes.jobs import DistributedJobRenderer, PyTorchJobRenderer
from arf_training.kubernetes.pod import render_pod
from arf_training.settings import ArfSettings
from arf_training.stepspec import STEPS, RunIdentity, build_step_spec
from arf_training.templates import LoadedTemplate

# The task ids the factory gives each step (`factory.TASKS`; evaluate is in the arf_evaluate DAG).
STEP_TASK_IDS = {"choose": "choose_recipe", "prepare": "prepare_data", "train": "train",
                 "register": "register_model", "evaluate": "evaluate", "federate": "federate"}
EVALUATE_DAG_ID = "arf_evaluate"
PLACEHOLDER_RUN_ID = "manual__placeholder"
PLACEHOLDER_MODEL_VERSION = "0"


@dataclass(frozen=True)
class PodArfSettings(ArfSettings):
    """ArfSettings whose workspace root is the pod's mount path (not ARF_WORKSPACE_ROOT)."""

    pod_workspace_root: Path = Path("/workspace")
    secret_env_names: frozenset[str] = frozenset()

    @property
    def workspace_root(self) -> Path:  # type: ignore[override]
        return self.pod_workspace_root

    def database_uri(self, name: str) -> str:
        # A pod cannot reach the embedded server (a Unix socket on the Airflow machine).
        raise KubernetesConfigError(
            f"on Kubernetes the {name} database is the deployment's PostgreSQL, not the "
            "embedded one: give the pods its SQLAlchemy URL from a Secret, e.g. "
            'ARF_K8S_SECRET_ENV=\'{"ARF_OPTUNA_STORAGE": "arf-optuna/url"}\' (or set '
            "ARF_OPTUNA_STORAGE, which then stands in the pod spec in clear)")

    def from_secret(self, env_name: str) -> bool:
        return env_name in self.secret_env_names


def pod_arf_settings(settings: KubernetesSettings) -> PodArfSettings:
    root = Path(settings.workspace_mount_path)
    return PodArfSettings(home=root, tracking_uri=settings.tracking_uri,
                          datahub_uri=settings.datahub_uri, artifact_root=settings.artifact_root,
                          pod_workspace_root=root,
                          secret_env_names=frozenset(name for name, _, _ in settings.secret_env))


def placeholder_identity(template_name: str, step: str) -> RunIdentity:
    """The run identity `arf templates render` uses: a manual run, first try."""
    dag_id = EVALUATE_DAG_ID if step == "evaluate" else template_name
    return RunIdentity(dag_id=dag_id, run_id=PLACEHOLDER_RUN_ID, task_id=STEP_TASK_IDS[step],
                       try_number=1)


def steps_of(loaded: LoadedTemplate) -> list[str]:
    """The steps a template has: evaluate only with an `evaluation` section, choose only with
    a `nightly:` section; a `federated:` template federates instead of training."""
    steps = [s for s in STEPS if (s != "evaluate" or loaded.template.evaluation is not None)
             and (s != "choose" or loaded.template.nightly is not None)]
    if loaded.template.federated is not None:
        steps[steps.index("train")] = "federate"
    return steps


def render_step_manifests(loaded: LoadedTemplate, step: str, settings: KubernetesSettings,
                          identity: RunIdentity,
                          job_renderer: DistributedJobRenderer | None = None
                          ) -> list[dict[str, Any]]:
    """The objects that run `step` of `loaded`: a Pod, or a PyTorchJob for multi-process train.

    The job spec is inline (ARF_JOB_SPEC_JSON), so no ConfigMap is needed; the list form leaves
    room for companion objects. Evaluate gets placeholder inputs (the model version comes from
    the Asset event at run time).
    """
    if step not in steps_of(loaded) and step != "evaluate":
        raise KubernetesConfigError(f"template {loaded.name!r}: unknown step {step!r}; "
                                    f"choose one of {', '.join(steps_of(loaded))}")
    inputs: dict[str, Any] = {}
    if step == "evaluate":
        if loaded.template.evaluation is None:
            raise KubernetesConfigError(
                f"template {loaded.name!r} has no 'evaluation' section, so it has no evaluate "
                "step; add evaluation: {environment: reach} or render another step")
        inputs = {"model_name": loaded.template.model.name,
                  "model_version": PLACEHOLDER_MODEL_VERSION,
                  "source": "placeholder (arf templates render)"}
    arf_settings = pod_arf_settings(settings)
    spec = build_step_spec(loaded, step, identity, {}, arf_settings, inputs=inputs)
    if loaded.template.federated is not None and step in ("prepare", "federate"):
        from arf_training.kubernetes import federation  # prepare per site; SuperLink + nodes

        if step == "prepare":
            return federation.render_site_prepares(spec, loaded, identity, settings,
                                                   arf_settings)
        return federation.render_federation(spec, loaded, identity, settings)
    if step == "train" and spec.world_size > 1:
        return [(job_renderer or PyTorchJobRenderer()).render(spec, identity, settings)]
    return [render_pod(spec, identity, settings)]
