"""Task facts: termination rules agree with the real Gymnasium v5 envs; task lookup; normalised scores."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from dydiff_env.tasks import TASKS, get_task, halfcheetah_terminated, hopper_terminated, walker2d_terminated


def random_rollouts(env_id: str, episodes: int, max_steps: int | None = None, seed: int = 0):
    """Next observations and `terminated` flags of every step of uniform-random episodes in the real env."""
    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    next_obs, terminated_flags = [], []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        for _ in range(max_steps or 10**9):
            obs, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
            next_obs.append(obs)
            terminated_flags.append(terminated)
            if terminated or truncated:
                break
    env.close()
    return np.asarray(next_obs), np.asarray(terminated_flags)


@pytest.mark.parametrize("env_id,rule,episodes", [("Hopper-v5", hopper_terminated, 30),
                                                  ("Walker2d-v5", walker2d_terminated, 20)])
def test_termination_rule_matches_real_env(env_id, rule, episodes):
    obs, terminated = random_rollouts(env_id, episodes)
    assert terminated.sum() == episodes  # a random policy falls in every episode: the falls are covered
    assert (~terminated).sum() > 5 * episodes
    pred = rule(obs)
    assert pred.dtype == np.bool_ and pred.shape == terminated.shape
    np.testing.assert_array_equal(pred, terminated)
    pred_t = rule(torch.as_tensor(obs, dtype=torch.float32))
    assert isinstance(pred_t, torch.Tensor) and pred_t.dtype == torch.bool
    np.testing.assert_array_equal(pred_t.numpy(), terminated)
    # a single observation (no batch dimension) works too
    assert bool(rule(obs[-1])) == bool(terminated[-1])
    # the registered task uses the same rule
    assert get_task(env_id).terminated is rule


def test_termination_rules_on_nonfinite_and_out_of_range_states():
    obs, _ = random_rollouts("Hopper-v5", 1, max_steps=5)
    healthy = obs[0].copy()
    assert not hopper_terminated(healthy)
    for i, value in [(0, np.nan), (3, np.inf), (5, -np.inf)]:
        bad = healthy.copy()
        bad[i] = value
        assert hopper_terminated(bad) and hopper_terminated(torch.as_tensor(bad))
    bad = healthy.copy()
    bad[2] = 150.0  # joint angle beyond the (-100, 100) state range (the reference's check never failed)
    assert hopper_terminated(bad)
    walker = np.zeros(17, np.float32)
    walker[0] = 1.2
    assert not walker2d_terminated(walker)
    walker[4] = np.nan
    assert walker2d_terminated(walker)


def test_halfcheetah_never_terminates_except_nan():
    obs, terminated = random_rollouts("HalfCheetah-v5", 1, max_steps=200)
    assert not terminated.any()
    assert not halfcheetah_terminated(obs).any()
    assert not halfcheetah_terminated(torch.as_tensor(obs)).any()
    extreme = obs[:3].copy()
    extreme[0] = 1e6  # far out of any healthy range: still no termination
    extreme[1, 4] = np.nan
    np.testing.assert_array_equal(halfcheetah_terminated(extreme), [False, True, False])
    np.testing.assert_array_equal(halfcheetah_terminated(torch.as_tensor(extreme)).numpy(), [False, True, False])


@pytest.mark.parametrize("key,name", [
    ("hopper", "hopper"), ("Hopper-v5", "hopper"), ("HOPPER-V5", "hopper"), ("mujoco/hopper/medium-v0", "hopper"),
    ("dydiff/hopper/medium-replay-v0", "hopper"), ("hopper-medium", "hopper"), ("test/hopper/random-v0", "hopper"),
    ("walker2d", "walker2d"), ("Walker2d-v5", "walker2d"), ("mujoco/walker2d/expert-v0", "walker2d"),
    ("halfcheetah", "halfcheetah"), ("HalfCheetah-v5", "halfcheetah"), ("mujoco/halfcheetah/simple-v0", "halfcheetah"),
])
def test_get_task_lookups(key, name):
    task = get_task(key)
    assert task is TASKS[name]


def test_task_facts_match_real_envs():
    for task in TASKS.values():
        env = gym.make(task.env_id)
        assert env.observation_space.shape == (task.obs_dim,)
        assert env.action_space.shape == (task.act_dim,)
        assert env.spec.max_episode_steps == task.max_episode_steps
        env.close()


@pytest.mark.parametrize("key", ["ant", "Ant-v5", "mujoco/ant/medium-v0", "", "pen-human"])
def test_get_task_unknown(key):
    with pytest.raises(ValueError, match="unknown task") as info:
        get_task(key)
    assert "hopper" in str(info.value)  # lists the known tasks


def test_normalized_score():
    hopper = get_task("hopper")
    assert hopper.normalized_score(-20.272305) == pytest.approx(0.0, abs=1e-9)
    assert hopper.normalized_score(3234.3) == pytest.approx(100.0)
    mid = (-20.272305 + 3234.3) / 2
    np.testing.assert_allclose(hopper.normalized_score([-20.272305, mid, 3234.3]), [0.0, 50.0, 100.0], atol=1e-9)
    for task in TASKS.values():
        assert task.normalized_score(task.ref_min_score) == pytest.approx(0.0, abs=1e-9)
        assert task.normalized_score(task.ref_max_score) == pytest.approx(100.0)


def test_each_level_has_one_dataset_id_per_task():
    from dydiff_env.tasks import COLLECT_PRESETS, LEVELS, preset_for_dataset

    assert get_task("hopper").dataset_id() == "dydiff/hopper/medium-v1"  # the shipped hopper bundle's dataset
    assert get_task("walker2d").dataset_id("expert") == "dydiff/walker2d/expert-v0"
    with pytest.raises(ValueError, match="known levels"):
        get_task("hopper").dataset_id("grandmaster")
    ids = [preset.dataset_id for preset in COLLECT_PRESETS.values()]
    assert len(ids) == len(set(ids)) == len(TASKS) * len(LEVELS)
    assert preset_for_dataset("someone/else-v0") is None


def test_examples_take_a_task_or_a_dataset_of_it():
    import argparse

    from agents.recipes import default_run_dir, task_and_dataset

    def flags(task=None, dataset=None):
        return argparse.Namespace(task=task, dataset=dataset)

    assert task_and_dataset(flags()) == ("hopper", "dydiff/hopper/medium-v1")
    assert task_and_dataset(flags(task="walker2d")) == ("walker2d", "dydiff/walker2d/medium-v0")
    assert task_and_dataset(flags(dataset="dydiff/halfcheetah/expert-v0")) == ("halfcheetah", "dydiff/halfcheetah/expert-v0")
    assert task_and_dataset(flags(task="hopper", dataset="mine/custom-v0")) == ("hopper", "mine/custom-v0")
    with pytest.raises(SystemExit, match="pass one of them"):
        task_and_dataset(flags(task="hopper", dataset="dydiff/walker2d/medium-v0"))
    # hopper keeps the documented directories; another task's runs never overwrite them
    assert default_run_dir("train_td3bc", 0, task="hopper") == default_run_dir("train_td3bc", 0)
    assert default_run_dir("train_td3bc", 1, True, task="walker2d").endswith("train_td3bc-walker2d-seed1-nodydiff")
