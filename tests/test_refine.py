"""`RefineConfig`: the anchored prefix of a DyDiff rollout and the uncertainty-weighted combination.

The anchored prefix must equal the single-step rollout bit for bit; the combination weights are checked on
synthetic cases where the answer is known (an exact ensemble, an exact diffusion model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dydiff_env import FilterConfig, RefineConfig, SamplerConfig, behaviour_policy, dydiff_rollout, load_bundle
from dydiff_env.rollout import diffusion_weight

OBS_DIM, ACT_DIM = 11, 3
NONE = FilterConfig("none")


def linear_policy(seed: int = 0, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(OBS_DIM, ACT_DIM, generator=g) * scale
    return lambda obs: torch.tanh(torch.as_tensor(obs, dtype=torch.float32) @ weight)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)  # a fresh one per test: some tests change its models


@pytest.fixture(scope="module")
def starts(tiny_bundle):
    s = load_bundle(tiny_bundle).start_states
    return torch.as_tensor(s["observations"][:6], dtype=torch.float32)


@pytest.mark.parametrize("anchor", [1, 5, 11])
def test_anchored_prefix_equals_single_step_states_bit_for_bit(bundle, starts, anchor):
    kw = dict(horizon=12, filter=NONE)
    anchored = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=2, generator=gen(3),
                              refine=RefineConfig(anchor_steps=anchor, blend="average"), **kw)
    single = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=0, generator=gen(3), **kw)
    # states s_0..s_k and the actions a_0..a_{k-1} that produced them (the elite picks come from the same draws)
    assert torch.equal(anchored.obs[:, : anchor + 1], single.obs[:, : anchor + 1])
    assert torch.equal(anchored.actions[:, :anchor], single.actions[:, :anchor])
    # past the prefix the diffusion model has changed the states
    assert not torch.equal(anchored.next_obs[:, anchor:], single.next_obs[:, anchor:])


def test_anchored_actions_kept_for_a_stochastic_policy(bundle, starts):
    # relabelling would draw new noisy actions; the anchored states were produced by the first ones
    anchored = dydiff_rollout(bundle, starts, behaviour_policy(bundle, gen(5)), horizon=12, num_iterations=2,
                              generator=gen(3), filter=NONE, refine=RefineConfig(anchor_steps=4))
    single = dydiff_rollout(bundle, starts, behaviour_policy(bundle, gen(5)), horizon=12, num_iterations=0,
                            generator=gen(3), filter=NONE)
    assert torch.equal(anchored.actions[:, :4], single.actions[:, :4])
    assert torch.equal(anchored.obs[:, :5], single.obs[:, :5])


def test_default_refine_is_the_gated_uncertainty_blend(bundle, starts):
    assert RefineConfig() == RefineConfig(anchor_steps=0, blend="uncertainty", probe_steps=4, max_probe_ratio=4.0)
    kw = dict(horizon=12, num_iterations=2, filter=NONE)
    default = dydiff_rollout(bundle, starts, linear_policy(), generator=gen(1), **kw)
    explicit = dydiff_rollout(bundle, starts, linear_policy(), generator=gen(1), refine=RefineConfig(), **kw)
    reference = dydiff_rollout(bundle, starts, linear_policy(), generator=gen(1),
                               refine=RefineConfig(blend="average"), **kw)
    assert torch.equal(default.obs, explicit.obs)
    assert not torch.equal(default.obs, reference.obs)


def test_gate_keeps_the_single_step_states_of_trajectories_off_at_the_probe(bundle, starts):
    # the tiny diffusion model is far from its ensemble at the first steps: a tight gate closes everywhere
    kw = dict(horizon=12, filter=NONE, dynamics_mode="mean")
    single = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=0, **kw)
    gated = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=2, generator=gen(1),
                           refine=RefineConfig(max_probe_ratio=1e-6, diffusion_error=1e-3), **kw)
    assert torch.equal(gated.obs, single.obs)
    with pytest.raises(ValueError, match="max_probe_ratio"):
        RefineConfig(max_probe_ratio=0.0)


def test_refine_config_validation(bundle, starts):
    with pytest.raises(ValueError, match="anchor_steps"):
        RefineConfig(anchor_steps=-1)
    with pytest.raises(ValueError, match="blend"):
        RefineConfig(blend="median")
    with pytest.raises(ValueError, match="diffusion_error"):
        RefineConfig(diffusion_error=0.0)
    with pytest.raises(ValueError, match="num_iterations=0"):
        dydiff_rollout(bundle, starts, linear_policy(), horizon=8, refine=RefineConfig(anchor_steps=8))


def test_diffusion_weight_rule():
    step_variance = torch.tensor([[0.0, 0.01, 0.03, 0.0]])
    average = diffusion_weight(step_variance, RefineConfig(blend="average"))
    assert average.shape == (1, 4, 1) and bool((average == 0.5).all())
    w = diffusion_weight(step_variance, RefineConfig(blend="uncertainty", diffusion_error=0.1,
                                                     max_probe_ratio=None))[0, :, 0]
    # running variance 0, 0.01, 0.04, 0.04 against 0.1^2: weights 0, 1/2, 4/5, 4/5
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 0.8, 0.8]))
    # a probe gap above diffusion_error^2 replaces it: 0.04 against 0.04 + 0.04
    ungated = RefineConfig(blend="uncertainty", diffusion_error=0.1, max_probe_ratio=None)
    probed = diffusion_weight(step_variance, ungated, torch.tensor([0.04]))[0, :, 0]
    torch.testing.assert_close(probed, torch.tensor([0.0, 0.2, 0.5, 0.5]))
    below = diffusion_weight(step_variance, ungated, torch.tensor([0.001]))[0, :, 0]
    torch.testing.assert_close(below, w)
    # the gate: a gap above max_probe_ratio * diffusion_error^2 = 0.04 zeroes the weights
    gate = RefineConfig(blend="uncertainty", diffusion_error=0.1, max_probe_ratio=4.0)
    torch.testing.assert_close(diffusion_weight(step_variance, gate, torch.tensor([0.04]))[0, :, 0], probed)
    assert bool((diffusion_weight(step_variance, gate, torch.tensor([0.041])) == 0).all())


def make_ensemble_exact(bundle) -> None:
    """Every elite a copy of the first: the ensemble has no spread, so its own variance estimate is zero."""
    net, elites = bundle.dynamics.net, bundle.dynamics.elites
    with torch.no_grad():
        for p in net.parameters():
            p[elites] = p[elites[0]].clone()


def test_uncertainty_blend_keeps_a_certain_ensemble(bundle, starts):
    make_ensemble_exact(bundle)
    kw = dict(horizon=12, filter=NONE, dynamics_mode="mean")
    blended = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=2, generator=gen(2),
                             refine=RefineConfig(blend="uncertainty"), **kw)
    single = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=0, generator=gen(2), **kw)
    assert torch.equal(blended.obs, single.obs)  # weight 0 on the diffusion sample everywhere
    averaged = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=2, generator=gen(2),
                              refine=RefineConfig(blend="average"), **kw)
    assert not torch.equal(averaged.obs, single.obs)


def exact_diffusion_model(bundle, target_states: torch.Tensor) -> None:
    """A denoiser that always predicts `target_states` (with whatever actions are given): with the Euler
    sampler, whose last step lands on the denoiser's prediction, every sample is that trajectory."""
    norm = bundle.normalizer("transition")
    obs_dim = bundle.obs_dim

    def denoise(x, sigma):
        target = x.clone()
        target[..., :obs_dim] = norm.to_unit(torch.cat([target_states, torch.zeros_like(x[..., obs_dim:])], -1))[..., :obs_dim]
        return target

    bundle.diffusion.denoise = denoise


