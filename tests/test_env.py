"""DydiffEnv / Dydiff-hopper-v0: Gymnasium contracts (single and vector), autoreset modes, truncation, seeding,
bit-exact plan serving, Markov model steps off plan, batched continuations, auto mode, atomic steps, input
validation, policy handles, bundle errors and the no-NaN guarantee. All on the session's `tiny_bundle`, with
small plan pools (pool_size=8)."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.utils.seeding import np_random
from gymnasium.vector import AutoresetMode

import dydiff_env
from dydiff_env import BundleError, DydiffEnv, EnvConfig, FilterConfig, PolicyError, as_policy, dydiff_rollout, load_bundle
from dydiff_env.rollout import filter_trajectories
from dydiff_env.env import INFO_KEYS

ENV_ID = "Dydiff-hopper-v0"
FAST = dict(pool_size=8)  # small pools: a pool generation makes ceil(8 / 0.6) = 14 DyDiff trajectories
PLANS = dict(FAST, plans="always")  # every episode starts from a pool plan (the BC policy's without a handle)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """A loaded bundle shared by the envs of this module (read-only; tests that patch models load their own)."""
    return load_bundle(tiny_bundle)


def make_vec(bundle, num_envs=4, **kwargs):
    return gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", bundle=bundle,
                        **{**FAST, **kwargs})


def fixed_policy(seed: int = 0) -> torch.nn.Module:
    """A deterministic torch policy: a fixed random Linear layer followed by tanh."""
    net = torch.nn.Sequential(torch.nn.Linear(11, 3), torch.nn.Tanh()).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net


def act_with(policy: torch.nn.Module, obs: np.ndarray) -> np.ndarray:
    """What an agent does: call the policy on the (float64) observation batch it was given."""
    with torch.no_grad():
        return policy(torch.as_tensor(obs, dtype=torch.float32)).numpy()


def start_rows(bundle) -> np.ndarray:
    return bundle.start_states["observations"]


def is_start_state(bundle, obs: np.ndarray) -> bool:
    return bool((start_rows(bundle) == obs.astype(np.float32)).all(1).any())


# ------------------------------------------------------------------------------------------------- contracts


def test_check_env(tiny_bundle):
    env = gym.make(ENV_ID, bundle=tiny_bundle, **FAST)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*infinity.*")  # Hopper's observation space is unbounded
        check_env(env.unwrapped, skip_render_check=True)


def test_make_with_module_prefix(tiny_bundle):
    env = gym.make("dydiff_env:Dydiff-hopper-v0", bundle=tiny_bundle, **FAST)
    assert env.spec.max_episode_steps == 1000  # a TimeLimit like the real Hopper-v5
    obs, info = env.reset(seed=0)
    assert obs.shape == (11,) and "plan_return" not in info  # no handle: auto mode serves no plans
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
    assert set(INFO_KEYS) - {"plan_return"} <= set(info) and info["mode"] == "model"
    env.close()


def test_spaces_match_real_hopper(bundle):
    real = gym.make("Hopper-v5")
    single = gym.make(ENV_ID, bundle=bundle, **FAST)
    venv = make_vec(bundle, num_envs=4)
    for obs_space, act_space in [(single.observation_space, single.action_space),
                                 (venv.single_observation_space, venv.single_action_space)]:
        assert obs_space == real.observation_space
        assert act_space == real.action_space
        assert obs_space.dtype == np.float64 and obs_space.shape == (11,)
        assert act_space.dtype == np.float32 and act_space.shape == (3,)
        assert (act_space.low == -1).all() and (act_space.high == 1).all()
    assert venv.observation_space.shape == (4, 11) and venv.action_space.shape == (4, 3)
    real.close()


def test_vector_contract(bundle):
    env = make_vec(bundle, num_envs=4)
    assert isinstance(env, DydiffEnv) and env.num_envs == 4
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, info = env.reset(seed=0)
    assert obs.shape == (4, 11) and obs.dtype == np.float64 and obs in env.observation_space
    for _ in range(3):
        obs, rewards, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs.shape == (4, 11) and obs.dtype == np.float64 and np.isfinite(obs).all()
        assert rewards.shape == (4,) and rewards.dtype == np.float64
        assert terminated.shape == (4,) and terminated.dtype == np.bool_
        assert truncated.shape == (4,) and truncated.dtype == np.bool_
        assert set(INFO_KEYS) <= set(info)
        for key, value in info.items():
            if key.startswith("_"):
                continue
            assert isinstance(value, np.ndarray) and value.shape[0] == 4, key
            mask = info[f"_{key}"]
            assert mask.dtype == np.bool_ and mask.shape == (4,), key
    env.close()


# ------------------------------------------------------------------------------------------------ autoreset


def test_autoreset_next_step(bundle):
    # max_episode_steps=1: every step ends every episode, so the following step is the reset step
    env, twin = (make_vec(bundle, 3, max_episode_steps=1, plans="always") for _ in range(2))
    env.reset(seed=1)
    twin.reset(seed=1)
    a = np.zeros((3, 3), np.float32)
    _, _, terminated, truncated, _ = env.step(a)
    twin.step(a)
    assert (terminated | truncated).all()
    obs, rewards, terminated, truncated, info = env.step(np.full((3, 3), 0.5, np.float32))
    twin_obs, twin_rewards, *_ = twin.step(np.full((3, 3), -0.9, np.float32))
    assert all(is_start_state(bundle, o) for o in obs), "the reset step returns a fresh plan's s_0"
    assert np.array_equal(obs, twin_obs) and np.array_equal(rewards, twin_rewards), "the action is ignored"
    assert (rewards == 0).all() and not terminated.any() and not truncated.any()
    for key in INFO_KEYS:
        if key != "plan_return":
            assert not info[f"_{key}"].any(), key
    # like a reset's info, the reset step reports the new plans' predicted returns
    assert info["_plan_return"].all()
    assert np.array_equal(info["plan_return"], env._state.plan.returns.numpy().astype(np.float64))
    # and the episode after it runs normally
    obs, rewards, terminated, truncated, info = env.step(a)
    assert info["_mode"].all() and (terminated | truncated).all()


def test_autoreset_same_step(bundle):
    same = make_vec(bundle, 3, max_episode_steps=1, autoreset_mode=AutoresetMode.SAME_STEP, plans="always")
    nxt = make_vec(bundle, 3, max_episode_steps=1, plans="always")  # NEXT_STEP twin with the same seed and plans
    assert same.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    same.reset(seed=2)
    nxt.reset(seed=2)
    a = np.full((3, 3), 0.1, np.float32)
    obs, rewards, terminated, truncated, info = same.step(a)
    final_obs, nxt_rewards, nxt_term, nxt_trunc, _ = nxt.step(a)
    done = terminated | truncated
    assert done.all()
    assert np.array_equal(rewards, nxt_rewards) and np.array_equal(terminated, nxt_term)
    assert np.array_equal(info["_final_obs"], done) and np.array_equal(info["_final_info"], done)
    for i in range(3):
        assert np.array_equal(info["final_obs"][i], final_obs[i]), "final_obs holds the terminal observation"
    assert "mode" in info["final_info"] and info["final_info"]["_mode"].all()
    # the step's own info moved to final_info; the main info holds the reset's (the new plans' returns)
    assert not info["_mode"].any() and info["_plan_return"].all()
    # the returned observations are already the next episodes' starts: what NEXT_STEP returns one step later
    reset_obs, *_ = nxt.step(a)
    assert np.array_equal(obs, reset_obs)
    assert all(is_start_state(bundle, o) for o in obs)


def test_autoreset_disabled_and_reset_mask(bundle):
    env = make_vec(bundle, 4, max_episode_steps=1, autoreset_mode="Disabled", plans="always")
    with pytest.raises(ValueError, match="first reset"):
        env.reset(seed=0, options={"reset_mask": np.array([True, False, True, False])})
    obs0, _ = env.reset(seed=0)
    mask = np.array([True, False, True, False])
    obs1, info = env.reset(options={"reset_mask": mask})
    assert np.array_equal(obs1[~mask], obs0[~mask]), "unmasked sub-envs keep their observation"
    assert not np.array_equal(obs1[mask], obs0[mask])
    assert np.array_equal(info["_plan_return"], mask)
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(options={"reset_mask": np.array([1, 0, 1, 0])})
    _, _, terminated, truncated, _ = env.step(np.zeros((4, 3)))
    assert (terminated | truncated).all()
    with pytest.raises(RuntimeError, match="reset_mask"):
        env.step(np.zeros((4, 3)))
    env.reset(options={"reset_mask": np.array([True, True, False, False])})
    with pytest.raises(RuntimeError, match=r"\[2, 3\]"):
        env.step(np.zeros((4, 3)))
    env.reset(options={"reset_mask": np.array([False, False, True, True])})
    obs, *_ = env.step(np.zeros((4, 3)))
    assert np.isfinite(obs).all()


def test_autoreset_mode_by_enum_name(bundle):
    env = DydiffEnv(2, bundle=bundle, autoreset_mode="SAME_STEP", **FAST)
    assert env.autoreset_mode == AutoresetMode.SAME_STEP


# ------------------------------------------------------------------------------------------ truncation, seeds


def test_vector_truncation_at_max_episode_steps(bundle):
    env = make_vec(bundle, 4, max_episode_steps=5)
    assert env.max_episode_steps == 5
    env.reset(seed=0)
    elapsed = np.zeros(4, int)
    needs_reset = np.zeros(4, bool)
    seen_truncation = False
    for _ in range(8):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        elapsed = np.where(needs_reset, 0, elapsed + 1)
        # nothing else truncates here: the tiny models stay finite
        assert np.array_equal(truncated, elapsed == 5), (elapsed, truncated)
        seen_truncation |= truncated.any()
        needs_reset = terminated | truncated
    assert seen_truncation


def test_single_env_time_limit(bundle):
    env = gym.make(ENV_ID, bundle=bundle, max_episode_steps=3, **FAST)
    assert env.spec.max_episode_steps == 3
    for seed in range(10):
        env.reset(seed=seed)
        for t in range(1, 4):
            _, _, terminated, truncated, _ = env.step(np.zeros(3, np.float32))
            if terminated:
                break
            assert truncated == (t == 3)
        else:
            return
    pytest.fail("every episode terminated within 3 steps")


@pytest.mark.parametrize("plans", ["auto", "always"])
def test_seeding(bundle, plans):
    a, b, c = (make_vec(bundle, plans=plans) for _ in range(3))
    obs_a, _ = a.reset(seed=3)
    obs_b, _ = b.reset(seed=3)
    obs_c, _ = c.reset(seed=4)
    assert np.array_equal(obs_a, obs_b) and not np.array_equal(obs_a, obs_c)
    rng = np.random.default_rng(0)
    for _ in range(4):
        actions = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
        step_a, step_b, step_c = a.step(actions), b.step(actions), c.step(actions)
        for x, y in zip(step_a[:4], step_b[:4]):
            assert np.array_equal(x, y)
        assert not np.array_equal(step_a[0], step_c[0])
    # re-seeding reproduces the first episode
    again, _ = a.reset(seed=3)
    assert np.array_equal(again, obs_a)


# -------------------------------------------------------------------------------------------------- exactness


def replay_pool(env: DydiffEnv, seed: int, policy):
    """The pool the env generates at `reset(seed=seed)`, recomputed outside the env with `dydiff_rollout`.

    This mirrors the env's use of randomness (the seed makes a numpy Generator; its first draw seeds the torch
    generator, the next picks the start states, the last shuffles the kept plans). It has to reproduce the
    very same batch, because float32 model outputs are bit-identical only for the same batch composition; with
    that, equality checks the whole chain: the env's plans ARE DyDiff rollouts of the policy, filtered, and
    stepping serves them unchanged."""
    rng, _ = np_random(seed)
    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    cfg = env.config
    count = math.ceil(env.pool_size / cfg.filter.keep_fraction)
    starts = env.bundle.sample_start_obs(count, rng)
    result = dydiff_rollout(env.bundle, starts, as_policy(policy), horizon=env.horizon,
                            num_iterations=cfg.num_iterations, sampler=env.sampler, filter=FilterConfig("none"),
                            generator=generator, dynamics_mode=cfg.rollout_dynamics, precision=cfg.precision)
    kept = torch.nonzero(filter_trajectories(result.returns, cfg.filter, generator)).flatten().numpy()
    rng.shuffle(kept)
    return result.select(torch.as_tensor(kept))


def test_on_plan_steps_are_the_rollout_bit_for_bit(bundle):
    policy = fixed_policy()
    env = make_vec(bundle, 4, plans="always")
    env.set_policy(policy)
    obs, _ = env.reset(seed=5)
    plans = replay_pool(env, 5, policy)
    plan_len = plans.valid.sum(1).numpy()
    assert np.array_equal(obs, plans.obs[:4, 0].double().numpy())
    # the agent acts with the same policy on the float64 observations it sees; its actions match the plan's
    # to float32 rounding (different batch), within the env's action_tolerance, so the env stays on plan
    active = np.ones(4, bool)
    steps = 0
    for t in range(env.horizon):
        active &= t < plan_len[:4]
        if not active.any():
            break
        obs, rewards, terminated, truncated, info = env.step(act_with(policy, obs))
        ids = np.flatnonzero(active)
        assert (info["mode"][ids] == "plan").all()
        assert np.array_equal(obs[ids], plans.next_obs[ids, t].double().numpy())
        assert np.array_equal(rewards[ids], plans.rewards[ids, t].double().numpy())
        assert np.array_equal(terminated[ids], plans.terminated[ids, t].numpy())
        steps += len(ids)
        active &= ~(terminated | truncated)
    assert steps >= 4
    assert env.stats["model_steps"] == 0


def test_model_steps_are_markov(bundle):
    """Off plan, the next state depends on (state, action) only: two sub-envs at one start state on different
    plans, given the same action, land on the same state, the elites' mean prediction."""
    # the paper's average: the tiny diffusion model is far off, so the default gate would keep the
    # single-step states, and two plans would differ only where their elite draws do
    env = DydiffEnv(2, bundle=bundle, policy=fixed_policy(), model_dynamics="mean", refine={"blend": "average"},
                    **PLANS)
    s0 = start_rows(bundle)[3]
    obs, _ = env.reset_to(np.stack([s0, s0]), seed=0)
    plans = env._state.plan
    assert not torch.equal(plans.obs[0, 1], plans.obs[1, 1]), "two samples of the sampler: two different plans"
    x = torch.as_tensor(obs, dtype=torch.float32)
    for action in (np.full(3, 0.7), np.array([-0.5, 0.2, 0.9])):
        a = np.stack([action, action]).astype(np.float32)
        obs, rewards, terminated, truncated, info = env.step(a)
        assert (info["mode"] == "model").all()
        expected, disagreement = bundle.dynamics.predict(x, torch.as_tensor(a), mode="mean")
        assert np.array_equal(obs[0], obs[1]) and np.array_equal(rewards[0], rewards[1])
        np.testing.assert_array_equal(obs, expected.double().numpy())
        np.testing.assert_allclose(rewards, bundle.reward(x, torch.as_tensor(a)).double().numpy(), rtol=1e-6)
        np.testing.assert_allclose(info["disagreement"], disagreement.double().numpy(), rtol=1e-6)
        if (terminated | truncated).any():
            break
        x = torch.as_tensor(obs, dtype=torch.float32)
    # the plan-free env gives the same transitions: where a sub-env was on plan before does not matter
    planless = DydiffEnv(1, bundle=bundle, model_dynamics="mean", plans="never")
    obs, _ = planless.reset_to(s0[None])
    obs, *_ = planless.step(np.full((1, 3), 0.7, np.float32))
    np.testing.assert_array_equal(obs[0], bundle.dynamics.predict(torch.as_tensor(s0[None]),
                                                                  torch.full((1, 3), 0.7), mode="mean")[0][0].double().numpy())


