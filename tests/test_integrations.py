"""Stable-Baselines3 and Tianshou on DydiffEnv: the adapters' contracts and tiny runs of both examples.

Tianshou JIT-compiles a few numba functions the first time its buffers and policies are built (tens of
seconds on a small shared CPU). The `tianshou` fixture imports it with numba's JIT off when nothing has
imported it yet: the same functions then run as plain Python, which is fast on test-sized buffers.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dydiff_env import DydiffEnv
from dydiff_env.adapters import SB3VecEnv, TianshouVectorEnv, make_sb3_vec_env, make_tianshou_vec_env

from conftest import TINY_DATASET_ID

ROOT = Path(__file__).resolve().parents[1]
OBS_DIM, ACT_DIM = 11, 3


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tianshou():
    """tianshou, imported without numba's JIT if this is its first import (module docstring)."""
    if "tianshou" not in sys.modules:
        import numba

        previous = numba.config.DISABLE_JIT
        numba.config.DISABLE_JIT = True
        try:
            import tianshou.algorithm  # noqa: F401  (decorates its numba functions now)
            import tianshou.data  # noqa: F401
        finally:
            numba.config.DISABLE_JIT = previous
    import tianshou

    return tianshou


def random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32)


# ------------------------------------------------------------------------------------------ Stable-Baselines3


@pytest.fixture
def sb3_env(tiny_bundle):
    env = make_sb3_vec_env(3, bundle=tiny_bundle, max_episode_steps=4)
    yield env
    env.close()


def test_sb3_reset_and_step_follow_the_vecenv_api(sb3_env):
    from stable_baselines3.common.vec_env import VecCheckNan, VecEnv

    assert isinstance(sb3_env, VecEnv) and sb3_env.num_envs == 3
    assert sb3_env.observation_space.shape == (OBS_DIM,) and sb3_env.action_space.shape == (ACT_DIM,)
    env = VecCheckNan(sb3_env, raise_exception=True)  # SB3's own check: no NaN/inf in or out
    env.seed(0)
    obs = env.reset()
    assert obs.shape == (3, OBS_DIM) and obs.dtype == sb3_env.observation_space.dtype
    assert all(sb3_env.observation_space.contains(o) for o in obs)
    assert len(sb3_env.reset_infos) == 3  # no handle: no plans, so no plan_return
    rng = np.random.default_rng(0)
    seen_done = np.zeros(3, dtype=bool)
    for _ in range(4):  # max_episode_steps=4: every sub-env finishes within 4 steps
        env.step_async(random_actions(rng, 3))
        obs, rewards, dones, infos = env.step_wait()
        assert obs.shape == (3, OBS_DIM) and rewards.shape == (3,) and rewards.dtype == np.float32
        assert dones.shape == (3,) and dones.dtype == bool
        assert isinstance(infos, list) and len(infos) == 3
        for i, info in enumerate(infos):
            assert isinstance(info["TimeLimit.truncated"], bool) and info["mode"] == "model"
            assert ("terminal_observation" in info) == dones[i]
            if dones[i]:
                assert info["terminal_observation"].shape == (OBS_DIM,)
                assert not np.array_equal(info["terminal_observation"], obs[i])  # obs[i] starts the next episode
        seen_done |= dones
    assert seen_done.all()


def test_sb3_time_limit_truncation_is_flagged(tiny_bundle):
    env = make_sb3_vec_env(6, bundle=tiny_bundle, max_episode_steps=1)
    env.seed(1)
    env.reset()
    _, _, dones, infos = env.step(random_actions(np.random.default_rng(1), 6))
    assert dones.all()  # every episode ends: by a fall (terminated) or by the time limit (truncated only)
    for info in infos:
        fell = bool(env.venv.task.terminated(info["terminal_observation"][None])[0])
        assert info["TimeLimit.truncated"] is (not fell)
    env.close()


def test_sb3_seeding_is_reproducible(tiny_bundle):
    first = [make_sb3_vec_env(2, bundle=tiny_bundle) for _ in range(2)]
    for env in first:
        env.seed(7)
    a, b = (env.reset() for env in first)
    np.testing.assert_array_equal(a, b)


def test_sb3_attributes_and_methods_act_on_the_shared_env(sb3_env):
    assert sb3_env.get_attr("horizon") == [sb3_env.venv.horizon] * 3
    assert sb3_env.get_attr("horizon", indices=[1]) == [sb3_env.venv.horizon]
    assert sb3_env.env_is_wrapped(object) == [False] * 3
    marker = lambda obs: np.zeros((len(obs), ACT_DIM), dtype=np.float32)  # noqa: E731
    sb3_env.env_method("set_policy", marker)
    assert sb3_env.venv._policy_source is marker
    sb3_env.set_attr("refresh_every", 5)
    assert sb3_env.venv.refresh_every == 5
    with pytest.raises(ValueError, match="indices=None"):
        sb3_env.set_attr("refresh_every", 6, indices=[0])
    with pytest.raises(ValueError, match="indices=None"):
        sb3_env.env_method("set_policy", None, indices=[2])


