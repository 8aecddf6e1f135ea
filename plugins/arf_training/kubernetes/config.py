"""Deployment settings of the Kubernetes backend, read from `ARF_K8S_*` environment variables.

Like `arf_training.settings`, these come from the environment only (never Airflow Variables):
the same values are needed by `arf templates render` on a laptop and by the operators at task run
time, and a Variable read at parse time would hit the metadata database.

Every value is checked once, here, and a bad one fails with the variable's name, the value given
and an example of a good one.

Paths: a step's `ARF_*` paths live under the run workspace `<root>/<dag_id>/<run_id>/`. In a pod
the root is `workspace_mount_path` (default `/workspace`), backed by the ReadWriteMany claim
`workspace_pvc`, so every step and every node of one run see the same files. A StepSpec built
with another root (for example the Airflow worker's local `.arf/workspace`) is remapped: each
`ARF_*` value that starts with the spec's workspace is rewritten to start with
`<mount>/<dag_id>/<run_id>` instead (see `arf_training.kubernetes.pod.pod_env`).

Object storage: `arf-trainer` reads local paths and `file://` URIs only, so a bucket is used by
mounting it (a CSI driver such as Mountpoint for S3, gcsfuse or blobfuse exposed as a
ReadWriteMany PersistentVolumeClaim) and naming that claim in `ARF_K8S_WORKSPACE_PVC`.
An `s3://...` ARF_K8S_WORKSPACE_URI or ARF_K8S_DATAHUB_URI is refused with that advice at load.

Credentials are never values here: only the *names* of Secrets, injected with `envFrom` (whole
Secret) or `secretKeyRef` (one key).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from arf_training.errors import ArfError

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
                                r"(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")
_SUBDOMAIN_RULE = ("lower-case letters, digits, '-' and '.', each '.'-separated part starting and "
                   "ending with a letter or digit, 253 characters at most")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
# An image reference (distribution/reference): [registry/]path[:tag][@digest]; the first part is
# a registry only if it looks like a host; each path part must match _IMAGE_PATH_PART.
_IMAGE = re.compile(r"^(?:(?P<registry>localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+"
                    r"(?=:))(:\d+)?/)?(?P<path>[^:@]+)(:(?P<tag>\w[\w.-]{0,127}))?"
                    r"(@(?P<digest>[a-z0-9]+([+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}))?$")
_IMAGE_PATH_PART = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}"
                        r"[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


class KubernetesConfigError(ArfError):
    """An `ARF_K8S_*` variable (or a template field the Kubernetes backend needs) is invalid."""


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() != "" else None


def _name(env: Mapping[str, str], var: str, default: str | None, *, what: str,
          subdomain: bool = False) -> str | None:
    value = _get(env, var)
    if var in env and value is None:
        return None  # set to "" on purpose: the feature is off
    value = value if value is not None else default
    pattern = _DNS1123_SUBDOMAIN if subdomain else _DNS1123_LABEL
    if value is not None and not pattern.match(value):
        rule = _SUBDOMAIN_RULE if subdomain else ("lower-case letters, digits and '-', starting "
                                                  "and ending with a letter or digit, 63 at most")
        raise KubernetesConfigError(f"{var}={value!r} is not a valid {what} name: use {rule}; "
                                    "e.g. 'arf-training'")
    return value


def _int(env: Mapping[str, str], var: str, default: int, *, minimum: int = 0) -> int:
    raw = _get(env, var)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise KubernetesConfigError(f"{var}={raw!r} is not a whole number; write e.g. "
                                    f"{var}={default}") from None
    if value < minimum:
        raise KubernetesConfigError(f"{var}={value} is below the minimum {minimum}")
    return value


def _bool(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = (_get(env, var) or "").lower()
    if raw in ("", "1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw in ("1", "true", "yes", "on") if raw else default
    raise KubernetesConfigError(f"{var}={raw!r} is not a boolean; write true or false")


def _choice(env: Mapping[str, str], var: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _get(env, var) or default
    if raw not in choices:
        raise KubernetesConfigError(f"{var}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _json(env: Mapping[str, str], var: str, example: str) -> Any:
    raw = _get(env, var)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise KubernetesConfigError(f"{var} is not valid JSON ({exc}); write e.g. "
                                    f"{var}='{example}'") from exc


def _label_pair(var: str, raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
        raise KubernetesConfigError(f"{var}={raw!r} is not a node label 'key=value'; write e.g. "
                                    f"{var}=cloud.google.com/gke-spot=true")
    return key, value


def _node_selector(env: Mapping[str, str]) -> dict[str, str]:
    var = "ARF_K8S_NODE_SELECTOR"
    value = _json(env, var, '{"pool": "training"}') or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _LABEL_KEY.match(k)
            and _LABEL_VALUE.match(v) for k, v in value.items()):
        raise KubernetesConfigError(f"{var} must be a JSON object of node label keys to string "
                                    f"values, e.g. '{{\"pool\": \"training\"}}'; got {value!r}")
    return dict(value)


def _tolerations(env: Mapping[str, str]) -> tuple[dict[str, Any], ...]:
    var = "ARF_K8S_TOLERATIONS"
    example = '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]'
    value = _json(env, var, example) or []
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise KubernetesConfigError(f"{var} must be a JSON list of toleration objects, e.g. "
                                    f"'{example}'; got {value!r}")
    for problem, item in ((_toleration_problem(item), item) for item in value):
        if problem:
            raise KubernetesConfigError(f"{var}: toleration {item!r}: {problem}; e.g. '{example}'")
    return tuple(value)


def _toleration_problem(item: dict[str, Any]) -> str | None:
    """What the API server's toleration validation would refuse (`ValidateTolerations`)."""
    key, value = item.get("key", ""), item.get("value", "")
    operator, effect = item.get("operator", "Equal"), item.get("effect", "")
    if set(item) - _TOLERATION_KEYS:
        return (f"unknown field(s) {sorted(set(item) - _TOLERATION_KEYS)}; allowed: "
                f"{sorted(_TOLERATION_KEYS)}")
    if operator not in ("Exists", "Equal"):
        return f"operator {operator!r} must be Exists or Equal (case matters)"
    if not isinstance(key, str) or key and not _LABEL_KEY.match(key):
        return f"key {key!r} is not a taint key (a label key such as nvidia.com/gpu)"
    if not key and operator != "Exists":
        return "a toleration without a key must use operator Exists (it tolerates every taint)"
    if operator == "Exists" and value:
        return f"value {value!r} must be empty with operator Exists"
    if not isinstance(value, str) or not _LABEL_VALUE.match(value):
        return f"value {value!r} is not a taint value (a label value, 63 characters at most)"
    if effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        return f"effect {effect!r} must be NoSchedule, PreferNoSchedule or NoExecute (or none)"
    seconds = item.get("tolerationSeconds")
    if seconds is not None and (type(seconds) is not int or effect != "NoExecute"):
        return "tolerationSeconds must be a whole number, with effect NoExecute"
    return None


