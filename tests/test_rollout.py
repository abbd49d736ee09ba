"""`dydiff_rollout`: shapes, exactness of s_0 and of the transition layout, seeding, filtering, the
termination cut, returns, the single-step (M=0) and behaviour-prior modes, chunking and input errors.

All on the session's `tiny_bundle` (diffusion window 16, 6 sampler steps) with small batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dydiff_env import (BundleError, FilterConfig, PolicyError, RolloutResult, behaviour_policy, dydiff_rollout,
                        load_bundle)
from dydiff_env.rollout import _first_termination_cut, filter_trajectories

OBS_DIM, ACT_DIM = 11, 3


def linear_policy(seed: int = 0, scale: float = 0.3):
    """A fixed random tanh-linear torch batch policy (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(OBS_DIM, ACT_DIM, generator=g) * scale
    bias = torch.randn(ACT_DIM, generator=g) * scale
    return lambda obs: torch.tanh(obs @ weight + bias)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def starts(bundle):
    """Dataset episode starts, float32 (B, obs)."""
    s = bundle.start_states
    return s["observations"][s["is_episode_start"]].astype(np.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def result(bundle, starts):
    """One default rollout (M=2, hardmax 60 %) of 11 trajectories, shared by the read-only checks."""
    return dydiff_rollout(bundle, starts[:11], linear_policy(), generator=gen(0))


def test_shapes_and_dtypes(bundle, result):
    window = bundle.diffusion.horizon
    b, h = 11, 3 * window // 4  # default horizon: three quarters of the window
    assert len(result) == b
    for name, shape, dtype in [
        ("obs", (b, h, OBS_DIM), torch.float32), ("next_obs", (b, h, OBS_DIM), torch.float32),
        ("actions", (b, h, ACT_DIM), torch.float32), ("rewards", (b, h), torch.float32),
        ("terminated", (b, h), torch.bool), ("valid", (b, h), torch.bool), ("disagreement", (b, h), torch.float32),
        ("returns", (b,), torch.float32), ("kept", (b,), torch.bool), ("nonfinite", (b,), torch.bool),
        ("diverged", (b,), torch.bool),
    ]:
        value = getattr(result, name)
        assert tuple(value.shape) == shape, name
        assert value.dtype == dtype, name
    assert bool(((result.actions >= -1) & (result.actions <= 1)).all())
    assert not result.nonfinite.any() and not result.diverged.any()
    flat = result.transitions(kept_only=True)
    assert flat["obs"].shape == (int((result.valid & result.kept[:, None]).sum()), OBS_DIM)


def test_start_state_kept_bit_exact(bundle, starts, result):
    assert torch.equal(result.obs[:, 0], torch.as_tensor(starts[:11]))
    # float64 input: s_0 is the float32 conversion of it, exactly
    s64 = starts[:3].astype(np.float64) + 1e-9
    r = dydiff_rollout(bundle, s64, linear_policy(), generator=gen(1), filter=FilterConfig("none"))
    assert torch.equal(r.obs[:, 0], torch.as_tensor(s64, dtype=torch.float32))


def test_next_obs_is_next_row_of_obs(result):
    assert torch.equal(result.next_obs[:, :-1], result.obs[:, 1:])


def test_same_seed_same_result_other_seed_differs(bundle, starts):
    policy = linear_policy()
    a = dydiff_rollout(bundle, starts[:6], policy, generator=gen(7))
    b = dydiff_rollout(bundle, starts[:6], policy, generator=gen(7))
    c = dydiff_rollout(bundle, starts[:6], policy, generator=gen(8))
    for field in RolloutResult.__dataclass_fields__:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.next_obs, c.next_obs)
    assert torch.equal(a.obs[:, 0], c.obs[:, 0])  # only the start is shared


def test_hardmax_keeps_exact_top_fraction(result):
    count = math.ceil(0.6 * len(result))
    assert int(result.kept.sum()) == count == 7
    kept, dropped = result.returns[result.kept], result.returns[~result.kept]
    assert kept.min() >= dropped.max()
    # the same set as sorting by return (returns of a continuous model do not tie)
    top = torch.sort(result.returns, descending=True).indices[:count]
    assert set(top.tolist()) == set(torch.nonzero(result.kept).flatten().tolist())


def test_softmax_and_none_counts(bundle, starts):
    policy = linear_policy()
    soft = dydiff_rollout(bundle, starts[:11], policy, generator=gen(0), filter=FilterConfig("softmax", 0.6, 1.0))
    assert int(soft.kept.sum()) == math.ceil(0.6 * 11)
    none = dydiff_rollout(bundle, starts[:11], policy, generator=gen(0), filter=FilterConfig("none"))
    assert bool(none.kept.all())


@pytest.mark.parametrize("batch", [1, 2, 5, 10, 17])
def test_filter_trajectories_counts(batch):
    returns = torch.randperm(batch, generator=gen(batch)).float()
    hard = filter_trajectories(returns, FilterConfig("hardmax", 0.6))
    assert int(hard.sum()) == max(1, math.ceil(0.6 * batch))
    assert set(returns[hard].tolist()) == set(sorted(returns.tolist(), reverse=True)[: int(hard.sum())])
    soft = filter_trajectories(returns, FilterConfig("softmax", 0.6, 0.05), gen(0))
    assert int(soft.sum()) == int(hard.sum())
    assert bool(filter_trajectories(returns, FilterConfig("none")).all())


def test_filter_config_validation():
    with pytest.raises(ValueError, match="filter mode"):
        FilterConfig("top")
    with pytest.raises(ValueError, match="keep_fraction"):
        FilterConfig("hardmax", 0.0)
    with pytest.raises(ValueError, match="temperature"):
        FilterConfig("softmax", 0.5, 0.0)


def test_first_termination_cut():
    terminated = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(_first_termination_cut(terminated), expected)


def test_valid_cut_end_to_end(bundle, starts):
    # half the starts are "fallen" hoppers (height 0.5 < 0.7), so some trajectories terminate
    s0 = starts[:8].copy()
    s0[::2, 0] = 0.5
    r = dydiff_rollout(bundle, s0, linear_policy(), generator=gen(3), filter=FilterConfig("none"))
    assert bool(r.terminated.any()), "the fallen starts should terminate"
    assert not bool(r.valid.all()), "some trajectory should terminate before its horizon"
    for i in range(len(r)):
        term = torch.nonzero(r.terminated[i]).flatten()
        if len(term) == 0:
            assert bool(r.valid[i].all())
            continue
        k = int(term[0])
        assert bool(r.valid[i, : k + 1].all()), "steps up to and including the first termination are valid"
        assert not bool(r.valid[i, k + 1:].any()), "nothing after the first termination is valid"
    # returns: the sum of the rewards of the valid steps
    torch.testing.assert_close(r.returns, (r.rewards * r.valid).sum(1), rtol=1e-6, atol=1e-6)


def test_returns_are_sum_over_valid_steps(result):
    torch.testing.assert_close(result.returns, torch.where(result.valid, result.rewards, 0.0).sum(1),
                               rtol=1e-6, atol=1e-6)


def test_single_step_mode_needs_no_diffusion(tiny_bundle, starts):
    b = load_bundle(tiny_bundle)
    b.diffusion = None
    window = 16
    r = dydiff_rollout(b, starts[:4], linear_policy(), horizon=window + 8, num_iterations=0, generator=gen(0),
                       filter=FilterConfig("none"))
    assert r.obs.shape == (4, window + 8, OBS_DIM)  # no diffusion window limits the horizon
    assert torch.equal(r.obs[:, 0], torch.as_tensor(starts[:4]))
    assert torch.equal(r.next_obs[:, :-1], r.obs[:, 1:])
    with pytest.raises(ValueError, match="pass horizon"):
        dydiff_rollout(b, starts[:4], linear_policy(), num_iterations=0)
    with pytest.raises(BundleError, match="diffusion"):
        dydiff_rollout(b, starts[:4], linear_policy(), horizon=4, num_iterations=2)


def test_behaviour_prior_mode(bundle, starts):
    a = dydiff_rollout(bundle, starts[:5], behaviour_policy(bundle, gen(2)), generator=gen(2))
    b = dydiff_rollout(bundle, starts[:5], behaviour_policy(bundle, gen(2)), generator=gen(2))
    assert a.actions.shape == (5, 12, ACT_DIM)
    assert torch.isfinite(a.obs).all() and bool(((a.actions >= -1) & (a.actions <= 1)).all())
    assert torch.equal(a.next_obs, b.next_obs)  # the BC noise is drawn from the given generator
    # deterministic BC actions: mean action relabelling
    d = dydiff_rollout(bundle, starts[:5], behaviour_policy(bundle, deterministic=True), generator=gen(2))
    torch.testing.assert_close(d.actions, bundle.bc.act(d.obs, deterministic=True))


def test_chunking_matches_one_chunk(bundle, starts):
    # dynamics_mode="mean" and M=0 use no randomness, so chunking changes nothing but the matmul batch sizes
    # (not bit-exact on CPU BLAS across batch sizes: compare to float32 rounding)
    kw = dict(horizon=10, num_iterations=0, dynamics_mode="mean", filter=FilterConfig("hardmax"))
    one = dydiff_rollout(bundle, starts[:13], linear_policy(), chunk_size=512, **kw)
    many = dydiff_rollout(bundle, starts[:13], linear_policy(), chunk_size=4, **kw)
    for field in RolloutResult.__dataclass_fields__:
        a, b = getattr(one, field), getattr(many, field)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), field
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=field)


