"""The bundle's models: temporal U-Net, EDM loss and sampler, dynamics ensemble, early stopping, BC, reward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dydiff_env.config import MLPConfig, SamplerConfig
from dydiff_env.models import (BCPolicy, DynamicsEnsemble, RewardModel, TemporalUNet, TrajectoryDiffusion,
                               edm_sample, edm_sigma_steps)
from dydiff_env.models.mlp import EnsembleMLP
from dydiff_env.training import BestWeights, MetricsLog, RunContext, fit_supervised

OBS, ACT, H = 4, 2, 8


def small_diffusion(seed: int = 0) -> TrajectoryDiffusion:
    torch.manual_seed(seed)
    return TrajectoryDiffusion(OBS, ACT, H, channels=(8, 16), kernel_size=3).eval()


# --------------------------------------------------------------------------------------------- temporal U-Net


def test_unet_output_shape():
    torch.manual_seed(0)
    net = TemporalUNet(OBS + ACT, channels=(8, 16, 32), kernel_size=5)
    x = torch.randn(3, 12, OBS + ACT)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_unet_divisibility_and_channel_errors():
    net = TemporalUNet(OBS + ACT, channels=(8, 16, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 10, OBS + ACT), torch.rand(2))
    with pytest.raises(ValueError, match="divisible"):
        TrajectoryDiffusion(OBS, ACT, horizon=10, channels=(8, 16, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        TemporalUNet(OBS + ACT, channels=(8, 12))


def test_condition_mask():
    mask = small_diffusion().condition_mask()
    assert mask.shape == (H, OBS + ACT) and mask.dtype == torch.bool
    assert mask[0].all()  # first state and first action
    assert mask[:, OBS:].all()  # every action
    assert not mask[1:, :OBS].any()  # later states are free


# ---------------------------------------------------------------------------------------------------- sampler


def test_sigma_steps():
    cfg = SamplerConfig(num_steps=6)
    s = edm_sigma_steps(cfg)
    assert s.shape == (7,)
    assert s[0].item() == pytest.approx(cfg.sigma_max) and s[-2].item() == pytest.approx(cfg.sigma_min)
    assert s[-1].item() == 0.0
    assert (s[1:] < s[:-1]).all()


def _cond_batch(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, H, OBS + ACT, generator=g) * 2 - 1


SAMPLERS = [SamplerConfig(num_steps=5), SamplerConfig(num_steps=5, s_churn=0.0),
            SamplerConfig(num_steps=5, kind="dpmpp_2m"), SamplerConfig(num_steps=5, kind="euler")]
SAMPLER_IDS = ["heun", "heun-deterministic", "dpmpp_2m", "euler"]


@pytest.mark.parametrize("cfg", SAMPLERS, ids=SAMPLER_IDS)
def test_edm_sample_keeps_conditions_bit_exact(cfg):
    model = small_diffusion()
    cond_values = _cond_batch()
    mask = model.condition_mask()
    out = edm_sample(model.denoise, cond_values, mask, cfg, torch.Generator().manual_seed(0))
    assert out.shape == cond_values.shape and torch.isfinite(out).all()
    assert torch.equal(out[:, mask], cond_values[:, mask])
    assert not torch.equal(out[:, ~mask], cond_values[:, ~mask])
    # a per-sample mask (B, H, D) works too
    batch_mask = mask.expand(3, -1, -1).clone()
    batch_mask[1, 1:3, :OBS] = True
    out = edm_sample(model.denoise, cond_values, batch_mask, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out[batch_mask], cond_values[batch_mask])


@pytest.mark.parametrize("cfg", SAMPLERS, ids=SAMPLER_IDS)
def test_edm_sample_reproducible_with_generator_seed(cfg):
    model = small_diffusion()
    cond_values, mask = _cond_batch(), model.condition_mask()
    a = edm_sample(model.denoise, cond_values, mask, cfg, torch.Generator().manual_seed(11))
    b = edm_sample(model.denoise, cond_values, mask, cfg, torch.Generator().manual_seed(11))
    c = edm_sample(model.denoise, cond_values, mask, cfg, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, ~mask], c[:, ~mask])  # the initial noise differs (and churn, for heun)
    assert torch.equal(a[:, mask], c[:, mask])


@pytest.mark.parametrize("cfg", SAMPLERS, ids=SAMPLER_IDS)
def test_edm_sample_with_exact_denoiser_returns_data_point(cfg):
    """For data concentrated on one point c the ideal denoiser is D(x, sigma) = c; the sampler must land on c."""
    cond_values, mask = _cond_batch(), small_diffusion().condition_mask()
    calls = []

    def exact(x, sigma):
        calls.append(float(sigma))
        return torch.full_like(x, 0.3)

    out = edm_sample(exact, cond_values, mask, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, ~mask], torch.full_like(out[:, ~mask], 0.3), atol=1e-5, rtol=0)
    assert torch.equal(out[:, mask], cond_values[:, mask])
    assert len(calls) == cfg.calls_per_sample


def test_multistep_solver_is_second_order():
    """On Gaussian data the denoiser and the ODE's end point are known in closed form: doubling the steps
    divides DPM-Solver++(2M)'s error by about 4 (second order) and Euler's by about 2 (first order)."""
    data_std = 0.5
    cond_values = torch.zeros(2, 4, 3, dtype=torch.float64)
    mask = torch.zeros(4, 3, dtype=torch.bool)

    def gaussian_denoiser(x, sigma):  # E[x0 | x] for x0 ~ N(0, data_std^2)
        return x * data_std ** 2 / (data_std ** 2 + sigma ** 2)

    def error(kind, steps):
        cfg = SamplerConfig(num_steps=steps, kind=kind, sigma_max=10.0)
        start = torch.randn(cond_values.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        start = start * cfg.sigma_max  # the sampler's own first draw
        sigma_min = float(edm_sigma_steps(cfg)[-2])
        # the ODE's exact solution from sigma_max to sigma_min, then the final step to the data prediction
        at_min = start * math.sqrt((data_std ** 2 + sigma_min ** 2) / (data_std ** 2 + cfg.sigma_max ** 2))
        got = edm_sample(gaussian_denoiser, cond_values, mask, cfg, torch.Generator().manual_seed(0))
        return (got - gaussian_denoiser(at_min, sigma_min)).abs().max().item()

    assert error("dpmpp_2m", 16) / error("dpmpp_2m", 32) > 3.5
    assert 1.7 < error("euler", 16) / error("euler", 32) < 2.3
    assert error("dpmpp_2m", 32) < 0.2 * error("euler", 32)


def test_sampler_config_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="kind"):
        SamplerConfig(kind="ddim")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(num_steps=0)
    assert SamplerConfig().calls_per_sample == 67 and SamplerConfig(kind="dpmpp_2m", num_steps=10).calls_per_sample == 10


# ----------------------------------------------------------------------------------------------- diffusion loss


def _manual_loss_terms(model, x0, p_mean, p_std, seed):
    """Re-derive the EDM loss ingredients with the same random draws as `TrajectoryDiffusion.loss`."""
    g = torch.Generator().manual_seed(seed)
    sigma = (p_mean + p_std * torch.randn(x0.shape[0], generator=g)).exp()
    noise = torch.randn(x0.shape, generator=g)
    cond = model.condition_mask()
    s = sigma[:, None, None]
    x_noisy = torch.where(cond, x0, x0 + s * noise)
    weight = (s ** 2 + model.sigma_data ** 2) / (s * model.sigma_data) ** 2
    per_entry = weight * (model.denoise(x_noisy, sigma) - x0).pow(2)
    return sigma, x_noisy, per_entry, cond


def test_diffusion_loss_equals_manual_loss_on_one_valid_row():
    model = small_diffusion()
    x0 = _cond_batch(3, seed=1)
    valid = torch.zeros(3, H, dtype=torch.bool)
    valid[1, 5] = True
    loss = model.loss(x0, valid, -1.2, 1.2, torch.Generator().manual_seed(7))
    _, _, per_entry, cond = _manual_loss_terms(model, x0, -1.2, 1.2, seed=7)
    manual = per_entry[1, 5][~cond[5]].mean()  # row 5: its states are free, its actions conditioned
    torch.testing.assert_close(loss, manual)
    # a full mask is the mean over every free entry of every row
    full = model.loss(x0, torch.ones(3, H, dtype=torch.bool), -1.2, 1.2, torch.Generator().manual_seed(7))
    torch.testing.assert_close(full, per_entry[:, ~cond].mean())


def test_diffusion_loss_zero_when_only_conditioned_entries_are_valid():
    model = small_diffusion()
    valid = torch.zeros(2, H, dtype=torch.bool)
    valid[:, 0] = True  # row 0 is all conditioned (first state + action)
    loss = model.loss(_cond_batch(2), valid, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0


class _Perturb(nn.Module):
    """Adds a large offset to the wrapped network's output on the given entries, and records its input."""

    def __init__(self, net, where):
        super().__init__()
        self.net, self.where, self.inputs = net, where, []

    def forward(self, x, noise_label):
        self.inputs.append(x.detach().clone())
        return self.net(x, noise_label) + 1000.0 * self.where