def _secret_env(env: Mapping[str, str]) -> tuple[tuple[str, str, str], ...]:
    """`ARF_K8S_SECRET_ENV='{"ENV_NAME": "secret-name/key"}'` -> (env, secret, key) triples."""
    var = "ARF_K8S_SECRET_ENV"
    example = '{"AWS_SECRET_ACCESS_KEY": "arf-s3/secret-key"}'
    value = _json(env, var, example) or {}
    if not isinstance(value, dict):
        raise KubernetesConfigError(f"{var} must be a JSON object, e.g. '{example}'")
    out = []
    for name, ref in sorted(value.items()):
        secret, sep, key = str(ref).partition("/")
        if not _ENV_NAME.match(name) or not sep or not _DNS1123_SUBDOMAIN.match(secret) \
                or not _SECRET_KEY.match(key):
            raise KubernetesConfigError(
                f"{var}: entry {name!r}: {ref!r} must be 'secret-name/key' with a valid "
                f"environment variable name, the Secret's name of {_SUBDOMAIN_RULE} and a key of "
                f"letters, digits, '-', '_' and '.', e.g. '{example}' (values are Secret "
                "references, never the secret itself)")
        if name == "ARF_JOB_SPEC_JSON":
            raise KubernetesConfigError(
                f"{var}: {name} is the step's job spec, written by ARF itself; remove it")
        out.append((name, secret, key))
    return tuple(out)


