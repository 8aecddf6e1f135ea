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
        raise SpecError(f"MLflow run {run_id!r} not found at {shown_uri(tracking_uri)}: {exc.message}. "
                        "Pass the training run id (the model version's arf.training_run_id "
                        "tag, or the run id shown by the train step)") from exc
    tags = run.data.tags
    missing = [k for k in ("arf.template", "arf.data_tables", "arf.weights_sha256",
                           "arf.world_size") if k not in tags]
    if missing:
        raise SpecError(f"MLflow run {run_id} lacks {missing}: it is not a finished arf-training "
                        "training run, so it cannot be reproduced")
    path = client.download_artifacts(run_id, "arf/resolved_config.json")
    with open(path) as fh:
        resolved = json.load(fh)
    return {
        "run_id": run_id,
        "template": resolved["template"],
        "hyperparameters": resolved["hyperparameters"],
        "seed": resolved["seed"],
        "conf": json.loads(tags.get("arf.conf", "{}")),
        "template_sha256": tags.get("arf.template_sha256"),
        "data_tables": json.loads(tags["arf.data_tables"]),
        "data_fingerprint": tags.get("arf.data_fingerprint"),
        "world_size": int(tags["arf.world_size"]),
        "weights_sha256": tags["arf.weights_sha256"],
        "code_version": json.loads(tags.get("arf.code_version", "{}")),
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


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__
