"""Trajectory diffusion: an EDM-preconditioned temporal U-Net over windows of (state, action) rows.

Shapes: a trajectory is x (B, H, D) with D = obs_dim + act_dim, every feature min-max scaled to [-1, 1].
Conditioning is by inpainting: `cond_mask` (H, D) marks the entries that are given (the first state and
every action); the model always sees their clean values and only the other entries are noised.

Fixes to the reference implementation, on purpose:
- the loss is masked: conditioned entries and window padding carry no loss;
- training writes the clean conditions into the noisy input exactly as the sampler does, so training and
  sampling see the same inputs;
- the sampler's churn noise never touches conditioned entries, which are re-imposed after every update
  and therefore come out bit-exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import SamplerConfig
from .precision import network_precision

# --------------------------------------------------------------------------------------------- temporal U-Net


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1))
        angles = t[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ConvBlock(nn.Sequential):
    """Conv1d -> GroupNorm(8) -> Mish, length preserving."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__(nn.Conv1d(cin, cout, kernel_size, padding=kernel_size // 2), nn.GroupNorm(8, cout), nn.Mish())


class ResidualBlock(nn.Module):
    """Two conv blocks with the noise embedding added in between (Decision-Diffuser's residual block)."""

    def __init__(self, cin: int, cout: int, embed_dim: int, kernel_size: int):
        super().__init__()
        self.block1, self.block2 = ConvBlock(cin, cout, kernel_size), ConvBlock(cout, cout, kernel_size)
        self.embed = nn.Sequential(nn.Mish(), nn.Linear(embed_dim, cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.embed(emb)[:, :, None]
        return self.block2(h) + self.skip(x)


def window_multiple(channels: tuple[int, ...]) -> int:
    """The U-Net halves the window once per resolution after the first: windows are multiples of this."""
    return 2 ** (len(channels) - 1)


class TemporalUNet(nn.Module):
    """1-D U-Net over the horizon. `channels` gives the width at each resolution; the horizon is halved
    len(channels) - 1 times, so it must be divisible by 2 ** (len(channels) - 1)."""

    def __init__(self, transition_dim: int, channels: tuple[int, ...] = (64, 128, 256), kernel_size: int = 5):
        super().__init__()
        if any(c % 8 for c in channels):
            raise ValueError(f"U-Net channels must be multiples of 8 (GroupNorm(8)), got {channels}")
        self.channels = tuple(channels)
        embed_dim = channels[0]
        self.noise_embed = nn.Sequential(SinusoidalEmbedding(embed_dim), nn.Linear(embed_dim, 4 * embed_dim), nn.Mish(),
                                         nn.Linear(4 * embed_dim, embed_dim))
        widths = [transition_dim, *channels]
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(channels) - 1
            self.down.append(nn.ModuleList([
                ResidualBlock(cin, cout, embed_dim, kernel_size), ResidualBlock(cout, cout, embed_dim, kernel_size),
                nn.Conv1d(cout, cout, 3, stride=2, padding=1) if not last else nn.Identity()]))
        mid = channels[-1]
        self.mid1 = ResidualBlock(mid, mid, embed_dim, kernel_size)
        self.mid2 = ResidualBlock(mid, mid, embed_dim, kernel_size)
        self.up = nn.ModuleList()
        for cout, cin in reversed(list(zip(channels[:-1], channels[1:]))):
            self.up.append(nn.ModuleList([
                nn.ConvTranspose1d(cin, cin, 4, stride=2, padding=1),
                ResidualBlock(cin + cout, cout, embed_dim, kernel_size), ResidualBlock(cout, cout, embed_dim, kernel_size)]))
        self.final = nn.Sequential(ConvBlock(channels[0], channels[0], kernel_size), nn.Conv1d(channels[0], transition_dim, 1))

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        """x (B, H, D), noise_label (B,) -> (B, H, D)."""
        factor = window_multiple(self.channels)
        if x.shape[1] % factor:
            raise ValueError(f"horizon {x.shape[1]} must be divisible by {factor} for U-Net channels {self.channels}")
        emb = self.noise_embed(noise_label)
        h = x.transpose(1, 2)
        skips = []
        for block1, block2, downsample in self.down:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = downsample(h)
        h = self.mid2(self.mid1(h, emb), emb)
        skips.pop()  # the deepest level feeds the middle blocks directly
        for upsample, block1, block2 in self.up:
            h = upsample(h)
            h = block2(block1(torch.cat([h, skips.pop()], dim=1), emb), emb)
        return self.final(h).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- EDM wrapper


class TrajectoryDiffusion(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a temporal U-Net."""

    precision = "float32"  # of the U-Net's forward pass when serving (`models.precision`)

    def __init__(self, obs_dim: int, act_dim: int, horizon: int, channels: tuple[int, ...] = (64, 128, 256),
                 kernel_size: int = 5, sigma_data: float = 0.5):
        super().__init__()
        self.obs_dim, self.act_dim, self.horizon, self.sigma_data = obs_dim, act_dim, horizon, sigma_data
        self.net = TemporalUNet(obs_dim + act_dim, channels, kernel_size)
        factor = window_multiple(channels)
        if horizon % factor:
            raise ValueError(f"horizon {horizon} must be divisible by {factor} for U-Net channels {tuple(channels)}")

    def condition_mask(self, horizon: int | None = None, device=None) -> torch.Tensor:
        """(H, D) bool: True on the first state and on every action."""
        mask = torch.zeros(horizon or self.horizon, self.obs_dim + self.act_dim, dtype=torch.bool, device=device)
        mask[0, : self.obs_dim] = True
        mask[:, self.obs_dim :] = True
        return mask

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), sigma of shape (B,) or scalar."""
        sigma = sigma.reshape(-1).expand(x.shape[0]).to(x.dtype)
        s = sigma[:, None, None]
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1.0 / (s ** 2 + sd2).sqrt()
        with network_precision(self.precision, x.device):
            out = self.net(c_in * x, sigma.log() / 4)
        return c_skip * x + c_out * out.to(x.dtype)

    def loss(self, x0: torch.Tensor, valid: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2,
             generator: torch.Generator | None = None, action_noise: float = 0.0) -> torch.Tensor:
        """EDM loss on the free entries of real rows. x0 (B, H, D) in [-1, 1] units, valid (B, H) bool.
        `action_noise`: std of Gaussian noise on the conditioned actions (the targets stay x0)."""
        batch = x0.shape[0]
        ln_sigma = p_mean + p_std * torch.randn(batch, generator=generator)
        sigma = ln_sigma.exp().to(x0.device)
        s = sigma[:, None, None]
        weight = (s ** 2 + self.sigma_data ** 2) / (s * self.sigma_data) ** 2
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        cond = self.condition_mask(x0.shape[1], x0.device)
        given = x0
        if action_noise > 0:
            jitter = torch.randn(x0[..., self.obs_dim:].shape, generator=generator).to(x0.device)
            given = torch.cat([x0[..., :self.obs_dim], x0[..., self.obs_dim:] + action_noise * jitter], -1)
        x_noisy = torch.where(cond, given, x0 + s * noise)
        denoised = self.denoise(x_noisy, sigma)
        loss_mask = (~cond)[None] & valid[:, :, None]
        per_entry = weight * (denoised - x0).pow(2)
        return (per_entry * loss_mask).sum() / loss_mask.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------- sampler


def edm_sigma_steps(config: SamplerConfig, device=None) -> torch.Tensor:
    """Karras noise levels sigma_max -> sigma_min (rho spacing) followed by 0: (num_steps + 1,)."""
    n = config.num_steps
    i = torch.arange(n, dtype=torch.float64)
    inv_rho = 1.0 / config.rho
    steps = (config.sigma_max ** inv_rho + i / max(n - 1, 1) * (config.sigma_min ** inv_rho - config.sigma_max ** inv_rho)) ** config.rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64)]).to(device)