def test_sb3_adapter_rejects_other_modes_with_the_fix(tiny_bundle):
    with pytest.raises(ValueError, match="SAME_STEP.*make_sb3_vec_env"):
        SB3VecEnv(DydiffEnv(1, bundle=tiny_bundle))  # NEXT_STEP by default
    with pytest.raises(TypeError, match="make_sb3_vec_env"):
        SB3VecEnv(object())
    # the documented names of the modes are accepted
    assert DydiffEnv(1, bundle=tiny_bundle, autoreset_mode="SAME_STEP").autoreset_mode.name == "SAME_STEP"


def test_prefill_replay_buffer_stores_every_row_like_add(tiny_dataset):
    from gymnasium.spaces import Box
    from stable_baselines3.common.buffers import ReplayBuffer

    example = load_example("sb3_sac")
    obs_space = Box(-np.inf, np.inf, (OBS_DIM,), np.float64)
    buffer = ReplayBuffer(len(tiny_dataset) + 30, obs_space, Box(-1, 1, (ACT_DIM,), np.float32), n_envs=3)
    rows = example.prefill_replay_buffer(buffer, tiny_dataset)
    assert rows == len(tiny_dataset) // 3 and buffer.pos == rows and buffer.size() == rows
    k = 5  # row 5, env 2 is dataset transition 17
    np.testing.assert_allclose(buffer.observations[k, 2], tiny_dataset.observations[3 * k + 2])
    np.testing.assert_allclose(buffer.next_observations[k, 2], tiny_dataset.next_observations[3 * k + 2])
    np.testing.assert_allclose(buffer.actions[k, 2], tiny_dataset.actions[3 * k + 2])
    np.testing.assert_allclose(buffer.rewards[:rows].reshape(-1), tiny_dataset.rewards[: 3 * rows])
    np.testing.assert_array_equal(buffer.dones[:rows].reshape(-1), tiny_dataset.dones[: 3 * rows])
    np.testing.assert_array_equal(buffer.timeouts[:rows].reshape(-1),
                                  (tiny_dataset.truncations & ~tiny_dataset.terminations)[: 3 * rows])


def test_sb3_example_runs(tiny_dataset, tiny_bundle, tmp_path):
    example = load_example("sb3_sac")
    summary = example.main(["--steps", "48", "--num-envs", "2", "--bundle", str(tiny_bundle), "--dataset",
                            TINY_DATASET_ID, "--eval-episodes", "1", "--eval-max-steps", "10", "--out",
                            str(tmp_path), "--batch-size", "32", "--pool-size", "4"])
    assert math.isfinite(summary["score"]) and summary["score_label"] == "D4RL-normalised score on Hopper-v5"
    assert summary["algorithm"] == "SB3 SAC" and summary["dataset_rows"] == 2 * (len(tiny_dataset) // 2)
    # SAC explores: every transition comes from the single-step model, no diffusion run
    assert summary["env_stats"]["rollout_calls"] == 0 and summary["env_stats"]["model_steps"] == 48
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "actor.safetensors").is_file()
    td3 = example.main(["--algo", "td3", "--action-noise", "0", "--steps", "48", "--num-envs", "2", "--bundle",
                        str(tiny_bundle), "--dataset", TINY_DATASET_ID, "--eval-episodes", "1", "--eval-max-steps",
                        "10", "--out", str(tmp_path / "td3"), "--handle-every", "16", "--batch-size", "32",
                        "--pool-size", "4", "--sampler-steps", "2", "--learning-starts", "0"])
    assert td3["policy_refreshes"] >= 2 and td3["env_stats"]["plan_steps"] > 0  # deterministic: served plans


# --------------------------------------------------------------------------------------------------- Tianshou


@pytest.fixture
def ts_env(tiny_bundle):
    env = make_tianshou_vec_env(3, bundle=tiny_bundle, max_episode_steps=5)
    yield env
    env.close()


def test_tianshou_reset_and_step_on_subsets(ts_env):
    assert len(ts_env) == ts_env.env_num == 3 and ts_env.is_async is False
    assert ts_env.action_space[0].shape == (ACT_DIM,) and ts_env.single_observation_space.shape == (OBS_DIM,)
    ts_env.seed(0)
    obs, reset_infos = ts_env.reset()
    assert obs.shape == (3, OBS_DIM) and reset_infos.dtype == object
    assert [i["env_id"] for i in reset_infos] == [0, 1, 2]
    obs, rew, term, trunc, infos = ts_env.step(random_actions(np.random.default_rng(1), 2), id=[0, 2])
    assert obs.shape == (2, OBS_DIM) and rew.shape == term.shape == trunc.shape == (2,)
    assert [i["env_id"] for i in infos] == [0, 2]
    assert set(infos[0]) == set(reset_infos[0])  # one schema for Tianshou's Batch
    with pytest.raises(RuntimeError, match=r"reset\(env_id=\[1\]\)"):
        ts_env.step(random_actions(np.random.default_rng(2), 1), id=[1])  # it moved in the background
    obs, infos = ts_env.reset(env_id=[1])
    assert obs.shape == (1, OBS_DIM) and infos[0]["env_id"] == 1
    ts_env.step(random_actions(np.random.default_rng(3), 1), id=1)


