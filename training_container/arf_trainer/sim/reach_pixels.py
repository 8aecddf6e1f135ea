"""The reaching task seen through a camera: the same MuJoCo `Reacher-v5` episodes, expert and
success criterion as `arf_trainer.sim.reach`, observed as an RGB frame plus the joint state.

Observation:
    image  uint8 [size, size, 3]: a top-down view of the arena (`FrameRenderer`);
    state  float32 [STATE_DIM]: [cos q0, cos q1, sin q0, sin q1, qdot0, qdot1].
The state deliberately holds no target position and no fingertip-to-target vector (Reacher's
observation has both): a policy must find the target in the image.

Why a renderer of its own rather than `gym.make(..., render_mode="rgb_array")`: the frame is
drawn from a second, render-only copy of the MJCF in which the target and fingertip spheres are
drawn larger (a 9 mm target is under one pixel in a 16x16 test frame and ~1.5 pixels at 64x64);
those geoms have no contacts, so physics is untouched, and the simulation itself runs exactly
as in `reach` (same env, same seeds, same success). The camera is a fixed top-down view of the
reachable disc (radius 0.21 m), so the image coordinates are the arena's coordinates.

Offscreen OpenGL: EGL by default (`MUJOCO_GL` unset or `egl`), which renders on Mesa's software
rasterizer on a CPU machine (a few ms a 64x64 frame) and on the GPU's EGL driver where there is
one; `MUJOCO_GL=osmesa` (libosmesa6) works too. The context is made here, not by
`mujoco.Renderer`, so it does not matter which backend `mujoco` chose when it was imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from arf_trainer.errors import EvaluationError
from arf_trainer.sim import reach

STATE_DIM = 6
STATE_COLUMNS = ("cos_q0", "cos_q1", "sin_q0", "sin_q1", "qdot_0", "qdot_1")
DEFAULT_FRAME_SIZE = 64
MIN_FRAME_SIZE, MAX_FRAME_SIZE = 8, 256
# Half the width of the square the camera sees, in metres: the reachable disc (0.21 m) plus a
# margin for the drawn spheres.
VIEW_HALF_WIDTH = 0.235
# Drawn radii (metres) of the render-only spheres; the physical ones are 9 mm and 10 mm.
TARGET_DRAWN_RADIUS = 0.02
FINGERTIP_DRAWN_RADIUS = 0.015

# policy(image [H, W, 3] uint8, state [STATE_DIM] float32) -> action [2]
PixelPolicy = Callable[[np.ndarray, np.ndarray], np.ndarray]

_STATE_INDEX = [0, 1, 2, 3, 6, 7]  # of Reacher's observation: the cos/sin and qdot entries


def state_of(obs: np.ndarray) -> np.ndarray:
    """The joint state [.., STATE_DIM] of Reacher observations [.., 10] (no target in it)."""
    return np.asarray(obs, dtype=np.float32)[..., _STATE_INDEX]


def check_frame_size(size: object, field: str = "frame size") -> int:
    """`size` as an int in [MIN_FRAME_SIZE, MAX_FRAME_SIZE], or an error naming `field`."""
    if isinstance(size, bool) or not isinstance(size, int) \
            or not MIN_FRAME_SIZE <= size <= MAX_FRAME_SIZE:
        raise ValueError(f"{field}={size!r} must be an integer from {MIN_FRAME_SIZE} to "
                         f"{MAX_FRAME_SIZE} (pixels per side; e.g. {DEFAULT_FRAME_SIZE})")
    return size


class FrameRenderer:
    """Top-down RGB frames [size, size, 3] uint8 of a Reacher state, offscreen.

    `render(qpos)` draws the arm and target at joint positions `qpos` (Reacher's 4: two arm
    angles, target x, y). Deterministic for a given machine and GL driver. Not thread-safe;
    `close()` frees the GL context.
    """

    def __init__(self, size: int = DEFAULT_FRAME_SIZE) -> None:
        import mujoco

        self.size = check_frame_size(size)
        model = mujoco.MjModel.from_xml_path(str(reach._mjcf_path()))
        model.geom_size[model.geom("target").id, 0] = TARGET_DRAWN_RADIUS
        model.geom_size[model.geom("fingertip").id, 0] = FINGERTIP_DRAWN_RADIUS
        self._model, self._data, self._mujoco = model, mujoco.MjData(model), mujoco
        self._gl = _offscreen_context(self.size)
        self._gl.make_current()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._scene = mujoco.MjvScene(model, maxgeom=64)
        # Shadows and reflections cost most of a frame and carry nothing the policy needs.
        self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, self.size, self.size)
        camera = mujoco.MjvCamera()
        camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        camera.lookat[:] = (0.0, 0.0, 0.0)
        camera.elevation, camera.azimuth = -90.0, 90.0  # straight down, +x to the right
        # Distance at which the vertical field of view spans +-VIEW_HALF_WIDTH.
        camera.distance = VIEW_HALF_WIDTH / np.tan(np.radians(model.vis.global_.fovy / 2))
        self._camera = camera
        self._pixels = np.empty((self.size, self.size, 3), dtype=np.uint8)

    def render(self, qpos: np.ndarray) -> np.ndarray:
        mujoco = self._mujoco
        self._data.qpos[:] = qpos
        mujoco.mj_kinematics(self._model, self._data)
        self._gl.make_current()
        mujoco.mjv_updateScene(self._model, self._data, self._option, None, self._camera,
                               mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._context)
        mujoco.mjr_readPixels(self._pixels, None, self._rect, self._context)
        return np.flipud(self._pixels).copy()  # OpenGL's rows run bottom-up

    def close(self) -> None:
        """Free the GL resources, with this renderer's context current: MuJoCo frees a render
        context on whichever GL context is current, so freeing it under another renderer's
        (as the garbage collector would) deletes that renderer's framebuffer instead."""
        if self._context is None:
            return
        self._gl.make_current()
        self._context.free()
        self._context = None
        self._gl.free()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have freed EGL first
            self.close()