def _image(env: Mapping[str, str]) -> str | None:
    image, good = _get(env, "ARF_K8S_IMAGE"), "e.g. ghcr.io/arf/arf-trainer:0.1.0"
    match = _IMAGE.match(image) if image else None
    if image and (not match or not all(map(_IMAGE_PATH_PART.match, match["path"].split("/")))):
        raise KubernetesConfigError(
            f"ARF_K8S_IMAGE={image!r} is not an image reference [registry/]path[:tag][@digest] "
            "with a path of lower-case letters, digits, '.', '_' and '-' (the kubelet would "
            f"refuse it as InvalidImageName: the pod would never start); {good}")
    if match and not (match["tag"] or match["digest"]):
        raise KubernetesConfigError(
            f"ARF_K8S_IMAGE={image!r} has no tag or digest: each node would run the ':latest' it "
            f"pulled first (IfNotPresent keeps it); pin a tag or a digest (@sha256:...), {good}")
    return image


def _local_uri(env: Mapping[str, str], var: str, pvc: str, default: str) -> str:
    """A path in the pods, absolute or a file:// URI: arf-trainer reads local paths only."""
    uri = _no_credentials(var, _get(env, var)) or default
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or not (parsed.path if parsed.scheme else uri
                                                 ).startswith("/"):
        raise KubernetesConfigError(
            f"{var}={uri!r} must be an absolute path (or file:// URI) in the pods: arf-trainer "
            "reads local paths only, so mount object storage with a CSI driver (Mountpoint for "
            f"S3, gcsfuse, blobfuse) as a ReadWriteMany PersistentVolumeClaim named in {pvc}; "
            f"e.g. {default}")
    return uri