def test_diffusion_loss_ignores_conditioned_entries_and_padding():
    model = small_diffusion()
    x0 = _cond_batch(3, seed=2)
    valid = torch.ones(3, H, dtype=torch.bool)
    valid[0, 5:] = False
    valid[2, 2:] = False
    reference = model.loss(x0, valid, generator=torch.Generator().manual_seed(3))
    cond = model.condition_mask()
    ignored = (cond[None] | ~valid[:, :, None]).float()
    original_net = model.net
    model.net = _Perturb(original_net, ignored)
    perturbed = model.loss(x0, valid, generator=torch.Generator().manual_seed(3))
    model.net = original_net
    torch.testing.assert_close(perturbed, reference)
    # ...while perturbing a counted entry changes it
    model.net = _Perturb(original_net, 1.0 - ignored)
    assert model.loss(x0, valid, generator=torch.Generator().manual_seed(3)).item() > 10 * reference.item()
    model.net = original_net


def test_diffusion_loss_feeds_clean_conditions_to_the_network():
    model = small_diffusion()
    x0 = _cond_batch(3, seed=4)
    spy = _Perturb(model.net, torch.zeros(()))
    model.net = spy
    model.loss(x0, torch.ones(3, H, dtype=torch.bool), generator=torch.Generator().manual_seed(5))
    sigma, x_noisy, _, cond = _manual_loss_terms(model, x0, -1.2, 1.2, seed=5)
    c_in = 1.0 / (sigma ** 2 + model.sigma_data ** 2).sqrt()
    seen = spy.inputs[0] / c_in[:, None, None]
    torch.testing.assert_close(seen[:, cond], x0[:, cond])  # conditions clean
    assert not torch.allclose(seen[:, ~cond], x0[:, ~cond])  # free entries noised