def test_uncertainty_penalty_and_truncation(bundle):
    plain, penalised = (DydiffEnv(3, bundle=bundle, model_dynamics="mean", uncertainty_penalty=lam, **FAST)
                        for lam in (0.0, 2.0))
    plain.reset(seed=0)
    penalised.reset(seed=0)
    a = np.full((3, 3), 0.3, np.float32)
    _, r0, *_ = plain.step(a)
    _, r1, *_, info = penalised.step(a)
    np.testing.assert_allclose(r0 - r1, 2.0 * info["disagreement"], rtol=1e-5, atol=1e-6)
    strict = DydiffEnv(3, bundle=bundle, max_disagreement=1e-9, **FAST)
    strict.reset(seed=0)
    _, _, terminated, truncated, _ = strict.step(a)
    assert (truncated | terminated).all() and strict.stats["uncertain"] == int((~terminated).sum())


def count_rollout_calls(monkeypatch) -> list[int]:
    """Record the batch size of every DyDiff rollout the env makes."""
    import dydiff_env.env as env_module

    calls: list[int] = []
    real = env_module.dydiff_rollout

    def recording(bundle, start_obs, *args, **kwargs):
        calls.append(len(start_obs))
        return real(bundle, start_obs, *args, **kwargs)

    monkeypatch.setattr(env_module, "dydiff_rollout", recording)
    return calls


