"""What the register step records of a bc_pixels model (publisher.py): the pt2 export's example
inputs, the MLflow signature and the plugin manifest's `input`.

The inputs are positional tensors: the first camera's frames (`image`), the state, then the
other cameras' frames (`image_1`, ...) in the order of `dataset.features`
(vision_model.input_names). The signature names them, so `mlflow models predict`
and the python_function flavor (pt2_pyfunc.py) take ``{name: array}``; the manifest also names
each camera's column, which is how a consumer knows which camera feeds which input. A camera
stored smaller (`dataset.decode.<c>.downscale`) is recorded at the camera's full size: what a
consumer feeds, and what the model makes smaller itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arf_trainer.trainer.recipes import ModelInfo
from arf_trainer.trainer.recipes_vision import PixelBehaviourCloning
from arf_trainer.trainer.vision_model import STATE_KEY, camera_key, input_names


def manifest_input(info: ModelInfo) -> dict[str, Any]:
    """The plugin manifest's `input` of a bc_pixels model: its positional tensors in order,
    each camera's with its column."""
    cameras = PixelBehaviourCloning.cameras(info)
    tensors = {camera_key(i): {"name": camera_key(i), "column": column, "dtype": "uint8",
                               "shape": [-1, *shape], **({"downscale": k} if k > 1 else {})}
               for i, (column, shape, k) in enumerate(zip(cameras.columns, cameras.served,
                                                          cameras.downscale))}
    tensors[STATE_KEY] = {"name": STATE_KEY, "columns": cameras.state, "dtype": "float32",
                          "shape": [-1, int(info.input_width or 0)]}
    return {"features": info.features,
            "tensors": [tensors[name] for name in input_names(len(cameras.columns))]}


def signature(info: ModelInfo) -> Any:
    """The MLflow signature (image uint8 [-1, H, W, 3], state float32 [-1, S], [image_1 ...])
    -> actions; the evaluator reads the frame size from it (evaluator_pixels.frame_input)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shapes = PixelBehaviourCloning.cameras(info).served
    specs = {camera_key(i): TensorSpec(np.dtype(np.uint8), (-1, *shape), camera_key(i))
             for i, shape in enumerate(shapes)}
    specs[STATE_KEY] = TensorSpec(np.dtype(np.float32), (-1, int(info.input_width or 0)),
                                  STATE_KEY)
    return ModelSignature(
        inputs=Schema([specs[name] for name in input_names(len(shapes))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, info.n_outputs), "action")]))


def export_arguments(workspace: Any, info: ModelInfo, rows: int = 8) -> dict[str, Any]:
    """log_model's input_example (up to `rows` real rows, at least 2 so that torch.export keeps
    the batch dimension dynamic) and signature."""
    import pyarrow.parquet as pq

    from arf_trainer.errors import RegistryError
    from arf_trainer.spec import read_json
    from arf_trainer.trainer.data import read_table_columns

    prepare_dir = workspace / "prepare"
    if (workspace / "federate").is_dir() and not (prepare_dir / "manifest.json").exists():
        # A federated model: no site's rows leave it, so the export traces zeros of its shape
        # (as publisher.input_example does for the MLP recipes).
        shapes = PixelBehaviourCloning.cameras(info).served
        zeros = {camera_key(i): np.zeros((2, *shape), dtype=np.uint8)
                 for i, shape in enumerate(shapes)}
        zeros[STATE_KEY] = np.zeros((2, int(info.input_width or 0)), dtype=np.float32)
        example = tuple(zeros[name] for name in input_names(len(shapes)))
        return {"input_example": example, "signature": signature(info)}
    manifest = read_json(prepare_dir / "manifest.json")
    for split in ("val", "train"):
        for shard in manifest["shards"].get(split, []):
            if shard.get("rows", 0) >= 2:
                table = pq.read_table(prepare_dir / shard["path"], columns=info.features)
                columns = read_table_columns(table.slice(0, rows), info.features, "the example")
                return {"input_example": _served(info, columns),
                        "signature": signature(info)}
    raise RegistryError(f"no shard in {prepare_dir / 'manifest.json'} has 2 rows for the input "
                        "example that the pt2 export needs to keep the batch dimension dynamic")


def _served(info: ModelInfo, columns: Any) -> tuple[np.ndarray, ...]:
    """The export example as a consumer feeds the model: a camera stored `downscale` k times
    smaller given at its full size, each pixel repeated over its k x k block (whose block mean
    is the stored frame again)."""
    recipe = PixelBehaviourCloning()
    cameras = recipe.cameras(info)
    names = input_names(len(cameras.columns))
    example = dict(zip(names, recipe.export_example(info, columns), strict=True))
    for index, k in enumerate(cameras.downscale):
        if k > 1:
            frames = example[camera_key(index)]
            example[camera_key(index)] = np.repeat(np.repeat(frames, k, axis=1), k, axis=2)
    return tuple(example[name] for name in names)