@pytest.mark.parametrize("diffusion_error, expect", [(1e-6, "diffusion"), (1e6, "ensemble")])
def test_uncertainty_blend_follows_the_more_certain_model(bundle, starts, diffusion_error, expect):
    window = bundle.diffusion.horizon
    kw = dict(horizon=12, filter=NONE, dynamics_mode="mean", sampler=SamplerConfig(kind="euler", num_steps=4))
    single = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=0, **kw)
    target = single.obs[:, :1].expand(-1, window, -1).clone()  # the truth: the robot stays at s_0
    target = target + 0.01 * torch.arange(window, dtype=torch.float32)[None, :, None]
    target[:, 0] = starts
    exact_diffusion_model(bundle, target)
    blended = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=1,
                             refine=RefineConfig(blend="uncertainty", diffusion_error=diffusion_error, probe_steps=0),
                             **kw)
    reference = target[:, :12] if expect == "diffusion" else single.obs
    torch.testing.assert_close(blended.obs[:, 1:], reference[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(blended.obs[:, 0], starts, rtol=0, atol=0)


def test_num_samples_averages_each_trajectorys_own_samples(bundle, starts):
    # sample k of a batch of K x B windows is off by (k - (K - 1) / 2) x 0.5 in every state: the mean of a
    # trajectory's K samples is its target exactly, and mixing up trajectories would show (their targets differ)
    window, obs_dim, num_samples = bundle.diffusion.horizon, bundle.obs_dim, 3
    kw = dict(horizon=12, filter=NONE, dynamics_mode="mean", sampler=SamplerConfig(kind="euler", num_steps=4))
    single = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=0, **kw)
    target = single.obs[:, :1].expand(-1, window, -1) + 0.01 * torch.arange(window, dtype=torch.float32)[None, :, None]
    target = target.clone()
    target[:, 0] = starts
    norm = bundle.normalizer("transition")
    unit_target = norm.to_unit(torch.cat([target, torch.zeros(*target.shape[:2], ACT_DIM)], -1))[..., :obs_dim]

    def denoise(x, sigma):
        k = torch.arange(x.shape[0]) // len(starts)
        offset = 0.5 * (k - (x.shape[0] // len(starts) - 1) / 2).to(x.dtype)
        out = x.clone()
        out[..., :obs_dim] = unit_target.repeat(x.shape[0] // len(starts), 1, 1) + offset[:, None, None]
        return out

    bundle.diffusion.denoise = denoise
    refine = RefineConfig(blend="uncertainty", diffusion_error=1e-6, probe_steps=0, num_samples=num_samples)
    averaged = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=1, refine=refine, **kw)
    torch.testing.assert_close(averaged.obs[:, 1:], target[:, 1:12], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="num_samples"):
        RefineConfig(num_samples=0)


def test_a_diffusion_model_far_off_at_the_probe_steps_gets_little_weight(bundle, starts):
    # an "exact" diffusion model of a wrong trajectory: the probe measures the gap where the ensemble is good
    window = bundle.diffusion.horizon
    kw = dict(horizon=12, filter=NONE, dynamics_mode="mean", sampler=SamplerConfig(kind="euler", num_steps=4))
    single = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=0, **kw)
    std = torch.as_tensor(bundle.normalizer("obs").std)
    wrong = single.obs[:, :1].expand(-1, window, -1) + 3.0 * std  # 3 stds off from step 1 on
    wrong = wrong.clone()
    wrong[:, 0] = starts
    exact_diffusion_model(bundle, wrong)
    refine = RefineConfig(blend="uncertainty", diffusion_error=1e-3, max_probe_ratio=None)  # the floor alone
    probed = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=1, refine=refine, **kw)
    blind = dydiff_rollout(bundle, starts, linear_policy(), num_iterations=1,
                           refine=RefineConfig(blend="uncertainty", diffusion_error=1e-3, probe_steps=0), **kw)
    gap_probed = ((probed.obs - single.obs) / std).abs().mean()
    gap_blind = ((blind.obs - single.obs) / std).abs().mean()
    assert gap_probed < 0.05 * gap_blind  # the probe keeps the rollout near the single-step states


def test_env_takes_refine_settings(bundle, starts):
    from dydiff_env import DydiffEnv, EnvConfig

    assert EnvConfig(refine={"blend": "uncertainty"}).refine == RefineConfig(blend="uncertainty")
    with pytest.raises(ValueError, match="refine must be"):
        EnvConfig(refine="uncertainty")
    with pytest.raises(ValueError, match="blend"):
        EnvConfig(refine={"blend": "median"})
    with pytest.raises(ValueError, match="anchor_steps"):
        DydiffEnv(2, bundle=bundle, horizon=6, refine={"anchor_steps": 6})
    env = DydiffEnv(2, bundle=bundle, pool_size=8, refine=RefineConfig(anchor_steps=3))
    single = DydiffEnv(2, bundle=bundle, pool_size=8, num_iterations=0)
    anchored = env.rollout(4, policy=linear_policy(), start_obs=starts[:4], rng=np.random.default_rng(1))
    plain = single.rollout(4, policy=linear_policy(), start_obs=starts[:4], rng=np.random.default_rng(1))
    assert torch.equal(anchored.obs[:, :4], plain.obs[:, :4])  # the same generator seed: the same elite draws


def test_probe_measures_the_first_free_steps():
    from dydiff_env.rollout import probe_distance

    states = torch.zeros(1, 10, 2)
    sampled = states.clone()
    sampled[:, 4:6] = 1.0  # off on steps 4 and 5 only
    unit = torch.ones(2)
    assert probe_distance(sampled, states, unit, first=1, steps=2).item() == 0.0
    assert probe_distance(sampled, states, unit, first=4, steps=2).item() == 1.0  # anchor 3: steps 4, 5
    assert probe_distance(sampled, states, unit, first=9, steps=4).item() == 0.0  # clipped at the window
    assert probe_distance(sampled, states, unit, first=10, steps=4) is None
    assert probe_distance(sampled, states, unit, first=1, steps=0) is None
