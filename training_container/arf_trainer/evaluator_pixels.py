"""Rolling out pixel policies (recipe ``bc_pixels``) for the evaluate step: `evaluation.
environment: reach_pixels`.

Model contract (recipes_vision.PixelPolicy, as registered in MLflow's pt2 format):
``model(image uint8 [B, H, W, 3], state float32 [B, 6]) -> actions float32 [B, 2]``. The frame
size is read from the registered model's signature, so the evaluation renders exactly the
frames the policy was trained on. The state is the camera's joint state (`reach_pixels.
STATE_COLUMNS`), given to a bc_pixels model by the names of the state columns it was trained
on (any order, or some of them: `state_index`), to any other model by position.

A pixel policy becomes an ordinary `reach.Policy` (full observation -> action) through
`reach_pixels.seen_by`: it renders the observation's frame and passes the policy only that
frame and the joint state. Everything downstream of `evaluator.load_policy` (rollouts, the
success statistics, the failures table, the promotion gate) is therefore the same as for
`reach`: the same seeds, the same success criterion, the same records.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arf_trainer.errors import EvaluationError

CONTRACT = ("a torch.nn.Module mapping (image uint8 [B, H, W, 3], state float32 [B, 6]) -> "
            "actions float32 [B, 2]")


def frame_input(uri: str) -> tuple[int, int, int] | None:
    """(H, W, 3) when the model at `uri` takes frames (an (image, state) signature), else None;
    an error for a model of several cameras (image, state, image_1, ...), which this one camera
    cannot feed."""
    import mlflow.models

    try:
        signature = mlflow.models.get_model_info(uri).signature
    except Exception as exc:  # MLflow raises several types for a missing or odd MLmodel file
        raise EvaluationError(f"cannot read the signature of {uri}: {exc}") from exc
    inputs = signature.inputs.inputs if signature is not None and signature.inputs else []
    shape = tuple(getattr(inputs[0], "shape", ()) or ()) if len(inputs) >= 2 else ()
    if len(shape) != 4:
        return None
    frames = [spec for spec in inputs if len(tuple(getattr(spec, "shape", ()) or ())) == 4]
    if len(frames) > 1:  # bc_pixels of several cameras: (image, state, image_1, ...)
        names = [getattr(spec, "name", None) for spec in inputs]
        raise EvaluationError(f"{uri} takes {len(frames)} camera inputs (signature inputs "
                              f"{names}); the reach_pixels camera renders one view: evaluate a "
                              f"one-camera model there (the model contract is {CONTRACT})")
    height, width, channels = (int(s) for s in shape[1:])
    if channels != 3 or min(height, width) < 1:
        # Still a frame input, one the camera cannot fill: say so rather than "no frames".
        raise EvaluationError(f"{uri} takes frames of shape {list(shape)} (batch, height, "
                              "width, channels; -1 is any size) in its signature; the "
                              "reach_pixels camera renders RGB frames of one size: log the "
                              "model with a signature image [-1, H, W, 3] (the model contract "
                              f"is {CONTRACT})")
    if height != width:
        raise EvaluationError(f"{uri} takes {height}x{width} frames; the reach_pixels camera "
                              "renders square frames: train on square frames")
    from arf_trainer.sim.reach_pixels import check_frame_size

    try:  # here, not in the renderer: a bare ValueError there would crash the step unexplained
        check_frame_size(height, f"the frame size of {uri}'s signature")
    except ValueError as exc:
        raise EvaluationError(f"{exc}; the reach_pixels camera cannot render it: train on "
                              "frames of a size it renders") from exc
    return height, width, 3


def state_index(uri: str) -> list[int]:
    """Which of the camera's joint state values (reach_pixels.STATE_COLUMNS) the model at `uri`
    takes, in its order. By name when its training recorded the state columns (the plugin
    manifest of a bc_pixels model) and they are the camera's: a template may list them in
    another order, or only some, and fed by position such a model would get the wrong values
    without an error. Otherwise by position: the contract's 6 values."""
    import mlflow

    from arf_trainer.sim.reach_pixels import STATE_COLUMNS, STATE_DIM

    try:
        spec = mlflow.models.get_model_info(uri).signature.inputs.inputs[1]
        width = int(tuple(spec.shape)[1])
        columns = _state_columns(uri)
    except Exception as exc:  # MLflow raises several types for missing runs and artifacts
        raise EvaluationError(f"cannot read the state input of {uri}: {exc}") from exc
    if columns is not None and set(columns) <= set(STATE_COLUMNS) and len(columns) == width:
        return [STATE_COLUMNS.index(name) for name in columns]
    if width != STATE_DIM:
        raise EvaluationError(
            f"{uri} takes a state of {width} values (its signature; state columns "
            f"{columns if columns is not None else 'not recorded'}); reach_pixels gives the "
            f"{STATE_DIM} joint state values {list(STATE_COLUMNS)}: train with those state "
            f"features (any order, or some of them, by these names). The contract is {CONTRACT}")
    return list(range(STATE_DIM))