def _offscreen_context(size: int):
    """An EGL (default) or OSMesa GL context, whichever MUJOCO_GL names.

    Created here rather than through `mujoco.Renderer`, which uses the backend `mujoco` chose
    when it was first imported (GLFW unless MUJOCO_GL was set by then, and GLFW needs a
    display): any process that imported mujoco earlier (gymnasium does) would fail.
    """
    import os

    backend = os.environ.get("MUJOCO_GL", "").strip().lower() or "egl"
    packages = {"egl": "libegl1 libegl-mesa0 libopengl0 libgl1-mesa-dri", "osmesa": "libosmesa6"}
    if backend not in packages:
        raise EvaluationError(
            f"MUJOCO_GL={backend!r}: the reach_pixels camera renders offscreen and needs "
            "MUJOCO_GL=egl (the default) or MUJOCO_GL=osmesa")
    try:
        if backend == "egl":
            from mujoco.egl import GLContext
        else:
            from mujoco.osmesa import GLContext
        return GLContext(size, size)
    except Exception as exc:  # missing libraries surface as ImportError, OSError, GL errors
        raise EvaluationError(
            f"cannot create an offscreen OpenGL context for MuJoCo with MUJOCO_GL={backend}: "
            f"{type(exc).__name__}: {exc}. Install the libraries (Debian: apt-get install "
            f"{packages[backend]}), or try the other backend (MUJOCO_GL=egl or osmesa)"
        ) from exc


class PixelRollout(NamedTuple):
    """One episode observed through the camera. `rollout` has the full Reacher observations
    (what the failures table and the expert relabelling use); `frames[t]` and
    `state_of(rollout.observations[t])` are what the policy saw at step t."""

    rollout: reach.Rollout
    frames: np.ndarray  # [EPISODE_STEPS, size, size, 3] uint8


def qpos_of(obs: np.ndarray) -> np.ndarray:
    """Reacher's joint positions [q0, q1, target_x, target_y] from one observation [10]: all a
    frame depends on, so frames are a function of the observation alone."""
    obs = np.asarray(obs, dtype=np.float64)
    return np.array([np.arctan2(obs[2], obs[0]), np.arctan2(obs[3], obs[1]), obs[4], obs[5]])


class Camera:
    """A `reach.Policy` (full observation -> action) that renders the frame of each observation
    and hands it to `act(frame, obs)`; keeps the frames when `keep_frames`."""

    def __init__(self, renderer: FrameRenderer,
                 act: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 keep_frames: bool = False) -> None:
        self.renderer, self.act, self.keep_frames = renderer, act, keep_frames
        self.frames: list[np.ndarray] = []

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        frame = self.renderer.render(qpos_of(obs))
        if self.keep_frames:
            self.frames.append(frame)
        return self.act(frame, obs)


def seen_by(policy_fn: PixelPolicy, renderer: FrameRenderer,
            keep_frames: bool = False) -> Camera:
    """`policy_fn` (frame, joint state) as a `reach.Policy`: it sees only the frame and the
    joint state of each observation, never the target position."""
    return Camera(renderer, lambda frame, obs: policy_fn(frame, state_of(obs)), keep_frames)


def rollout(act: Callable[[np.ndarray, np.ndarray], np.ndarray], seed: int,
            renderer: FrameRenderer, *, env=None, action_noise: float = 0.0,
            noise_rng: np.random.Generator | None = None) -> PixelRollout:
    """`reach.rollout` with frames: the same episode, initial state and noise stream;
    `act(frame, obs)` gets each frame with the full observation (the expert needs the target;
    wrap a pixel policy with `seen_by` to hide it). Returns the episode and its frames."""
    camera = Camera(renderer, act, keep_frames=True)
    result = reach.rollout(camera, seed, env=env, action_noise=action_noise, noise_rng=noise_rng)
    return PixelRollout(result, np.stack(camera.frames))
