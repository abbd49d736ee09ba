"""Rendering: the task's observation layout against the real MuJoCo envs, the integrated x position, and frames
of the single and vector env (skipped, with the reason, where no OpenGL backend can render)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from dydiff_env import DydiffEnv, load_bundle, render
from dydiff_env.render import RenderError, check_render_mode, integrate_x, state_from_obs
from dydiff_env.tasks import TASKS

ENV_ID = "Dydiff-hopper-v0"
SIZE = dict(width=64, height=48)
FAST = dict(pool_size=8)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


def real_steps(env_id: str, steps: int, seed: int = 0):
    """Observations (T + 1, D), qpos and qvel (T + 1, .) of a uniform random episode of the real env."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    data = env.unwrapped.data
    rng = np.random.default_rng(seed)
    rows = [(obs, data.qpos.copy(), data.qvel.copy())]
    for _ in range(steps):
        obs, _, terminated, _, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        rows.append((obs, data.qpos.copy(), data.qvel.copy()))
        if terminated:
            break
    env.close()
    return tuple(np.asarray(column) for column in zip(*rows))


# ------------------------------------------------------------------------------------ state from observation


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_layout_and_timing_match_the_real_env(name):
    task = TASKS[name]
    env = gym.make(task.env_id)
    model = env.unwrapped.model
    assert env.unwrapped.dt == pytest.approx(task.dt)
    assert env.unwrapped.metadata["render_fps"] == task.render_fps
    env.close()
    obs, qpos, qvel = real_steps(task.env_id, 40)
    assert obs.shape[1] == task.obs_dim == model.nq - task.hidden_qpos + model.nv
    for o, q, v in zip(obs, qpos, qvel):
        rebuilt_q, rebuilt_v = state_from_obs(o, q[0], task, model.nq, model.nv)
        np.testing.assert_allclose(rebuilt_q, q, atol=1e-6)
        observed = np.abs(v) < 10  # Hopper and Walker2d observe velocities clipped to [-10, 10]
        np.testing.assert_allclose(rebuilt_v[observed], v[observed], atol=1e-6)
    with pytest.raises(ValueError, match=r"qpos\[1:\]"):
        state_from_obs(obs[0, :-1], 0.0, task, model.nq, model.nv)


def test_integrated_x_follows_the_real_x_position():
    task = TASKS["hopper"]
    obs, qpos, _ = real_steps(task.env_id, 200, seed=0)
    v = obs[:, task.x_velocity_index]
    x = np.zeros(len(obs))
    for t in range(1, len(obs)):
        x[t] = integrate_x(x[t - 1], v[t - 1], v[t], task.dt)
    travelled = qpos[:, 0] - qpos[0, 0]
    assert len(obs) > 20 and np.abs(travelled).max() > 0.02  # the hopper moves before it falls
    np.testing.assert_allclose(x, travelled, atol=2e-3)


def test_env_integrates_x_from_zero_at_each_episode_start(bundle):
    env = DydiffEnv(2, bundle=bundle, max_episode_steps=3, autoreset_mode="SAME_STEP", **FAST)
    obs, _ = env.reset(seed=0)
    xv, dt = env.task.x_velocity_index, env.task.dt
    np.testing.assert_array_equal(env._state.x_position, 0.0)
    expected = np.zeros(2)
    for _ in range(2):
        nxt, _, terminated, truncated, _ = env.step(np.zeros((2, 3), np.float32))
        expected = integrate_x(expected, obs[:, xv], nxt[:, xv], dt)
        expected[terminated | truncated] = 0.0  # autoreset in the same step: a new episode starts at x = 0
        obs = nxt
    np.testing.assert_allclose(env._state.x_position, expected, rtol=1e-6)
    env.step(np.zeros((2, 3), np.float32))  # the third step truncates every sub-env: new episodes
    np.testing.assert_array_equal(env._state.x_position, 0.0)
    env.reset_to(obs)
    np.testing.assert_array_equal(env._state.x_position, 0.0)


# ----------------------------------------------------------------------------------------------- render modes


def test_render_modes_are_checked_at_construction(bundle, monkeypatch):
    with pytest.raises(ValueError, match="render_mode must be one of"):
        DydiffEnv(1, bundle=bundle, render_mode="depth_array")
    monkeypatch.setattr(render, "has_display", lambda: False)
    with pytest.raises(ValueError, match="needs a display.*rgb_array"):
        gym.make(ENV_ID, bundle=bundle, render_mode="human")
    check_render_mode(None)


def test_render_without_a_mode_warns_and_returns_none(bundle):
    env = DydiffEnv(1, bundle=bundle)
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode='rgb_array'"):
        assert env.render() is None