def _state_columns(uri: str) -> list[str] | None:
    """The state columns recorded by the registered model's training run, or None."""
    import mlflow

    from arf_trainer.publisher import MANIFEST_ARTIFACT

    if not uri.startswith("models:/"):
        return None
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    client = mlflow.MlflowClient()
    model_version = client.get_model_version(name, version)
    run_id = model_version.tags.get("arf.training_run_id") or model_version.run_id
    if not run_id or MANIFEST_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        return None  # not registered by arf-trainer register (e.g. a template's own command)
    manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/{MANIFEST_ARTIFACT}")
    tensors = (manifest.get("input") or {}).get("tensors") or []
    state = [t for t in tensors if isinstance(t, dict) and t.get("name") == "state"]
    return list(state[0]["columns"]) if state and "columns" in state[0] else None


def pixel_policy(model: Any, uri: str, frame: tuple[int, int, int]) -> Any:
    """`model` (see the contract) as a `reach.Policy` that renders each observation."""
    import torch

    from arf_trainer.sim import reach_pixels

    index = state_index(uri)
    renderer = reach_pixels.FrameRenderer(frame[0])

    # A batch of two identical rows: a torch.export model's batch dimension is dynamic only
    # for sizes >= 2 (see evaluator.load_policy).
    @torch.inference_mode()
    def act(image: np.ndarray, state: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.repeat(image[None], 2, axis=0))
        row = state.reshape(1, -1)[:, index].astype(np.float32)
        states = torch.from_numpy(np.repeat(row, 2, axis=0))
        try:
            out = model(images, states)
        except Exception as exc:
            raise EvaluationError(f"{uri} failed on a frame batch {tuple(images.shape)} and a "
                                  f"state batch {tuple(states.shape)}: {exc}; the model contract "
                                  f"is {CONTRACT}") from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 2):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise EvaluationError(f"{uri} returned {shape} for a batch of 2 frames; the model "
                                  f"contract is {CONTRACT}")
        action = out[0].detach().cpu().numpy().astype(np.float32)
        if not np.all(np.isfinite(action)):
            raise EvaluationError(f"{uri} produced a non-finite action {action.tolist()} for "
                                  f"joint state {state.tolist()}")
        return action

    policy = reach_pixels.seen_by(act, renderer)
    policy.pixels = frame  # what evaluator.check_environment reads
    return policy


def check_environment(environment: str, policy: Any, uri: str) -> None:
    """A pixel policy is evaluated in reach_pixels and a state policy in reach, not crossed."""
    frame = getattr(policy, "pixels", None)
    if environment == "reach_pixels" and frame is None:
        raise EvaluationError(f"evaluation.environment is reach_pixels but {uri} takes no "
                              f"frames; reach_pixels evaluates {CONTRACT} (recipe bc_pixels). "
                              "Use environment: reach for a state policy")
    if environment != "reach_pixels" and frame is not None:
        raise EvaluationError(f"{uri} takes {frame[0]}x{frame[1]} frames but "
                              f"evaluation.environment is {environment}; use environment: "
                              "reach_pixels for a pixel policy")