def test_continuations_are_batched_and_ready_at_plan_ends(bundle, monkeypatch):
    policy = fixed_policy(1)
    env = DydiffEnv(4, bundle=bundle, policy=policy, horizon=3, max_episode_steps=None, **PLANS)
    calls = count_rollout_calls(monkeypatch)
    obs, _ = env.reset(seed=0)
    assert calls == [math.ceil(8 / 0.6)]  # the pool
    plan_steps, continued = 0, 0
    for _ in range(9):
        before = len(calls)
        obs, _, terminated, truncated, info = env.step(act_with(policy, obs))
        new = calls[before:]
        assert len(new) <= 1, "everything pending is served by one batched call"
        plan_steps += int((info["mode"] == "plan").sum())
        continued += int(info["replanned"].sum())
    assert env.stats["model_steps"] == 0 and plan_steps > 0, "an agent that follows its plans never leaves them"
    assert continued > 0 and env.stats["replans"] >= continued
    assert any(c > 1 for c in calls[1:]), f"continuations of several sub-envs share a call: {calls}"
    # a sub-env that leaves its plan costs no diffusion run, now or at its old plan's end
    before = len(calls)
    off = act_with(policy, obs)
    off[0] = np.clip(off[0] + 0.5, -1, 1)
    env.step(off)
    assert env._state.on_plan[0] == False and not env._state.wants_next[0]  # noqa: E712
    assert all(c != 1 for c in calls[before:]), "no diffusion call for a single deviating sub-env"