def test_policy_errors(bundle, starts):
    with pytest.raises(PolicyError, match=r"shape \(3, 2\).*expected \(3, 3\)"):
        dydiff_rollout(bundle, starts[:3], lambda o: torch.zeros(o.shape[0], 2), generator=gen(0))
    with pytest.raises(PolicyError, match="shape"):
        dydiff_rollout(bundle, starts[:3], lambda o: torch.zeros(ACT_DIM), generator=gen(0))
    with pytest.raises(PolicyError, match="NaN or inf"):
        dydiff_rollout(bundle, starts[:3], lambda o: torch.full((o.shape[0], ACT_DIM), float("nan")),
                       generator=gen(0))
    # numpy output is accepted; out-of-range actions are clipped to [-1, 1]
    r = dydiff_rollout(bundle, starts[:3], lambda o: np.full((o.shape[0], ACT_DIM), 5.0), generator=gen(0),
                       num_iterations=0)
    assert bool((r.actions == 1.0).all())


def test_bad_start_obs(bundle, starts):
    policy = linear_policy()
    with pytest.raises(ValueError, match="start_obs must have shape"):
        dydiff_rollout(bundle, starts[0], policy)
    with pytest.raises(ValueError, match="start_obs must have shape"):
        dydiff_rollout(bundle, starts[:2, :10], policy)
    bad = starts[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dydiff_rollout(bundle, bad, policy)
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        dydiff_rollout(bundle, bad, policy)


def test_horizon_limits(bundle, starts):
    window = bundle.diffusion.horizon
    policy = linear_policy()
    with pytest.raises(ValueError, match=rf"horizon must be in \[1, {window - 1}\]"):
        dydiff_rollout(bundle, starts[:2], policy, horizon=window)
    with pytest.raises(ValueError, match="horizon"):
        dydiff_rollout(bundle, starts[:2], policy, horizon=0)
    with pytest.raises(ValueError, match="num_iterations"):
        dydiff_rollout(bundle, starts[:2], policy, num_iterations=-1)
    r = dydiff_rollout(bundle, starts[:2], policy, horizon=window - 1, generator=gen(0))
    assert r.obs.shape[1] == window - 1


def test_a_runaway_state_ends_its_trajectory_and_is_no_data(bundle, starts, monkeypatch):
    std = torch.as_tensor(bundle.normalizer("obs").std, dtype=torch.float32)
    predict = bundle.dynamics.member_predictions
    calls = []

    def runaway(obs, act):  # trajectory 0 runs away from its fourth single-step state on
        means, stds = predict(obs, act)
        calls.append(1)
        if len(calls) >= 4:
            means = means.clone()
            means[:, 0] += 1000 * std
        return means, stds

    monkeypatch.setattr(bundle.dynamics, "member_predictions", runaway)
    result = dydiff_rollout(bundle, starts[:3], linear_policy(), horizon=8, num_iterations=0,
                            filter=FilterConfig("none"), generator=gen(0))
    assert result.diverged.tolist() == [True, False, False] and not result.nonfinite.any()
    assert result.valid[0].tolist() == [True] * 3 + [False] * 5  # cut before its first runaway step
    assert result.terminated[0, 3] and result.valid[1:].all()
    calls.clear()
    off = dydiff_rollout(bundle, starts[:3], linear_policy(), horizon=8, num_iterations=0,
                         filter=FilterConfig("none"), generator=gen(0), max_state_std=None)
    assert not off.diverged.any() and off.valid[0, 3]