def _no_credentials(var: str, uri: str | None) -> str | None:
    if uri and urlparse(uri).password:
        raise KubernetesConfigError(
            f"{var} holds a password in its URI; remove it and put the credentials in a Secret "
            "named by ARF_K8S_MLFLOW_SECRET / ARF_K8S_DATAHUB_SECRET (injected with envFrom)")
    return uri


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how the steps of a run become pods. Build with `from_env()`.

    ==================================  ======================================================
    ARF_K8S_NAMESPACE                   namespace of every object (arf-training)
    ARF_K8S_IMAGE                       replaces the built-in recipes' image (e.g. a digest)
    ARF_K8S_IMAGE_PULL_POLICY           IfNotPresent | Always | Never
    ARF_K8S_IMAGE_PULL_SECRETS          comma-separated Secret names
    ARF_K8S_SERVICE_ACCOUNT             pods' service account (default none, no API token)
    ARF_K8S_WORKSPACE_PVC               RWX claim of the run workspaces ("" = emptyDir)
    ARF_K8S_WORKSPACE_MOUNT             its mount path in the pods (/workspace)
    ARF_K8S_TRACKING_URI                MLflow URI seen from the pods (http://mlflow:5000)
    ARF_K8S_ARTIFACT_ROOT               artifact root of new experiments (server default)
    ARF_K8S_DATAHUB_URI / _PVC          data hub path and its claim (read-only but for evaluate)
    ARF_K8S_MLFLOW_SECRET               Secret injected with envFrom (MLFLOW_TRACKING_*)
    ARF_K8S_DATAHUB_SECRET              Secret injected with envFrom (data hub credentials)
    ARF_K8S_SECRET_ENV                  JSON {"ENV": "secret/key"} -> secretKeyRef
    ARF_K8S_NODE_SELECTOR               JSON object of node labels
    ARF_K8S_TOLERATIONS                 JSON list of tolerations
    ARF_K8S_SPOT_TOLERATION_KEY/_VALUE  taint of the spot pool (arf.dev/spot=true)
    ARF_K8S_SPOT_NODE_LABEL             key=value label of spot nodes (arf.dev/spot=true)
    ARF_K8S_SPOT_AFFINITY               preferred (fall back to on-demand) | required
    ARF_K8S_PRIORITY_CLASS              PriorityClass of the pods
    ARF_K8S_KUEUE_QUEUE                 Kueue LocalQueue (kueue.x-k8s.io/queue-name label)
    ARF_K8S_VOLCANO_QUEUE               Volcano queue (gang scheduling of PyTorchJobs)
    ARF_K8S_TTL_SECONDS_AFTER_FINISHED  PyTorchJob garbage collection (3600)
    ARF_K8S_BACKOFF_LIMIT               PyTorchJob pod restarts before it fails (3)
    ARF_K8S_CLEAN_POD_POLICY            None | Running | All (Running)
    ARF_K8S_ELASTIC / _MAX_RESTARTS     elastic PyTorchJob (c10d) and its restarts (false, 3)
    ARF_K8S_TERMINATION_MARGIN_S        added to the preemption grace period (15)
    ==================================  ======================================================
    """

    namespace: str = "arf-training"
    # Replaces StepSpec.image (the built-in recipes' image) when set; templates with their own
    # `training.command.image` keep theirs.
    image: str | None = None
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    # None: pods get no API token (automountServiceAccountToken false); training needs none.
    service_account: str | None = None
    # ReadWriteMany claim holding every run workspace; None -> an emptyDir (a preview only:
    # steps and nodes would not share files).
    workspace_pvc: str | None = "arf-workspace"
    workspace_mount_path: str = "/workspace"
    # What the pods use instead of the Airflow side's embedded URIs.
    tracking_uri: str = "http://mlflow:5000"
    artifact_root: str = ""
    datahub_uri: str = "/datahub"
    datahub_pvc: str | None = "arf-datahub"
    # Names of Secrets only (envFrom): e.g. MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN.
    mlflow_secret: str | None = None
    datahub_secret: str | None = None
    secret_env: tuple[tuple[str, str, str], ...] = ()
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    spot_toleration_key: str = "arf.dev/spot"
    spot_toleration_value: str = "true"
    spot_node_label: tuple[str, str] = ("arf.dev/spot", "true")
    spot_affinity: str = "preferred"
    priority_class: str | None = None
    kueue_queue: str | None = None
    volcano_queue: str | None = None
    ttl_seconds_after_finished: int = 3600
    backoff_limit: int = 3
    clean_pod_policy: str = "Running"
    elastic: bool = False
    max_restarts: int = 3
    # Added to the template's preemption grace: time for torchrun to pass SIGTERM on and exit.
    termination_margin_s: int = 15

    def __post_init__(self) -> None:
        if self.kueue_queue and self.volcano_queue:
            raise KubernetesConfigError(
                "ARF_K8S_KUEUE_QUEUE and ARF_K8S_VOLCANO_QUEUE are both set; a workload is "
                "admitted by one scheduler: set only one of them")
        if not self.workspace_mount_path.startswith("/"):
            raise KubernetesConfigError(
                f"ARF_K8S_WORKSPACE_MOUNT={self.workspace_mount_path!r} must be an absolute path, "
                "e.g. /workspace")
        # The pod mounts its own emptyDirs there, and the API server refuses two volumes at one
        # path (and "/" would hide the image).
        mount = self.workspace_mount_path.rstrip("/") or "/"
        hub = urlparse(self.datahub_uri).path if self.datahub_uri.startswith("file:") \
            else self.datahub_uri
        if mount in ("/", "/tmp", "/dev/shm") or (
                self.datahub_pvc and hub.startswith("/") and (hub.rstrip("/") or "/") == mount):
            raise KubernetesConfigError(
                f"ARF_K8S_WORKSPACE_MOUNT={self.workspace_mount_path!r} is a path the pods "
                "already use (/, /tmp, /dev/shm or the data hub's ARF_K8S_DATAHUB_URI); "
                "choose a folder of its own, e.g. /workspace")
        if self.kueue_queue and len(self.kueue_queue) > 63:
            raise KubernetesConfigError(
                f"ARF_K8S_KUEUE_QUEUE={self.kueue_queue!r} is longer than 63 characters, the "
                "limit of the kueue.x-k8s.io/queue-name label; use a shorter LocalQueue name")
        if not _LABEL_KEY.match(self.spot_toleration_key) \
                or not _LABEL_VALUE.match(self.spot_toleration_value):
            raise KubernetesConfigError(
                f"ARF_K8S_SPOT_TOLERATION_KEY={self.spot_toleration_key!r} / "
                f"ARF_K8S_SPOT_TOLERATION_VALUE={self.spot_toleration_value!r} is not a valid "
                "taint key and value; write e.g. cloud.google.com/gke-spot and true")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "KubernetesSettings":
        env = os.environ if environ is None else environ
        workspace_uri = _get(env, "ARF_K8S_WORKSPACE_URI") and _local_uri(
            env, "ARF_K8S_WORKSPACE_URI", "ARF_K8S_WORKSPACE_PVC", "/workspace")
        pull_secrets = tuple(s.strip() for s in (_get(env, "ARF_K8S_IMAGE_PULL_SECRETS") or "")
                             .split(",") if s.strip())
        for secret in pull_secrets:
            if not _DNS1123_SUBDOMAIN.match(secret):
                raise KubernetesConfigError(f"ARF_K8S_IMAGE_PULL_SECRETS: {secret!r} is not a "
                                            f"Secret name ({_SUBDOMAIN_RULE}); write "
                                            "comma-separated names")
        namespace = _name(env, "ARF_K8S_NAMESPACE", "arf-training", what="namespace")
        if not namespace:
            raise KubernetesConfigError("ARF_K8S_NAMESPACE is set but empty; every object needs "
                                        "a namespace: unset it or write e.g. arf-training")
        return cls(
            namespace=namespace,
            image=_image(env),
            image_pull_policy=_choice(env, "ARF_K8S_IMAGE_PULL_POLICY", "IfNotPresent",
                                      ("IfNotPresent", "Always", "Never")),
            image_pull_secrets=pull_secrets,
            service_account=_name(env, "ARF_K8S_SERVICE_ACCOUNT", None, what="service account",
                                  subdomain=True),
            workspace_pvc=_name(env, "ARF_K8S_WORKSPACE_PVC", "arf-workspace",
                                what="PersistentVolumeClaim", subdomain=True),
            workspace_mount_path=(_get(env, "ARF_K8S_WORKSPACE_MOUNT") or workspace_uri
                                  and urlparse(workspace_uri).path or "/workspace"),
            tracking_uri=_no_credentials("ARF_K8S_TRACKING_URI", _get(env, "ARF_K8S_TRACKING_URI"))
            or "http://mlflow:5000",
            artifact_root=_get(env, "ARF_K8S_ARTIFACT_ROOT") or "",
            datahub_uri=_local_uri(env, "ARF_K8S_DATAHUB_URI", "ARF_K8S_DATAHUB_PVC", "/datahub"),
            datahub_pvc=_name(env, "ARF_K8S_DATAHUB_PVC", "arf-datahub",
                              what="PersistentVolumeClaim", subdomain=True),
            mlflow_secret=_name(env, "ARF_K8S_MLFLOW_SECRET", None, what="Secret", subdomain=True),
            datahub_secret=_name(env, "ARF_K8S_DATAHUB_SECRET", None, what="Secret",
                                 subdomain=True),
            secret_env=_secret_env(env),
            node_selector=_node_selector(env),
            tolerations=_tolerations(env),
            spot_toleration_key=_get(env, "ARF_K8S_SPOT_TOLERATION_KEY") or "arf.dev/spot",
            spot_toleration_value=_get(env, "ARF_K8S_SPOT_TOLERATION_VALUE") or "true",
            spot_node_label=_label_pair("ARF_K8S_SPOT_NODE_LABEL", _get(
                env, "ARF_K8S_SPOT_NODE_LABEL") or "arf.dev/spot=true"),
            spot_affinity=_choice(env, "ARF_K8S_SPOT_AFFINITY", "preferred",
                                  ("preferred", "required")),
            priority_class=_name(env, "ARF_K8S_PRIORITY_CLASS", None, what="PriorityClass",
                                 subdomain=True),
            kueue_queue=_name(env, "ARF_K8S_KUEUE_QUEUE", None, what="Kueue LocalQueue",
                              subdomain=True),
            volcano_queue=_name(env, "ARF_K8S_VOLCANO_QUEUE", None, what="Volcano queue",
                                subdomain=True),
            ttl_seconds_after_finished=_int(env, "ARF_K8S_TTL_SECONDS_AFTER_FINISHED", 3600),
            backoff_limit=_int(env, "ARF_K8S_BACKOFF_LIMIT", 3),
            clean_pod_policy=_choice(env, "ARF_K8S_CLEAN_POD_POLICY", "Running",
                                     ("None", "Running", "All")),
            elastic=_bool(env, "ARF_K8S_ELASTIC", False),
            max_restarts=_int(env, "ARF_K8S_MAX_RESTARTS", 3),
            termination_margin_s=_int(env, "ARF_K8S_TERMINATION_MARGIN_S", 15),
        )