def test_plans_take_the_whole_window_by_default(bundle):
    window = bundle.diffusion.horizon
    assert DydiffEnv(1, bundle=bundle, **FAST).horizon == window - 1
    with pytest.raises(ValueError, match=f"horizon must be at most {window - 1}"):
        DydiffEnv(1, bundle=bundle, horizon=window, **FAST)


def test_plan_calls_top_the_pool_up_and_keep_its_age(bundle, monkeypatch):
    """Every call for continuations also refills the pool in the same batch (no pool call of its own while
    the agent follows its plans), and a top-up does not restart the pool's `refresh_every` clock."""
    policy = fixed_policy(1)
    env = DydiffEnv(4, bundle=bundle, policy=policy, horizon=3, max_episode_steps=None, refresh_every=10_000, **PLANS)
    calls = count_rollout_calls(monkeypatch)
    obs, _ = env.reset(seed=0)
    topped_up = 0
    for _ in range(12):
        before, replans, pools = len(calls), env.stats["replans"], env.stats["pool_generations"]
        pool_before, age = len(env._state.pool), env._state.served_since_refresh
        obs, *_ = env.step(act_with(policy, obs))
        if len(calls) == before + 1 and env.stats["replans"] > replans:  # one call, for continuations
            assert len(env._state.pool) >= env.pool_size, "the call refilled the pool"
            if env.stats["pool_generations"] > pools and pool_before > 0 and age > 4:
                topped_up += 1  # a reset clock would be at most 4 (one step of 4 sub-envs) after this step
                assert env._state.served_since_refresh > age, "a top-up keeps the pool's age"
    assert topped_up > 0, f"no continuation call topped the pool up: {calls}"


