"""The reaching task: MJCF-derived kinematics, the scripted expert, success, rollouts."""

from __future__ import annotations

import numpy as np
import pytest

from arf_trainer.sim import reach

EVAL_SEEDS = range(100_000, 100_050)  # the reach_bc template's evaluation seeds


@pytest.fixture(scope="module")
def env():
    sim = reach.make_env()
    yield sim
    sim.close()


def test_link_lengths_come_from_the_mjcf() -> None:
    assert reach.link_lengths() == pytest.approx((0.1, 0.11))


def test_expert_reads_the_same_state_from_env_and_observation(env) -> None:
    obs, _ = env.reset(seed=3)
    for _ in range(5):
        obs, *_ = env.step(reach.expert_action(obs))
    from_obs, from_env = reach.expert_action(obs), reach.expert_action(env)
    assert from_obs.shape == (2,) and from_obs.dtype == np.float32
    np.testing.assert_allclose(from_obs, from_env, atol=1e-5)
    batch = reach.expert_action(np.stack([obs, obs]))
    assert batch.shape == (2, 2)
    np.testing.assert_allclose(batch[1], from_obs)
    assert np.all(np.abs(reach.expert_action(np.random.default_rng(0).normal(size=(64, 10))))
                  <= 1.0)


def test_expert_action_rejects_wrong_observation_size() -> None:
    with pytest.raises(ValueError, match="10 values"):
        reach.expert_action(np.zeros(11))


def test_expert_mostly_succeeds(env) -> None:
    results = [reach.rollout(reach.expert_policy, seed, env=env) for seed in EVAL_SEEDS]
    rate = np.mean([r.success for r in results])
    assert rate >= 0.85, f"expert success {rate:.2f} over {len(results)} episodes"
    assert np.mean([r.final_distance for r in results]) < 0.02


def test_zero_policy_mostly_fails(env) -> None:
    results = [reach.rollout(lambda obs: np.zeros(2), seed, env=env) for seed in EVAL_SEEDS]
    assert np.mean([r.success for r in results]) <= 0.1


def test_rollout_shapes_determinism_and_noise(env) -> None:
    first = reach.rollout(reach.expert_policy, 7, env=env)
    again = reach.rollout(reach.expert_policy, 7)  # a fresh env gives the same episode
    assert first.observations.shape == (reach.EPISODE_STEPS, 10)
    assert first.actions.shape == (reach.EPISODE_STEPS, 2)
    np.testing.assert_array_equal(first.observations, again.observations)
    assert first.final_distance == again.final_distance
    assert first.success == reach.is_success(first.final_distance)

    noisy = reach.rollout(reach.expert_policy, 7, env=env, action_noise=0.1,
                          noise_rng=np.random.default_rng(0))
    # Same start, different visited states; the recorded actions are the expert's clean ones.
    np.testing.assert_array_equal(noisy.observations[0], first.observations[0])
    assert not np.allclose(noisy.observations[-1], first.observations[-1])
    np.testing.assert_allclose(noisy.actions, reach.expert_action(noisy.observations), atol=1e-5)
    with pytest.raises(ValueError, match="noise_rng"):
        reach.rollout(reach.expert_policy, 7, env=env, action_noise=0.1)


def test_policy_actions_are_clipped(env) -> None:
    result = reach.rollout(lambda obs: np.array([5.0, -5.0]), 1, env=env)
    assert result.actions.max() == 1.0 and result.actions.min() == -1.0