def test_diffusion_loss_action_noise_jitters_only_the_conditioned_actions():
    model = small_diffusion()
    x0 = _cond_batch(64, seed=4)
    spy = _Perturb(model.net, torch.zeros(()))
    model.net = spy
    model.loss(x0, torch.ones(64, H, dtype=torch.bool), generator=torch.Generator().manual_seed(5), action_noise=0.2)
    sigma, x_noisy, _, cond = _manual_loss_terms(model, x0, -1.2, 1.2, seed=5)  # the same draws come first
    c_in = 1.0 / (sigma ** 2 + model.sigma_data ** 2).sqrt()
    seen = spy.inputs[0] / c_in[:, None, None]
    torch.testing.assert_close(seen[:, 0, :OBS], x0[:, 0, :OBS])  # the first state stays clean
    torch.testing.assert_close(seen[:, ~cond], x_noisy[:, ~cond])  # free entries as without the option
    jitter = seen[..., OBS:] - x0[..., OBS:]
    assert jitter.std().item() == pytest.approx(0.2, rel=0.05) and abs(jitter.mean().item()) < 0.01


def test_diffusion_loss_backward_finite():
    model = small_diffusion().train()
    loss = model.loss(_cond_batch(4), torch.ones(4, H, dtype=torch.bool), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------- dynamics ensemble


def _dynamics(seed=0):
    torch.manual_seed(seed)
    model = DynamicsEnsemble(OBS, ACT, ensemble_size=4, num_elites=2, hidden=(16, 16))
    model.set_normalization(torch.zeros(OBS + ACT), torch.ones(OBS + ACT), torch.full((OBS,), 0.1),
                            torch.full((OBS,), 2.0))
    return model.eval()


def test_dynamics_shapes_and_loss():
    model = _dynamics()
    obs, act = torch.randn(10, OBS), torch.rand(10, ACT) * 2 - 1
    mean, logvar = model.forward_normalized(obs, act)
    assert mean.shape == logvar.shape == (4, 10, OBS)
    assert (logvar <= model.max_logvar + 1e-6).all() and (logvar >= model.min_logvar - 1e-6).all()
    # one bootstrap batch per member
    mean3, _ = model.forward_normalized(torch.randn(4, 6, OBS), torch.randn(4, 6, ACT))
    assert mean3.shape == (4, 6, OBS)
    loss = model.loss(torch.randn(4, 6, OBS), torch.randn(4, 6, ACT), torch.randn(4, 6, OBS), (1e-4, 1e-4, 1e-4))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    with pytest.raises(ValueError, match="weight decays"):
        model.loss(torch.randn(4, 6, OBS), torch.randn(4, 6, ACT), torch.randn(4, 6, OBS), (1e-4,))
    assert model.holdout_mse(obs, act, obs + 0.1).shape == (4,)
    with pytest.raises(ValueError, match="num_elites"):
        DynamicsEnsemble(OBS, ACT, ensemble_size=3, num_elites=4)


def test_dynamics_elites():
    model = _dynamics()
    model.set_elites(np.array([0.3, 0.1, 0.5, 0.2]))
    assert model.elites.tolist() == [1, 3]
    obs, act = torch.randn(5, OBS), torch.randn(5, ACT)
    means, stds = model.member_predictions(obs, act)
    assert means.shape == stds.shape == (2, 5, OBS)
    assert (stds > 0).all()
    raw_mean, raw_logvar = model.forward_normalized(obs, act)
    torch.testing.assert_close(means[0], obs + raw_mean[1] * model.delta_std + model.delta_mean)
    torch.testing.assert_close(stds[1], torch.exp(0.5 * raw_logvar[3]) * model.delta_std)


def test_dynamics_predict_modes():
    model = _dynamics()
    model.set_elites(np.array([0.3, 0.1, 0.5, 0.2]))
    obs, act = torch.randn(64, OBS), torch.randn(64, ACT)
    means, _ = model.member_predictions(obs, act)

    nxt, disagreement = model.predict(obs, act, mode="mean")
    assert nxt.shape == (64, OBS) and disagreement.shape == (64,)
    torch.testing.assert_close(nxt, means.mean(0))
    assert (disagreement >= 0).all()
    torch.testing.assert_close(disagreement, (means.std(0, unbiased=False) / model.delta_std).max(-1).values)

    nxt, _ = model.predict(obs, act, mode="elite_mean", generator=torch.Generator().manual_seed(0))
    same_as = [(nxt == means[e]).all(-1) for e in range(2)]
    assert (same_as[0] | same_as[1]).all()  # each sample is one elite's mean
    assert same_as[0].any() and same_as[1].any()  # both elites are used
    again, _ = model.predict(obs, act, mode="elite_mean", generator=torch.Generator().manual_seed(0))
    assert torch.equal(nxt, again)

    s1, _ = model.predict(obs, act, mode="sample", generator=torch.Generator().manual_seed(1))
    s2, _ = model.predict(obs, act, mode="sample", generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and torch.isfinite(s1).all()
    assert not ((s1 == means[0]).all(-1) | (s1 == means[1]).all(-1)).any()

    with pytest.raises(ValueError, match="unknown prediction mode"):
        model.predict(obs, act, mode="median")


# ------------------------------------------------------------------------------------- early stopping (best weights)


def _fit_context(tmp_path):
    ctx = RunContext(out_dir=tmp_path, device=torch.device("cpu"), seed=0, checkpoint_every_s=1e9, progress=False)
    return ctx, MetricsLog(tmp_path / "metrics.csv")


def test_member_variance_is_the_biased_variance_over_members():
    means = torch.randn(5, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(DynamicsEnsemble.member_variance(means), means.var(0, unbiased=False))


def test_bfloat16_serving_equals_autocast_and_follows_weight_updates():
    """The ensemble serves bf16 by casting its (kept) weights: bit for bit what autocast computes, without
    casting the weights again at every call; a weight update is seen."""
    torch.manual_seed(0)
    model = DynamicsEnsemble(4, 2, ensemble_size=5, num_elites=3, hidden=(16, 16))
    model.set_elites(torch.tensor([0.3, 0.1, 0.5, 0.2, 0.4]))
    obs, act = torch.randn(6, 4), torch.randn(6, 2)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model.forward_normalized(obs, act, model.elites)
        model.precision = "bfloat16"
        got = model.forward_normalized(obs, act, model.elites)
        for e, g in zip(expected, got):
            assert g.dtype == torch.float32 and torch.equal(g, e)
        model.net.layers[1].weight.add_(0.5)
        moved = model.forward_normalized(obs, act, model.elites)[0]
        model.precision = "float32"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(moved, model.forward_normalized(obs, act, model.elites)[0])
        assert not torch.equal(moved, got[0])


def test_elite_predictions_use_only_the_elites_and_follow_weight_updates():
    torch.manual_seed(0)
    model = DynamicsEnsemble(4, 2, ensemble_size=5, num_elites=3, hidden=(16, 16))
    model.set_elites(torch.tensor([0.3, 0.1, 0.5, 0.2, 0.4]))  # elites 1, 3, 0
    obs, act = torch.randn(6, 4), torch.randn(6, 2)

    def selected_from_all_members():
        mean, logvar = model.forward_normalized(obs, act)
        return mean[model.elites], logvar[model.elites]

    with torch.no_grad():
        for expected, got in zip(selected_from_all_members(), model.forward_normalized(obs, act, model.elites)):
            torch.testing.assert_close(got, expected)
        before = model.member_predictions(obs, act)[0].clone()
        model.net.layers[0].weight.add_(0.5)  # a weight update: the gathered copy must not be reused
        after = model.member_predictions(obs, act)[0]
        assert not torch.allclose(before, after)
        torch.testing.assert_close(model.forward_normalized(obs, act, model.elites)[0], selected_from_all_members()[0])
    mean, _ = model.forward_normalized(obs, act, model.elites)  # with autograd: gradients reach the parameters
    mean.sum().backward()
    assert model.net.layers[0].weight.grad is not None and model.net.layers[0].weight.grad[1].abs().sum() > 0
    assert model.net.layers[0].weight.grad[2].abs().sum() == 0  # member 2 is no elite


def test_fit_supervised_restores_best_epoch_weights(tmp_path):
    torch.manual_seed(0)
    model = RewardModel(OBS, ACT, hidden=(8,))
    obs, act, rew = torch.randn(200, OBS), torch.randn(200, ACT), torch.randn(200)
    snapshots = []

    def holdout_loss():  # gets worse after epoch 1
        snapshots.append({k: p.detach().clone() for k, p in model.named_parameters()})
        return torch.tensor([float(len(snapshots))])

    cfg = MLPConfig(hidden=(8,), batch_size=16, max_epochs=10, patience=2, steps_per_epoch=5)
    ctx, metrics = _fit_context(tmp_path)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    summary = fit_supervised("reward", model, 1, lambda idx: model.loss(obs[idx[0]], act[idx[0]], rew[idx[0]]),
                             holdout_loss, np.arange(200), cfg, optimizer, ctx, metrics)
    assert summary["epochs"] == 3 and len(snapshots) == 3  # 1 improvement, then `patience` stale epochs
    assert summary["holdout_loss"] == [1.0]
    for k, p in model.named_parameters():
        assert torch.equal(p, snapshots[0][k]), k
    assert any(not torch.equal(snapshots[0][k], snapshots[-1][k]) for k in snapshots[0])  # training did move them


def test_fit_supervised_restores_each_members_best(tmp_path):
    torch.manual_seed(0)
    members = 3
    model = EnsembleMLP(members, OBS, 1, (8,))
    x, y = torch.randn(100, OBS), torch.randn(100, 1)
    schedule = [[1, 5, 5], [2, 1, 5], [3, 2, 1], [4, 3, 2], [5, 4, 3], [6, 5, 4]]
    snapshots = []

    def holdout_loss():
        snapshots.append({k: p.detach().clone() for k, p in model.named_parameters()})
        return torch.tensor(schedule[len(snapshots) - 1], dtype=torch.float32)

    cfg = MLPConfig(batch_size=8, max_epochs=6, patience=2, steps_per_epoch=3)
    ctx, metrics = _fit_context(tmp_path)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    summary = fit_supervised("ens", model, members, lambda idx: (model(x[idx]) - y[idx]).pow(2).mean(), holdout_loss,
                             np.arange(100), cfg, optimizer, ctx, metrics)
    assert summary["epochs"] == 5
    assert summary["holdout_loss"] == [1.0, 1.0, 1.0]
    for member, best_epoch in enumerate([0, 1, 2]):
        for k, p in model.named_parameters():
            assert torch.equal(p[member], snapshots[best_epoch][k][member]), (member, k)
    assert ctx.checkpoint_path("ens").is_file()  # final checkpoint written


def test_best_weights_requires_member_dimension():
    with pytest.raises(ValueError, match="leading member dimension"):
        BestWeights(nn.Linear(3, 2), members=5)
    model = EnsembleMLP(2, 3, 1, (4,))
    best = BestWeights(model, 2)
    assert best.update(model, np.array([1.0, np.nan]))  # NaN never counts as an improvement
    assert np.isinf(best.best_loss[1])
    assert best.update(model, np.array([0.995, 2.0]))  # member 1's first finite loss counts
    assert best.best_loss.tolist() == [1.0, 2.0]  # member 0: less than 1 % better is no improvement
    assert not best.update(model, np.array([1.5, 2.5]))


# ------------------------------------------------------------------------------------------------- BC, reward


def test_bc_policy_loss_and_actions():
    torch.manual_seed(0)
    policy = BCPolicy(OBS, ACT, hidden=(16, 16))
    policy.set_normalization(torch.full((OBS,), 0.5), torch.full((OBS,), 2.0))
    obs = torch.randn(32, OBS)
    act = torch.rand(32, ACT) * 2 - 1
    act[0] = 1.0  # saturated actions (clipped datasets) stay finite
    act[1] = -1.0
    loss = policy.loss(obs, act)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    extreme = torch.cat([obs, 1e3 * torch.randn(8, OBS)])
    for deterministic in (False, True):
        a = policy.act(extreme, deterministic=deterministic, generator=torch.Generator().manual_seed(0))
        assert a.shape == (40, ACT)
        assert torch.isfinite(a).all() and (a.abs() <= 1).all()
    a1 = policy.act(obs, generator=torch.Generator().manual_seed(3))
    a2 = policy.act(obs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, policy.act(obs, deterministic=True))
    assert policy.act(torch.randn(5, 7, OBS)).shape == (5, 7, ACT)
    assert policy.holdout_mse(obs, act).shape == (1,)


def test_reward_model_shapes_and_normalization():
    torch.manual_seed(0)
    model = RewardModel(OBS, ACT, hidden=(16,))
    obs, act = torch.randn(10, OBS), torch.randn(10, ACT)
    assert model(obs, act).shape == (10,)
    assert model(torch.randn(3, 10, OBS), torch.randn(3, 10, ACT)).shape == (3, 10)
    base = model.forward_normalized(obs, act)
    model.set_normalization(torch.zeros(OBS + ACT), torch.ones(OBS + ACT), 2.0, 3.0)
    torch.testing.assert_close(model(obs, act), base * 3.0 + 2.0)
    loss = model.loss(obs, act, torch.randn(10))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model.holdout_mse(obs, act, torch.randn(10)).shape == (1,)