def test_auto_mode_plans_only_for_agents_that_act_as_the_handle(bundle, monkeypatch):
    policy = fixed_policy(2)
    calls = count_rollout_calls(monkeypatch)
    env = DydiffEnv(4, bundle=bundle, policy=policy, max_episode_steps=20, **FAST)
    assert env.config.plans == "auto"
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):  # a random agent: never a diffusion run
        obs, *_, info = env.step(rng.uniform(-1, 1, (4, 3)))
    assert calls == [] and env.stats["plan_steps"] == 0
    obs, _ = env.reset()
    obs, *_, info = env.step(act_with(policy, obs))  # the handle's actions: first plans, in one call
    # which also fills the pool, now switched on, for the episodes to come
    assert (info["mode"] == "plan").all() and calls == [4 + math.ceil(8 / 0.6)] and env.stats["first_plans"] == 4
    kept = math.ceil(0.6 * math.ceil(8 / 0.6))  # the filter keeps ceil(0.6 x 14) = 9 of the 14 candidates
    assert env._state.pool_on and len(env._state.pool) == kept and env.stats["pool_generations"] == 1
    env.reset()  # episodes now start from filtered pool plans, without another call
    assert len(calls) == 1 and len(env._state.pool) == kept - 4
    # an agent that leaves every pool plan at its first action switches the pool off again
    for _ in range(10):
        env.step(rng.uniform(-1, 1, (4, 3)))
        env.reset()
    assert not env._state.pool_on
    # without a handle there is nothing an agent could follow: no plans, no probing
    no_handle = DydiffEnv(2, bundle=bundle, **FAST)
    no_handle.reset(seed=0)
    no_handle.step(np.zeros((2, 3)))
    assert not no_handle._state.probing.any() and no_handle.stats["rollout_calls"] == 0


def test_start_states_are_uniform_over_the_dataset(bundle):
    """The bundle stores every episode start plus a subsample of the other rows; resets reweight them."""
    import dataclasses

    n_start, n_rest = 10, 10
    obs = np.arange(n_start + n_rest, dtype=np.float32)[:, None].repeat(11, 1)
    fake = dataclasses.replace(bundle, meta={**bundle.meta, "dataset_episodes": 100, "dataset_transitions": 1000},
                               start_states={"observations": obs,
                                             "is_episode_start": np.arange(n_start + n_rest) < n_start})
    picks = fake.sample_start_obs(20_000, np.random.default_rng(0))[:, 0].numpy()
    share = (picks < n_start).mean()
    assert abs(share - 0.1) < 0.01, f"episode starts are 10 % of the dataset's rows, drew {share:.3f}"
    only = fake.sample_start_obs(100, np.random.default_rng(0), "episode_starts")[:, 0].numpy()
    assert (only < n_start).all()


