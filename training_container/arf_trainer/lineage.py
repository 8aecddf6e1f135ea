"""Read back what a training run recorded, so that it can be re-run and compared.

`arf-trainer lineage RUN_ID` prints, as JSON, everything `arf training reproduce` needs: the
resolved template, trigger conf, hyperparameters and seed, the data table versions and
fingerprint, the world size, and the final weights' sha256.
"""

from __future__ import annotations

import json
from typing import Any

from arf_trainer.errors import SpecError
from arf_trainer.tracking import shown_uri


def read_lineage(tracking_uri: str, run_id: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from arf_trainer import tracking

    client = tracking.configure(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise SpecError(f"MLflow run {run_id!r} not found at {shown_uri(tracking_uri)}: "
                        f"{exc.message}. Pass the training run id (the model version's "
                        "arf.training_run_id tag, or the run id shown by the train step)") from exc
    tags = run.data.tags
    missing = [k for k in ("arf.template", "arf.data_tables", "arf.weights_sha256",
                           "arf.world_size") if k not in tags]
    if missing:
        raise SpecError(f"MLflow run {run_id} lacks {missing}: it is not a finished arf-training "
                        "training run, so it cannot be reproduced")
    resolved = _resolved_config(client, run_id)

    def tag(name: str, parse: Any, default: str | None = None) -> Any:
        """A tag parsed as recorded; an edited or damaged one is named, not a traceback."""
        try:
            return parse(tags.get(name, default))
        except (TypeError, ValueError) as exc:
            raise SpecError(f"MLflow run {run_id} has {name}={tags.get(name)!r:.80}, which is "
                            f"not what the train step records ({exc}); restore the tag, or "
                            "reproduce another run") from None

    return {
        "run_id": run_id,
        "template": resolved["template"],
        "hyperparameters": resolved["hyperparameters"],
        "seed": resolved["seed"],
        "conf": tag("arf.conf", _json_object, "{}"),
        "template_sha256": tags.get("arf.template_sha256"),
        "data_tables": tag("arf.data_tables", _json_object),
        "data_fingerprint": tags.get("arf.data_fingerprint"),
        "world_size": tag("arf.world_size", _positive),
        "weights_sha256": tags["arf.weights_sha256"],
        "code_version": tag("arf.code_version", _json_object, "{}"),
        "torch_version": tags.get("arf.torch_version"),
        "local_torch_version": _torch_version(),
        "dag_run": tags.get("arf.dag_run"),
        # A fine-tune's base as it was resolved (reproduce pins this version, not the alias).
        "base_model": tags.get("arf.base_model"),
        "base_model_version": tags.get("arf.base_model_version"),
        "recipe": tags.get("arf.recipe"),
        # Whether the run's configuration is known to rerun bit for bit, and why (None: a run
        # of a custom command, or one recorded before the tag existed).
        "bitwise_reproducible": tags.get("arf.bitwise_reproducible"),
        "bitwise_reproducible_reason": tags.get("arf.bitwise_reproducible_reason"),
    }


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("not a positive whole number")
    return value


def _resolved_config(client: Any, run_id: str) -> dict[str, Any]:
    """The run's arf/resolved_config.json (template, hyperparameters, seed), checked."""
    from mlflow.exceptions import MlflowException

    try:
        with open(client.download_artifacts(run_id, "arf/resolved_config.json")) as fh:
            resolved = json.load(fh)
    except (MlflowException, OSError, ValueError) as exc:
        raise SpecError(f"MLflow run {run_id}: its artifact arf/resolved_config.json cannot be "
                        f"read ({exc}); the run's record is incomplete, so it cannot be "
                        "reproduced") from None
    if not isinstance(resolved, dict) or any(k not in resolved for k in
                                             ("template", "hyperparameters", "seed")):
        raise SpecError(f"MLflow run {run_id}: arf/resolved_config.json lacks template, "
                        "hyperparameters or seed; it cannot be reproduced")
    return resolved


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__
