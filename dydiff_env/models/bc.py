"""Behaviour cloning: a tanh-Gaussian policy fitted to the dataset's actions by maximum likelihood.

It is the bundle's default planning policy. It is stochastic on purpose: the diffusion model was trained on
the stochastic actions of the dataset, and smooth deterministic (mean) action sequences are out of its
distribution (measured: several times the error). `act(..., deterministic=True)` gives the mean action.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .mlp import EnsembleMLP

LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0
_EPS = 1e-6


class BCPolicy(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.net = EnsembleMLP(1, obs_dim, 2 * act_dim, hidden, nn.ReLU)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def set_normalization(self, obs_mean, obs_std) -> None:
        self.obs_mean.copy_(torch.as_tensor(obs_mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(obs_std, dtype=torch.float32))

    def distribution(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (obs - self.obs_mean) / self.obs_std
        out = self.net(x.reshape(1, -1, self.obs_dim)).reshape(*obs.shape[:-1], 2 * self.act_dim)
        mean, log_std = out.split(self.act_dim, -1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def loss(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of the dataset actions under the tanh-Gaussian (change of variables)."""
        mean, log_std = self.distribution(obs)
        act = act.clamp(-1 + 1e-4, 1 - 1e-4)
        pre_tanh = torch.atanh(act)
        gauss = -0.5 * ((pre_tanh - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = gauss - torch.log(1 - act.pow(2) + _EPS)
        return -log_prob.sum(-1).mean()

    @torch.no_grad()
    def holdout_mse(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """MSE of the mean action, shape (1,)."""
        return (self.act(obs, deterministic=True) - act).pow(2).mean().reshape(1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, log_std = self.distribution(obs)
        if deterministic:
            return torch.tanh(mean)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return torch.tanh(mean + log_std.exp() * noise)