def test_a_step_that_raises_leaves_the_env_as_it_was(bundle):
    """A policy handle that fails during a re-plan at a plan's end: the step raises, the env is unchanged, and
    once the handle works again the env goes on exactly like a twin that never failed."""
    base = fixed_policy(1)
    broken = {"on": False}

    def handle(obs):
        if broken["on"]:
            raise RuntimeError("policy failure")
        return act_with(base, obs)

    env, twin = (DydiffEnv(2, bundle=bundle, policy=handle, horizon=3, max_episode_steps=None, pool_size=2,
                           plans="always", filter="none") for _ in range(2))
    obs, _ = env.reset(seed=1)
    twin.reset(seed=1)
    for _ in range(2):  # up to the last step of the first plans: the continuations are due now
        a = act_with(base, obs)
        obs, *_ = env.step(a)
        twin.step(a)
    broken["on"] = True
    before = (env._state, env.stats.copy(), env._generator.get_state(), env.np_random.bit_generator.state)
    x_before = env._state.x_position.copy()
    with pytest.raises(RuntimeError, match="policy failure"):
        env.step(act_with(base, obs))
    assert env._state is before[0] and env.stats == before[1]
    assert np.array_equal(env._state.x_position, x_before)  # the failed step's x integration was discarded
    assert torch.equal(env._generator.get_state(), before[2]) and env.np_random.bit_generator.state == before[3]
    broken["on"] = False
    for _ in range(4):
        a = act_with(base, obs)
        out, twin_out = env.step(a), twin.step(a)
        for x, y in zip(out[:4], twin_out[:4]):
            assert np.array_equal(x, y)
        assert np.array_equal(env._state.x_position, twin._state.x_position)
        obs = out[0]


