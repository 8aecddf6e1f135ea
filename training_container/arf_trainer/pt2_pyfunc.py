"""The python_function flavor of every registered model, beside MLflow's pt2 pytorch flavor.

`mlflow.pyfunc.load_model`, `mlflow models serve` and `mlflow models predict` need the
python_function flavor. MLflow 3's pytorch flavor has two gaps for the models the publisher logs
(`serialization_format="pt2"`):

* it adds python_function only to a pt2 model of one input (the MLP recipes), not to bc_pixels
  (image uint8, state float32), and its pyfunc predict takes one array anyway;
* its pyfunc loader picks CUDA whenever the host has a GPU (unless the model's config names a
  device), and a pt2 archive exported on the CPU, as the publisher exports, then refuses to load.

So the publisher logs through `log_model` here: `mlflow.pytorch.save_model` writes the model
unchanged, then

* a model that got python_function (one input) keeps MLflow's own loader (`mlflow.pytorch`:
  a float32 array or a DataFrame of the feature columns in, an array out), pinned to the CPU;
* a model of several named inputs gets a python_function flavor whose loader is this file,
  copied into the model as ``code/arf_pt2_pyfunc.py``: predict takes ``{name: array}`` (MLflow
  first checks names, dtypes and shapes against the signature) and calls the pt2 graph with
  the arrays as positional tensors, in the signature's order.

What loading runs. `mlflow.pytorch.load_model` reads the pt2 archive only: torch alone, the
pytorch flavor records no code. `mlflow.pyfunc.load_model` of a several-input model imports
this file from the model's ``code/`` folder: source, not pickle, importing numpy, torch and
mlflow only. It must never import arf_trainer (a model server has no arf-trainer installed),
and it loads the archive through `mlflow.pytorch.load_model`, so with MLflow's check that the
archive holds no pickle payload. Python imports a module once per process, so a process
serving several such models runs the first one's copy for all (as with any MLflow
``code_paths``): keep the load side's contract (``model_config["inputs"]``, predict on
``{name: array}``) compatible with the models already registered.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import numpy as np

LOADER_MODULE = "arf_pt2_pyfunc"  # this file's name inside a model: unlikely to shadow another
CODE_DIR = "code"
# Where the publisher exports (it loads the weights with map_location="cpu"): the only device
# a pt2 archive loads on, in MLflow's rule.
DEVICE = "cpu"


def log_model(pytorch_model: Any, name: str, run_id: str, **kwargs: Any) -> Any:
    """`mlflow.pytorch.log_model(..., serialization_format="pt2", **kwargs)` with the
    python_function flavor described above; returns MLflow's ModelInfo."""
    from mlflow.models import Model

    return Model.log(artifact_path=None, name=name, run_id=run_id, flavor=sys.modules[__name__],
                     flavor_name="mlflow.pytorch", pytorch_model=pytorch_model,
                     serialization_format="pt2", **kwargs)


def save_model(pytorch_model: Any, path: str, mlflow_model: Any, **kwargs: Any) -> None:
    """`Model.log`'s flavor hook: the pytorch flavor as MLflow saves it, then python_function."""
    import mlflow.pytorch
    from mlflow import pyfunc
    from mlflow.models.model import MLMODEL_FILE_NAME

    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    flavor = mlflow_model.flavors.get(pyfunc.FLAVOR_NAME)
    if flavor is not None:
        flavor[pyfunc.MODEL_CONFIG] = {"device": DEVICE}
    else:
        names = [spec.name for spec in mlflow_model.signature.inputs.inputs]
        if None in names:
            raise ValueError(f"a pt2 model of several inputs needs a signature naming each "
                             f"input (TensorSpec(..., name)), got {mlflow_model.signature}")
        os.makedirs(os.path.join(path, CODE_DIR))
        shutil.copyfile(__file__, os.path.join(path, CODE_DIR, f"{LOADER_MODULE}.py"))
        pyfunc.add_to_model(
            mlflow_model, loader_module=LOADER_MODULE,
            data=mlflow_model.flavors[mlflow.pytorch.FLAVOR_NAME]["model_data"], code=CODE_DIR,
            conda_env="conda.yaml", python_env="python_env.yaml",
            model_config={"device": DEVICE, "inputs": names})
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


# -- load side: runs inside a model server, from the model's code/ folder --------------------

def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> NamedInputs:
    """python_function's loader hook for a several-input model."""
    import mlflow.pytorch

    config = {"device": DEVICE, **(model_config or {})}
    # data_path is <model>/<model_data>; the public loader takes the model's root.
    root = os.path.dirname(os.path.abspath(data_path))
    model = mlflow.pytorch.load_model(root, device=config["device"])
    return NamedInputs(model, list(config["inputs"]), config["device"])


class NamedInputs:
    """predict({name: array}) -> array: the pt2 graph called with the arrays in order."""

    def __init__(self, model: Any, inputs: list[str], device: str) -> None:
        self.model, self.inputs, self.device = model, inputs, device

    def get_raw_model(self) -> Any:
        return self.model

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        missing = [n for n in self.inputs if not isinstance(data, dict) or n not in data]
        if missing:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise TypeError(f"this model takes a dict of arrays named {self.inputs} (its "
                            f"signature gives each one's dtype and shape); got {got}")
        tensors = [torch.from_numpy(np.ascontiguousarray(data[n])).to(self.device)
                   for n in self.inputs]
        with torch.no_grad():
            return self.model(*tensors).detach().cpu().numpy()