def noise_and_conditions(cond_values: torch.Tensor, cond_mask: torch.Tensor, generator: torch.Generator | None):
    """The two things every sampler needs: fresh noise shaped like the window (drawn on the CPU from `generator`, so
    results do not depend on the device) and a function writing the given entries back into a window."""

    def randn():
        return torch.randn(cond_values.shape, generator=generator, dtype=cond_values.dtype).to(cond_values.device)

    def impose(x):
        return torch.where(cond_mask, cond_values, x)

    return randn, impose


def grid_sigmas(config: SamplerConfig, indices: list[int]) -> list[float]:
    """The noise levels of `config`'s grid (`edm_sigma_steps`) at `indices`: where a distilled student is called
    or trained on its teacher's grid."""
    grid = edm_sigma_steps(config)
    return [float(grid[i]) for i in indices]


@torch.no_grad()
def edm_sample(denoise, cond_values: torch.Tensor, cond_mask: torch.Tensor, config: SamplerConfig = SamplerConfig(),
               generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Sample with inpainting: `config.kind` picks the solver (see `SamplerConfig`).

    denoise(x, sigma) -> x0 estimate; cond_values (B, H, D) holds the given entries (others ignored),
    cond_mask (H, D) or (B, H, D) marks them. Every solver keeps the conditioned entries clean, as training
    does, and re-imposes them after every update, so they come out equal to cond_values exactly. Noise comes
    from `generator` (on the CPU, so results do not depend on the device). `trajectory`, when a list, gets x
    at every noise level of `edm_sigma_steps(config)` (num_steps + 1 tensors, the last one the sample): the
    regression targets of the distilled student (deterministic solvers only, so that the points lie on one
    ODE trajectory).
    """
    if config.kind == "student":
        raise ValueError("sampler kind 'student' samples with a bundle's distilled student, not with this model: "
                         "pass it to dydiff_rollout (or call student_sample with the bundle's student)")
    device, dtype = cond_values.device, cond_values.dtype
    randn, impose = noise_and_conditions(cond_values, cond_mask, generator)

    def denoised(x, sigma: float):
        return denoise(x, torch.tensor(sigma, dtype=dtype, device=device))

    record = trajectory.append if trajectory is not None else (lambda x: None)
    sigmas = [float(s) for s in edm_sigma_steps(config, device)]
    x = impose(randn() * sigmas[0])
    record(x)
    if config.kind == "dpmpp_2m":
        return _dpmpp_2m(x, sigmas, denoised, impose, record)
    if config.kind == "euler":
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = impose(x + (sigma_next - sigma) * (x - denoised(x, sigma)) / sigma)
            record(x)
        return x
    if trajectory is not None and config.s_churn > 0:
        raise ValueError("a trajectory is recorded only for deterministic solvers; use s_churn=0 with kind 'heun'")
    return _stochastic_heun(x, sigmas, denoised, impose, randn, config, record)


def _stochastic_heun(x, sigmas, denoised, impose, randn, config: SamplerConfig, record) -> torch.Tensor:
    """EDM Algorithm 2: churn (raise the noise level of the free entries), Euler step, Heun correction."""
    gamma_max = min(config.s_churn / config.num_steps, math.sqrt(2.0) - 1.0)
    for i in range(config.num_steps):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if config.s_min <= sigma_cur <= config.s_max else 0.0
        sigma_hat = sigma_cur + gamma * sigma_cur
        if gamma > 0:  # churn: raise the noise level of the free entries only
            x = impose(x + math.sqrt(sigma_hat ** 2 - sigma_cur ** 2) * config.s_noise * randn())
        slope = (x - denoised(x, sigma_hat)) / sigma_hat
        x_next = impose(x + (sigma_next - sigma_hat) * slope)
        if i < config.num_steps - 1:  # Heun correction (skipped on the final step to sigma = 0)
            slope_next = (x_next - denoised(x_next, sigma_next)) / sigma_next
            x_next = impose(x + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next))
        x = x_next
        record(x)
    return x


def _dpmpp_2m(x, sigmas, denoised, impose, record) -> torch.Tensor:
    """DPM-Solver++(2M) in EDM's parameterisation (x = data + sigma * noise, log-SNR time t = -log sigma):
    each step moves x exactly along the linear part of the ODE and integrates the data prediction with a
    second-order multistep correction from the previous step's prediction."""
    previous = None  # (data prediction, its step size in t)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = denoised(x, sigma)
        if sigma_next == 0:  # the last step lands on the data prediction
            x = impose(x0)
            record(x)
            return x
        h = math.log(sigma) - math.log(sigma_next)
        estimate = x0
        if previous is not None:
            ratio = previous[1] / h
            estimate = (1 + 1 / (2 * ratio)) * x0 - (1 / (2 * ratio)) * previous[0]
        x = impose((sigma_next / sigma) * x - math.expm1(-h) * estimate)
        record(x)
        previous = (x0, h)
    return x


@torch.no_grad()
def student_sample(denoise, cond_values: torch.Tensor, cond_mask: torch.Tensor, sigmas: list[float],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step sampling with a distilled student (consistency models' multistep sampler, Song et al. 2023,
    arXiv 2303.01469, Algorithm 1), with inpainting.

    sigmas: the student's noise levels, highest first (`DistillConfig.student_sigma_indices` on the teacher's
    grid); one denoiser call each. The student maps x at sigma_i straight to the teacher's final sample; before
    the next call its estimate is noised afresh to sigma_{i+1}. Conditions are imposed after every update
    (bit-exact), noise comes from `generator` on the CPU as in `edm_sample`.
    """
    device, dtype = cond_values.device, cond_values.dtype
    randn, impose = noise_and_conditions(cond_values, cond_mask, generator)
    x = impose(randn() * sigmas[0])
    for i, sigma in enumerate(sigmas):
        estimate = impose(denoise(x, torch.tensor(sigma, dtype=dtype, device=device)))
        if i < len(sigmas) - 1:
            x = impose(estimate + sigmas[i + 1] * randn())
    return estimate