def test_removed_keywords_name_their_replacement(bundle):
    with pytest.raises(TypeError, match="max_disagreement"):
        DydiffEnv(1, bundle=bundle, deviation_threshold=1.0)
    with pytest.raises(TypeError, match="unknown keyword 'pool'.*pool_size"):
        DydiffEnv(1, bundle=bundle, pool=3)
    with pytest.raises(ValueError, match="plans must be one of"):
        DydiffEnv(1, bundle=bundle, plans="sometimes")
    env = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", bundle=bundle,
                       config=EnvConfig(plans="never", pool_size=3), filter="softmax", keep_fraction=0.5)
    assert env.config.plans == "never" and env.config.pool_size == 3
    assert env.config.filter == FilterConfig("softmax", 0.5)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_actions_raise(bundle):
    env = DydiffEnv(2, bundle=bundle, **FAST)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*single env's action"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(2, 3\), got \(2, 4\)"):
        env.step(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="real numbers"):
        env.step(np.array([["a", "b", "c"]] * 2))
    with pytest.raises(ValueError, match="real numbers"):
        env.step(np.zeros((2, 3), dtype=complex))
    for bad in (np.nan, np.inf, -np.inf):
        actions = np.zeros((2, 3))
        actions[1, 2] = bad
        with pytest.raises(ValueError, match=r"sub-envs \[1\] contain NaN or inf"):
            env.step(actions)
    single = gym.make(ENV_ID, bundle=bundle, **FAST).unwrapped
    single.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        single.step(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        single.step(np.array([0.0, np.nan, 0.0]))


def test_out_of_bound_actions_are_clipped(bundle):
    env, twin = DydiffEnv(2, bundle=bundle, **FAST), DydiffEnv(2, bundle=bundle, **FAST)
    env.reset(seed=0)
    twin.reset(seed=0)
    actions = np.array([[2.0, 0.0, 0.5], [-3.0, -3.0, 0.5]])
    obs, rewards, *_, info = env.step(actions)
    twin_obs, twin_rewards, *_, twin_info = twin.step(np.clip(actions, -1, 1))
    assert info["clipped_actions"].tolist() == [1, 2] and env.stats["clipped_actions"] == 3
    assert twin_info["clipped_actions"].tolist() == [0, 0]
    assert np.array_equal(obs, twin_obs) and np.array_equal(rewards, twin_rewards)


def test_any_finite_real_action_is_accepted(bundle):
    env, twin = DydiffEnv(2, bundle=bundle, **FAST), DydiffEnv(2, bundle=bundle, **FAST)
    env.reset(seed=0)
    twin.reset(seed=0)
    grad = torch.full((2, 3), 0.25, requires_grad=True)  # straight from an actor, grad still attached
    huge = np.array([[1e300, 0.25, 0.25], [-1e300, 0.25, 0.25]])  # finite float64 beyond float32's range
    for actions in (grad, huge):
        obs, rewards, *_, info = env.step(actions)
        expected = np.clip(actions.detach().numpy() if isinstance(actions, torch.Tensor) else actions, -1, 1)
        twin_obs, twin_rewards, *_ = twin.step(expected.astype(np.float32))
        assert np.array_equal(obs, twin_obs) and np.array_equal(rewards, twin_rewards)
    assert info["clipped_actions"].tolist() == [1, 1]


def test_step_before_reset(bundle):
    with pytest.raises(RuntimeError, match="reset"):
        DydiffEnv(1, bundle=bundle, **FAST).step(np.zeros((1, 3)))
    with pytest.raises(RuntimeError, match="reset"):
        gym.make(ENV_ID, bundle=bundle, **FAST).unwrapped.step(np.zeros(3))


def test_bad_policy_handle_raises_policy_error(bundle):
    env = DydiffEnv(1, bundle=bundle, **PLANS)
    env.set_policy(lambda obs: np.zeros((obs.shape[0], 2)))
    with pytest.raises(PolicyError, match="shape"):
        env.reset(seed=0)
    env.set_policy(lambda obs: np.full((obs.shape[0], 3), np.nan))
    with pytest.raises(PolicyError, match="NaN"):
        env.reset(seed=0)
    with pytest.raises(TypeError, match="policy"):
        env.set_policy(42)


def test_bundle_for_another_env(tiny_bundle, bundle):
    with pytest.raises(BundleError, match="Walker2d-v5"):
        DydiffEnv(bundle=tiny_bundle, task="walker2d")
    with pytest.raises(BundleError, match="Walker2d-v5"):
        DydiffEnv(bundle=bundle, task="walker2d")


def test_never_emits_nan(tiny_bundle, monkeypatch):
    own = load_bundle(tiny_bundle)  # patched below, so not the shared one
    env = DydiffEnv(2, bundle=own, **FAST)
    obs0, _ = env.reset(seed=0)
    predict = own.dynamics.predict

    def nan_predict(obs, act, mode="elite_mean", generator=None):
        nxt, disagreement = predict(obs, act, mode=mode, generator=generator)
        return torch.full_like(nxt, math.nan), disagreement

    monkeypatch.setattr(own.dynamics, "predict", nan_predict)
    off = np.full((2, 3), 0.5, np.float32)  # no plans: a model step
    obs, rewards, terminated, truncated, info = env.step(off)
    assert np.isfinite(obs).all() and np.isfinite(rewards).all()
    assert np.array_equal(obs, obs0), "a non-finite step repeats the previous observation"
    assert (rewards == 0).all() and truncated.all() and not terminated.any()
    assert info["nonfinite"].all() and env.stats["nonfinite"] == 2
    obs, *_ = env.step(off)  # the autoreset step
    assert np.isfinite(obs).all()


def test_a_runaway_state_is_cut_like_a_non_finite_one(tiny_bundle, monkeypatch):
    own = load_bundle(tiny_bundle)
    env = DydiffEnv(2, bundle=own, **FAST)
    obs0, _ = env.reset(seed=0)
    predict = own.dynamics.predict
    std = torch.as_tensor(own.normalizer("obs").std, dtype=torch.float32)

    def runaway(obs, act, mode="elite_mean", generator=None):  # sub-env 0 leaves by 1000 stds, sub-env 1 stays
        nxt, disagreement = predict(obs, act, mode=mode, generator=generator)
        return nxt + torch.stack([1000 * std, 0 * std]), disagreement

    monkeypatch.setattr(own.dynamics, "predict", runaway)
    obs, rewards, terminated, truncated, info = env.step(np.full((2, 3), 0.5, np.float32))
    assert np.array_equal(obs[0], obs0[0]) and rewards[0] == 0 and truncated[0] and not terminated[0]
    assert list(info["diverged"]) == [True, False] and not info["nonfinite"].any()
    assert env.stats["diverged"] == 1 and env.stats["nonfinite"] == 0
    env = DydiffEnv(2, bundle=own, max_state_std=None, **FAST)  # the guard off
    env.reset(seed=0)
    obs, rewards, terminated, truncated, info = env.step(np.full((2, 3), 0.5, np.float32))
    assert not info["diverged"].any() and np.abs(obs[0] - obs0[0]).max() > 100
    with pytest.raises(ValueError, match="max_state_std"):
        EnvConfig(max_state_std=0)


# --------------------------------------------------------------------------------------------- policy handles


def _check_handle(handle, bundle, input="auto"):
    policy = as_policy(handle, input=input)
    actions = policy(torch.as_tensor(start_rows(bundle)[:5]))
    assert isinstance(actions, torch.Tensor) and actions.shape == (5, 3) and actions.dtype == torch.float32
    assert torch.isfinite(actions).all()
    return actions


def test_policy_handles_numpy_torch_agent(bundle):
    calls = []

    def numpy_policy(obs):
        calls.append(type(obs))
        return np.tanh(obs[:, :3])

    _check_handle(numpy_policy, bundle)
    assert calls == [np.ndarray], "plain callables receive numpy arrays"
    module = fixed_policy()
    torch.testing.assert_close(_check_handle(module, bundle), module(torch.as_tensor(start_rows(bundle)[:5])))
    _check_handle(lambda obs: torch.tanh(obs[:, :3]), bundle, input="torch")

    class Agent:
        def actor_fn(self):
            return lambda obs: torch.tanh(obs[:, 3:6])

    _check_handle(Agent(), bundle)
    with pytest.raises(TypeError):
        as_policy("not a policy")
    # an env accepts a handle and plans with it
    env = DydiffEnv(1, bundle=bundle, policy=module, **PLANS)
    obs, _ = env.reset(seed=0)
    torch.testing.assert_close(torch.as_tensor(env.planned_actions()[0]),
                               module(torch.as_tensor(obs[0], dtype=torch.float32)))


def test_as_policy_imports_tianshou_only_for_tianshou_objects(monkeypatch):
    import builtins

    attempted = []
    real_import = builtins.__import__

    def recording_import(name, *args, **kwargs):
        if name.startswith("tianshou"):
            attempted.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", recording_import)
    as_policy(fixed_policy())
    as_policy(lambda obs: obs[:, :3])
    assert attempted == [], "importing tianshou takes seconds; plain policies must not trigger it"


def test_policy_handle_sb3(bundle):
    sb3 = pytest.importorskip("stable_baselines3")
    real = gym.make("Hopper-v5")
    model = sb3.TD3("MlpPolicy", real, buffer_size=100, policy_kwargs={"net_arch": [16]}, device="cpu", seed=0)
    actions = _check_handle(model, bundle)
    expected, _ = model.predict(start_rows(bundle)[:5], deterministic=True)
    np.testing.assert_allclose(actions.numpy(), expected, rtol=1e-6, atol=1e-6)
    env = DydiffEnv(1, bundle=bundle, policy=model, **PLANS)
    env.reset(seed=0)
    real.close()


def test_policy_handle_tianshou(bundle):
    pytest.importorskip("tianshou")
    from tianshou.algorithm.modelfree.ddpg import ContinuousDeterministicPolicy
    from tianshou.utils.net.common import Net
    from tianshou.utils.net.continuous import ContinuousActorDeterministic

    real = gym.make("Hopper-v5")
    actor = ContinuousActorDeterministic(preprocess_net=Net(state_shape=(11,), hidden_sizes=(16,)), action_shape=3)
    policy = ContinuousDeterministicPolicy(actor=actor, action_space=real.action_space,
                                           observation_space=real.observation_space)
    actions = _check_handle(policy, bundle)
    assert bool(((actions >= -1) & (actions <= 1)).all())
    # an Algorithm is used through its policy
    from tianshou.algorithm import DDPG
    from tianshou.algorithm.optim import AdamOptimizerFactory
    from tianshou.utils.net.continuous import ContinuousCritic

    critic = ContinuousCritic(preprocess_net=Net(state_shape=(11,), action_shape=3, hidden_sizes=(16,), concat=True))
    algorithm = DDPG(policy=policy, policy_optim=AdamOptimizerFactory(), critic=critic,
                     critic_optim=AdamOptimizerFactory())
    assert torch.equal(_check_handle(algorithm, bundle), actions)
    env = DydiffEnv(1, bundle=bundle, policy=policy, **PLANS)
    env.reset(seed=0)
    real.close()


def test_a_loaded_bundle_without_dynamics_is_refused_at_construction(bundle):
    import dataclasses

    with pytest.raises(BundleError, match="no dynamics model"):
        DydiffEnv(1, bundle=dataclasses.replace(bundle, dynamics=None))


def test_stored_start_states_draw_the_stored_rows_uniformly(bundle):
    rows = len(bundle.start_states["observations"])
    picks = bundle.sample_start_obs(50, np.random.default_rng(4), "stored").numpy()
    expected = bundle.start_states["observations"][np.random.default_rng(4).integers(0, rows, size=50)]
    assert np.array_equal(picks, expected)
    with pytest.raises(ValueError, match="start-state mode"):
        bundle.sample_start_obs(1, np.random.default_rng(0), "sometimes")