def test_tianshou_finished_envs_must_be_reset(ts_env):
    ts_env.reset()
    rng = np.random.default_rng(0)
    for _ in range(5):  # max_episode_steps=5
        *_, term, trunc, _ = ts_env.step(random_actions(rng, 3))
        done = term | trunc
        if done.any():
            break
    finished = np.flatnonzero(done).tolist()
    with pytest.raises(RuntimeError, match="finished"):
        ts_env.step(random_actions(rng, 3))
    ts_env.reset(env_id=finished)
    ts_env.step(random_actions(rng, 3))


def test_tianshou_adapter_rejects_other_modes(tiny_bundle):
    with pytest.raises(ValueError, match="DISABLED.*make_tianshou_vec_env"):
        TianshouVectorEnv(DydiffEnv(1, bundle=tiny_bundle, autoreset_mode="SAME_STEP"))


def test_tianshou_collector_fills_a_buffer_on_plan(tianshou, tiny_dataset, tiny_bundle):
    from tianshou.data import Collector, VectorReplayBuffer

    example = load_example("tianshou_td3bc")
    env = make_tianshou_vec_env(3, bundle=tiny_bundle, max_episode_steps=6, start_states="any", plans="always")
    algorithm = example.build_algorithm(tiny_dataset, env.single_action_space,
                                        SimpleNamespace(alpha=2.5, device="cpu"))
    env.set_policy(algorithm)  # plans made with the actor the collector acts with
    buffer = VectorReplayBuffer(120, 3)
    collector = Collector(algorithm, env, buffer)
    stats = collector.collect(n_step=30, reset_before_collect=True)
    assert stats.n_collected_steps == 30 and stats.n_collected_episodes >= 3 and len(buffer) == 30
    batch, _ = buffer.sample(0)
    assert batch.obs.shape == (30, OBS_DIM) and np.isfinite(batch.rew).all()
    # the env served its plans exactly: the collector's actions were the plans' actions
    assert (batch.info["mode"] == "plan").all() and env.venv.stats["model_steps"] == 0
    # n_episode collection steps subsets of the envs (surplus envs drop out): the background path
    stats = collector.collect(n_episode=4, reset_before_collect=True)
    assert stats.n_collected_episodes == 4
    env.close()


def test_tianshou_example_runs(tianshou, tiny_dataset, tiny_bundle, tmp_path):
    example = load_example("tianshou_td3bc")
    summary = example.main(["--steps", "40", "--num-envs", "2", "--bundle", str(tiny_bundle), "--dataset",
                            TINY_DATASET_ID, "--eval-episodes", "1", "--eval-max-steps", "10", "--out",
                            str(tmp_path), "--collect-every", "20", "--collect-steps", "16", "--batch-size", "32",
                            "--pool-size", "4"])
    assert math.isfinite(summary["score"]) and summary["score_label"] == "D4RL-normalised score on Hopper-v5"
    assert len(summary["collections"]) == 2 and summary["model_rows"] == 32
    assert math.isfinite(summary["critic1_loss"])
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "td3bc.safetensors").is_file()
    assert all(c["model_steps"] == 0 for c in summary["collections"]), "acting as the handle: served plans"
    noisy = example.main(["--steps", "40", "--num-envs", "2", "--bundle", str(tiny_bundle), "--dataset",
                          TINY_DATASET_ID, "--eval-episodes", "1", "--eval-max-steps", "10", "--out",
                          str(tmp_path / "noisy"), "--collect-every", "20", "--collect-steps", "16", "--batch-size",
                          "32", "--exploration-noise", "0.1"])
    assert all(c["plan_steps"] == 0 and c["model_steps"] > 0 for c in noisy["collections"]), "exploring: the model"


def test_tianshou_real_only_run_has_its_own_default_directory(tianshou, tiny_dataset, tmp_path, monkeypatch):
    # the DyDiff run and the --real-fraction 1 baseline are run side by side; neither may overwrite the other
    monkeypatch.chdir(tmp_path)
    example = load_example("tianshou_td3bc")
    example.main(["--steps", "20", "--real-fraction", "1", "--dataset", TINY_DATASET_ID, "--eval-episodes", "1",
                  "--eval-max-steps", "10", "--batch-size", "32"])
    assert (tmp_path / "runs" / "tianshou_td3bc-seed0-nodydiff" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "tianshou_td3bc-seed0").exists()
