"""The planar reaching task (gymnasium `Reacher-v5`, MuJoCo): environment, scripted expert,
success criterion and rollouts. Used by the demo seeder (expert demonstrations) and the
evaluator (policy rollouts), so both agree on what "success" means.

Observation (10 floats, the standard Reacher-v5 one):
    [cos q0, cos q1, sin q0, sin q1, target_x, target_y, qdot0, qdot1, tip_x - target_x,
     tip_y - target_y]
Action (2 floats in [-1, 1]): joint torque commands (the MJCF scales them by gear 200).
An episode is 50 steps of 0.02 s.

The expert is a Jacobian PD controller in task space, torque = Kp * J# (target - tip) - Kd qdot,
where J# is the damped least-squares inverse J^T (J J^T + lambda^2 I)^-1 rather than the plain
transpose J^T. Why: every episode starts with the arm almost straight (q ~ 0), where the plain
transpose gives almost no radial pull, and targets near the base stall it (about 10-15% of
episodes end > 2 cm away, whatever the gains). The damped inverse keeps the same structure and
stays bounded near the singularity. Joint angles come from atan2 of the observed sin/cos, the
fingertip from forward kinematics with the link lengths read from the MJCF (`link_lengths`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import gymnasium as gym
import numpy as np

ENV_ID = "Reacher-v5"
EPISODE_STEPS = 50
OBS_DIM = 10
ACT_DIM = 2

# Expert gains, tuned on 900 seeded episodes (grid over KP 1-3, KD 0.25-0.4, lambda
# 0.01-0.05): the fastest setting that still settles without oscillating inside the 1 s
# episode. Faster settling also matters for behaviour cloning: a clone of a slower expert
# (KP=1) ran out of time on ~30% more episodes than its expert.
EXPERT_KP = 2.0
EXPERT_KD = 0.35
EXPERT_DLS_DAMPING = 0.02  # lambda, in metres: below this tip error the inverse stops growing

# Success: the fingertip centre ends within 1 cm of the target centre (the fingertip sphere's
# radius; the spheres then overlap). Measured over 2000 seeds (0-499, 1000-1499, 5000-5499,
# 100000-100499): the expert succeeds on 97.4% of episodes (96.8-97.8% per block) and on 93.6%
# with the demo seeder's exploration noise (std 0.2), which is what the reach_demos `success`
# column records; 98% on the reach_bc template's evaluation seeds 100000-100049. A template's
# success_threshold of 0.8 therefore asks a learned policy for ~82% of the expert's success.
SUCCESS_DISTANCE = 0.01

Policy = Callable[[np.ndarray], np.ndarray]


class Rollout(NamedTuple):
    """One episode. `actions[t]` is what the policy asked for at `observations[t]`."""

    observations: np.ndarray  # [EPISODE_STEPS, OBS_DIM] float32
    actions: np.ndarray  # [EPISODE_STEPS, ACT_DIM] float32
    final_distance: float
    success: bool


def _mjcf_path() -> Path:
    import gymnasium.envs.mujoco as mujoco_envs

    return Path(mujoco_envs.__file__).parent / "assets" / "reacher.xml"


@functools.lru_cache(maxsize=1)
def link_lengths() -> tuple[float, float]:
    """(upper arm, forearm-to-fingertip) lengths in metres, read from the Reacher MJCF."""
    import mujoco

    model = mujoco.MjModel.from_xml_path(str(_mjcf_path()))
    # body1 sits at the end of link 0, the fingertip at the end of link 1 (each along local x).
    upper = float(np.linalg.norm(model.body("body1").pos[:2]))
    fore = float(np.linalg.norm(model.body("fingertip").pos[:2]))
    return upper, fore


def make_env(seed: int | None = None) -> gym.Env:
    """A Reacher-v5 environment with the 50-step limit; reset with `seed` if one is given."""
    env = gym.make(ENV_ID, max_episode_steps=EPISODE_STEPS, disable_env_checker=True)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def _state_from_obs(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = np.arctan2(obs[..., 2:4], obs[..., 0:2])
    return q, obs[..., 6:8], obs[..., 4:6]


def expert_action(env_or_obs: gym.Env | np.ndarray) -> np.ndarray:
    """The scripted expert's action for an observation [10] or a batch [B, 10], or for an env.

    With an env, the state is read from its MuJoCo data (joint angles, velocities, target);
    the result is the same as from the observation up to float rounding.
    """
    if isinstance(env_or_obs, gym.Env):
        data = env_or_obs.unwrapped.data  # type: ignore[attr-defined]
        q, qdot, target = data.qpos[:2].copy(), data.qvel[:2].copy(), data.qpos[2:4].copy()
    else:
        obs = np.asarray(env_or_obs, dtype=np.float64)
        if obs.shape[-1] != OBS_DIM:
            raise ValueError(
                f"expert_action expects Reacher-v5 observations of {OBS_DIM} values, got an "
                f"array of shape {obs.shape}"
            )
        q, qdot, target = _state_from_obs(obs)
    upper, fore = link_lengths()
    q0, q1 = q[..., 0], q[..., 1]
    s1, c1, s12, c12 = np.sin(q0), np.cos(q0), np.sin(q0 + q1), np.cos(q0 + q1)
    err_x = target[..., 0] - (upper * c1 + fore * c12)
    err_y = target[..., 1] - (upper * s1 + fore * s12)
    # Jacobian of the fingertip, J = [[j11, j12], [j21, j22]], and the 2x2 solve written out:
    # this runs once per simulation step, where np.linalg on tiny arrays costs more than physics.
    j11, j12 = -upper * s1 - fore * s12, -fore * s12
    j21, j22 = upper * c1 + fore * c12, fore * c12
    damping = EXPERT_DLS_DAMPING**2
    a11 = j11 * j11 + j12 * j12 + damping
    a12 = j11 * j21 + j12 * j22
    a22 = j21 * j21 + j22 * j22 + damping
    det = a11 * a22 - a12 * a12
    y1, y2 = (a22 * err_x - a12 * err_y) / det, (a11 * err_y - a12 * err_x) / det
    action = np.stack([EXPERT_KP * (j11 * y1 + j21 * y2) - EXPERT_KD * qdot[..., 0],
                       EXPERT_KP * (j12 * y1 + j22 * y2) - EXPERT_KD * qdot[..., 1]], axis=-1)
    return np.clip(action, -1.0, 1.0).astype(np.float32)


def final_distance(obs: np.ndarray) -> float:
    """Fingertip-to-target distance (metres) in an observation, as the environment reports it."""
    return float(np.linalg.norm(np.asarray(obs)[..., 8:10]))


def is_success(distance: float) -> bool:
    """The episode succeeds if the fingertip ends within SUCCESS_DISTANCE of the target."""
    return distance < SUCCESS_DISTANCE


def rollout(
    policy_fn: Policy,
    seed: int,
    *,
    env: gym.Env | None = None,
    action_noise: float = 0.0,
    noise_rng: np.random.Generator | None = None,
) -> Rollout:
    """Run one 50-step episode of `policy_fn` from the initial state that `seed` selects.

    `policy_fn` maps one observation [10] to an action [2]; actions are clipped to [-1, 1].
    With `action_noise` > 0, Gaussian noise of that standard deviation (from `noise_rng`) is
    added to the *executed* action only; the recorded action stays the policy's clean one,
    which is what a demonstration seeder wants (the learner sees how the expert recovers).
    Pass `env` to reuse one environment across episodes (it is reset with `seed`).
    """
    if action_noise > 0 and noise_rng is None:
        raise ValueError("rollout(action_noise > 0) needs noise_rng, a numpy Generator, so that "
                         "the noise is reproducible")
    own_env = env is None
    env = make_env() if env is None else env
    try:
        obs, _ = env.reset(seed=seed)
        observations = np.empty((EPISODE_STEPS, OBS_DIM), dtype=np.float32)
        actions = np.empty((EPISODE_STEPS, ACT_DIM), dtype=np.float32)
        for t in range(EPISODE_STEPS):
            action = checked_action(policy_fn(obs), t, seed)
            observations[t] = obs
            actions[t] = action
            executed = action
            if noise_rng is not None and action_noise > 0:
                noise = noise_rng.normal(0.0, action_noise, ACT_DIM)
                executed = np.clip(action + noise, -1.0, 1.0).astype(np.float32)
            obs, _, terminated, _, _ = env.step(executed)
            if terminated:  # Reacher never terminates early; guard against a changed env
                raise RuntimeError(f"{ENV_ID} terminated at step {t}; expected a fixed "
                                   f"{EPISODE_STEPS}-step episode")
        distance = final_distance(obs)
        return Rollout(observations, actions, distance, is_success(distance))
    finally:
        if own_env:
            env.close()


def checked_action(raw: object, step: int, seed: int) -> np.ndarray:
    """The policy's action as float32 [ACT_DIM] clipped to [-1, 1], or a ValueError. NaN cannot
    be clipped: MuJoCo would warn, reset the simulation and go on, so the episode would end at
    a distance no policy produced."""
    action = np.asarray(raw, dtype=np.float32)
    if action.size != ACT_DIM:
        raise ValueError(f"the policy returned an action of shape {action.shape} at step {step} "
                         f"of seed {seed}; a reach policy returns {ACT_DIM} values (joint torques)")
    action = action.reshape(ACT_DIM)
    if np.isnan(action).any():
        raise ValueError(f"the policy returned a NaN action {action.tolist()} at step "
                         f"{step} of seed {seed}")
    return np.clip(action, -1.0, 1.0)


def expert_policy(obs: np.ndarray) -> np.ndarray:
    """`expert_action` as a `Policy` (for `rollout`)."""
    return expert_action(obs)

