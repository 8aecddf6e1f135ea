"""Fine-tuning: the template's `model.base_model` resolved, pinned and loaded.

`models:/<name>@<alias>` (e.g. `@champion`) or `models:/<name>/<version>`. Resolution goes
through the MLflow registry once per training: the resolved version is written to
``<train dir>/base_model/base_model.json`` together with the base weights, and every later
try of the same training (Airflow retry, resume after preemption) uses that file and never asks
the registry again, so a champion promoted mid-run does not change what this run starts from.

The weights come from the base version's training run: the register step logs the exact
state_dict it registered (float32, normalization buffers included) and its `model_info.json`
under the artifact folder `arf/model/` (`arf_trainer.publisher.BASE_ARTIFACTS`), and tags the
version with their sha256 (`arf.weights_sha256`), which is checked here. (The logged pt2 model
is an exported inference graph; its parameters are not a state_dict to build a trainable module
from.)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arf_trainer import tracking
from arf_trainer.errors import RegistryError, SpecError
from arf_trainer.registry import resolve
from arf_trainer.spec import read_json, write_json_atomic
from arf_trainer.trainer.checkpoint import load_weights, state_dict_sha256
from arf_trainer.trainer.recipes import MLP, ModelInfo

log = logging.getLogger(__name__)

ARTIFACT_DIR = "arf/model"
WEIGHTS_FILE = "model.pt"
INFO_FILE = "model_info.json"
PIN_FILE = "base_model.json"
FOLDER = "base_model"


@dataclass(frozen=True)
class BaseModel:
    """The pinned base: the URI as written, what it resolved to, and its loaded weights."""

    uri: str
    name: str
    version: str
    run_id: str
    weights_sha256: str
    info: ModelInfo
    weights: dict[str, torch.Tensor]

    @property
    def tags(self) -> dict[str, str]:
        """Lineage tags of the training run (copied onto the registered version)."""
        return {"arf.base_model": self.uri, "arf.base_model_version": self.version,
                "arf.base_model_run_id": self.run_id}


def pin(uri: str, folder: Path, tracking_uri: str) -> dict[str, Any]:
    """Resolve `uri` once and keep the base in `folder` (rank 0). Returns the pin record.

    A folder pinned by an earlier try for the same URI is reused as it is: retries and resumed
    runs train from the version the first try resolved.
    """
    pin_path = folder / PIN_FILE
    if pin_path.is_file():
        record = read_json(pin_path)
        if record.get("uri") == uri:
            log.info("base model %s: using version %s pinned by an earlier try (%s)", uri,
                     record["version"], pin_path)
            return record
        raise SpecError(f"{pin_path} pins {record.get('uri')!r} but the template now says "
                        f"model.base_model {uri!r}; one workspace holds one training: use a new "
                        "DAG run, or delete the workspace's train/ folder")
    client = tracking.configure(tracking_uri)
    version = resolve(client, uri, tracking_uri)
    sha = (version.tags or {}).get("arf.weights_sha256")
    if not version.run_id or not sha:
        raise SpecError(f"model.base_model {uri!r} resolved to version {version.version}, which "
                        "was not registered by arf-trainer (no training run or no "
                        "arf.weights_sha256 tag); start from a version arf-training registered")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        with tracking.mlflow_errors(tracking_uri, f"download {ARTIFACT_DIR}/ of run "
                                                  f"{version.run_id} ({uri} = version "
                                                  f"{version.version})"):
            try:
                local = Path(client.download_artifacts(version.run_id, ARTIFACT_DIR, tmp))
            except OSError as exc:
                raise SpecError(
                    f"model.base_model {uri!r} = version {version.version}: its training run "
                    f"{version.run_id} has no {ARTIFACT_DIR}/ artifacts (registered by an older "
                    "arf-trainer); re-run its register step or start from a newer version"
                ) from exc
        if not (local / WEIGHTS_FILE).is_file() or not (local / INFO_FILE).is_file():
            raise SpecError(
                f"model.base_model {uri!r} = version {version.version}: run {version.run_id} "
                f"lacks {ARTIFACT_DIR}/{WEIGHTS_FILE} or {INFO_FILE} (registered by an older "
                "arf-trainer); re-run its register step or start from a newer version")
        for name in (WEIGHTS_FILE, INFO_FILE):
            shutil.copyfile(local / name, folder / name)
    record = {"uri": uri, "name": version.name, "version": str(version.version),
              "run_id": version.run_id, "weights_sha256": sha}
    load(record, folder)  # check the sha256 before pinning
    write_json_atomic(pin_path, record)  # last: its presence means "pinned and complete"
    log.info("base model %s resolved to version %s (training run %s)", uri, record["version"],
             record["run_id"])
    return record


def load(record: dict[str, Any], folder: Path) -> BaseModel:
    """The pinned base's weights and ModelInfo, checked against the recorded sha256."""
    weights = load_weights(folder / WEIGHTS_FILE)
    sha = state_dict_sha256(weights)
    if sha != record["weights_sha256"]:
        raise RegistryError(f"{folder / WEIGHTS_FILE} has sha256 {sha}, but version "
                            f"{record['version']} of {record['name']!r} was registered with "
                            f"{record['weights_sha256']}; delete {folder} and retry")
    info = ModelInfo.from_json(read_json(folder / INFO_FILE))
    return BaseModel(uri=record["uri"], name=record["name"], version=record["version"],
                     run_id=record["run_id"], weights_sha256=sha, info=info, weights=weights)


def check_compatible(base: BaseModel, recipe: str, features: list[str], targets: list[str],
                     hyperparameters: dict[str, Any], data: ModelInfo | None = None) -> None:
    """The fine-tune must feed the base the same columns, of the same shapes (`data`: what this
    dataset's model would be), and keep its architecture."""
    info, problems = base.info, []
    if data is not None and info.arrays != data.arrays:
        problems.append(f"its array columns have per-row shapes {info.arrays}, this dataset's "
                        f"{data.arrays}")
    elif data is not None and info.n_features != data.n_features:
        problems.append(f"it takes {info.n_features} input values per row, this dataset gives "
                        f"{data.n_features}")
    if info.recipe != recipe:
        problems.append(f"its recipe is {info.recipe!r}, this template's is {recipe!r}")
    if info.features != features:
        problems.append(f"its features are {info.features}, this dataset gives {features}")
    if info.targets != targets:
        problems.append(f"its targets are {info.targets}, this dataset gives {targets}")
    for key in ("hidden_size", "num_layers"):
        if key in hyperparameters and hyperparameters[key] != getattr(info, key):
            problems.append(f"its {key} is {getattr(info, key)}, the hyperparameter says "
                            f"{hyperparameters[key]} (remove {key}: the base decides it)")
    if problems:
        raise SpecError(f"model.base_model {base.uri!r} (version {base.version}) does not fit "
                        "this template: " + "; ".join(problems))


def freeze(model: MLP, layers: int) -> list[str]:
    """Freeze the first `layers` hidden Linear layers of `model.net`; return their names."""
    linears = [(name, module) for name, module in model.net.named_children()
               if isinstance(module, torch.nn.Linear)]
    hidden = linears[:-1]  # the last Linear is the output layer
    if layers > len(hidden):
        raise SpecError(f"training.freeze_layers={layers}, but the base model has "
                        f"{len(hidden)} hidden layer(s); freeze at most {len(hidden)}")
    frozen = []
    for name, module in hidden[:layers]:
        for pname, parameter in module.named_parameters():
            parameter.requires_grad_(False)
            frozen.append(f"net.{name}.{pname}")
    return frozen