@pytest.mark.parametrize("display", [True, False])
def test_metadata_lists_the_modes_this_machine_can_honour(bundle, monkeypatch, display):
    monkeypatch.setattr(render, "has_display", lambda: display)
    modes = ["human", "rgb_array"] if display else ["rgb_array"]
    env = gym.make(ENV_ID, bundle=bundle)
    assert env.metadata["render_modes"] == modes and env.metadata["render_fps"] == 125
    venv = DydiffEnv(2, bundle=bundle)
    assert venv.metadata["render_modes"] == modes and venv.metadata["render_fps"] == 125


# ----------------------------------------------------------------------------------------------------- frames


def test_single_env_frames_change_with_the_state(bundle, gl_renderer):
    env = gym.make(ENV_ID, bundle=bundle, render_mode="rgb_array", **SIZE, **FAST)
    assert env.render_mode == "rgb_array"
    env.reset(seed=0)
    first = env.render()
    assert first.shape == (48, 64, 3) and first.dtype == np.uint8 and first.std() > 0
    assert np.array_equal(env.render(), first)  # the same state, the same frame
    rng = np.random.default_rng(0)
    for _ in range(5):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 3).astype(np.float32))
        if terminated or truncated:
            break
    later = env.render()
    assert later.shape == first.shape and later.dtype == np.uint8
    changed = float(np.abs(later.astype(int) - first).mean())
    assert changed > 0, f"the frame did not change with the state (MUJOCO_GL={gl_renderer})"
    env.close()


def test_vector_env_renders_one_frame_per_sub_env(bundle, gl_renderer):
    env = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="vector_entry_point", bundle=bundle,
                       render_mode="rgb_array", **SIZE, **FAST)
    start = bundle.start_states["observations"][:3].astype(np.float64)
    start[1, 1] += 0.3  # sub-env 1 leans forward: its frame differs from sub-env 0's
    env.unwrapped.reset_to(start)
    frames = env.render()
    assert isinstance(frames, tuple) and len(frames) == 3
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[1])
    env.step(np.ones((3, 3), np.float32))
    assert not np.array_equal(env.render()[0], frames[0])
    env.close()


def test_state_renderer_draws_the_hidden_x_position(gl_renderer):
    """The camera follows the torso, so moving the root along x moves the floor under it."""
    renderer = render.StateRenderer(TASKS["hopper"], "rgb_array", **SIZE)
    obs = real_steps("Hopper-v5", 0)[0][0]
    here, further = renderer.draw(obs, 0.0), renderer.draw(obs, 0.37)
    assert not np.array_equal(here, further)
    renderer.close()


def test_a_failing_backend_names_the_fix(monkeypatch):
    renderer = render.StateRenderer(TASKS["hopper"], "rgb_array", **SIZE)
    env = renderer._real_env()
    monkeypatch.setattr(env, "render", lambda: (_ for _ in ()).throw(RuntimeError("no OpenGL context")))
    with pytest.raises(RenderError, match="no OpenGL context.*apt-get install"):
        renderer.draw(np.zeros(11))
    renderer.close()


def test_adapters_pass_the_frames_on(bundle, gl_renderer):
    from dydiff_env.adapters import make_sb3_vec_env, make_tianshou_vec_env

    sb3 = make_sb3_vec_env(2, bundle=bundle, render_mode="rgb_array", **SIZE, **FAST)
    sb3.reset()
    tiled = sb3.render()  # SB3 tiles the sub-envs' frames into one image
    assert sb3.render_mode == "rgb_array" and tiled.dtype == np.uint8 and tiled.size == 2 * 48 * 64 * 3
    tianshou = make_tianshou_vec_env(2, bundle=bundle, render_mode="rgb_array", **SIZE, **FAST)
    tianshou.reset()
    assert [f.shape for f in tianshou.render()] == [(48, 64, 3)] * 2


def test_human_mode_draws_sub_env_0_after_every_reset_and_step(bundle, monkeypatch):
    """Wiring only (no window is opened): the frames go to the renderer, render() returns None."""
    monkeypatch.setattr(render, "has_display", lambda: True)
    env = DydiffEnv(2, bundle=bundle, render_mode="human", **FAST)
    drawn = []
    monkeypatch.setattr(env._renderer, "draw", lambda obs, x: drawn.append((obs.copy(), x)))
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(np.zeros((2, 3), np.float32))
    assert env.render() is None and len(drawn) == 3
    np.testing.assert_allclose(drawn[1][0], obs[0], rtol=1e-6)
    assert drawn[1][1] == env._state.x_position[0]


def test_check_env_renders(bundle, gl_renderer):
    import warnings

    from gymnasium.utils.env_checker import check_env

    env = gym.make(ENV_ID, bundle=bundle, render_mode="rgb_array", **SIZE, **FAST)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*infinity.*")  # Hopper's observation space is unbounded
        check_env(env.unwrapped)
