"""Rolling out pixel policies (recipe ``bc_pixels``) for the evaluate step: `evaluation.
environment: reach_pixels`.

Model contract (recipes_vision.PixelPolicy, as registered in MLflow's pt2 format):
``model(image uint8 [B, H, W, 3], state float32 [B, 6]) -> actions float32 [B, 2]``. The frame
size is read from the registered model's signature, so the evaluation renders exactly the
frames the policy was trained on.

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
    """(H, W, 3) when the model at `uri` takes frames (an (image, state) signature), else None."""
    import mlflow.models

    try:
        signature = mlflow.models.get_model_info(uri).signature
    except Exception as exc:  # MLflow raises several types for a missing or odd MLmodel file
        raise EvaluationError(f"cannot read the signature of {uri}: {exc}") from exc
    inputs = signature.inputs.inputs if signature is not None and signature.inputs else []
    if len(inputs) != 2:
        return None
    shape = tuple(getattr(inputs[0], "shape", ()) or ())
    if len(shape) != 4 or shape[-1] != 3:
        return None
    height, width = int(shape[1]), int(shape[2])
    if height != width or height < 1:
        raise EvaluationError(f"{uri} takes {height}x{width} frames; the reach_pixels camera "
                              "renders square frames: train on square frames")
    from arf_trainer.sim.reach_pixels import check_frame_size

    try:  # here, not in the renderer: a bare ValueError there would crash the step unexplained
        check_frame_size(height, f"the frame size of {uri}'s signature")
    except ValueError as exc:
        raise EvaluationError(f"{exc}; the reach_pixels camera cannot render it: train on "
                              "frames of a size it renders") from exc
    return height, width, 3


def pixel_policy(model: Any, uri: str, frame: tuple[int, int, int]) -> Any:
    """`model` (see the contract) as a `reach.Policy` that renders each observation."""
    import torch

    from arf_trainer.sim import reach_pixels

    renderer = reach_pixels.FrameRenderer(frame[0])

    # A batch of two identical rows: a torch.export model's batch dimension is dynamic only
    # for sizes >= 2 (see evaluator.load_policy).
    @torch.inference_mode()
    def act(image: np.ndarray, state: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.repeat(image[None], 2, axis=0))
        states = torch.from_numpy(np.repeat(state.reshape(1, -1).astype(np.float32), 2, axis=0))
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
