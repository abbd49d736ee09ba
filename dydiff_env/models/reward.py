"""Reward model r(s, a): an MLP on z-scored inputs predicting the z-scored reward, trained with MSE."""

from __future__ import annotations

import torch
from torch import nn

from .mlp import EnsembleMLP
from .precision import network_precision


class RewardModel(nn.Module):
    precision = "float32"  # of the MLP's forward pass when serving (`models.precision`)

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.net = EnsembleMLP(1, obs_dim + act_dim, 1, hidden, nn.ReLU)
        self.register_buffer("in_mean", torch.zeros(obs_dim + act_dim))
        self.register_buffer("in_std", torch.ones(obs_dim + act_dim))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    def set_normalization(self, in_mean, in_std, reward_mean, reward_std) -> None:
        for name, value in (("in_mean", in_mean), ("in_std", in_std), ("reward_mean", reward_mean), ("reward_std", reward_std)):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def forward_normalized(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = (torch.cat([obs, act], -1) - self.in_mean) / self.in_std
        with network_precision(self.precision, x.device):
            out = self.net(x.reshape(1, -1, x.shape[-1]))
        return out.to(x.dtype).reshape(x.shape[:-1])

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Predicted reward for any leading batch shape: (..., obs), (..., act) -> (...)."""
        return self.forward_normalized(obs, act) * self.reward_std + self.reward_mean

    def loss(self, obs, act, reward) -> torch.Tensor:
        return (self.forward_normalized(obs, act) - (reward - self.reward_mean) / self.reward_std).pow(2).mean()

    @torch.no_grad()
    def holdout_mse(self, obs, act, reward) -> torch.Tensor:
        """MSE in raw reward units, shape (1,) (one member)."""
        return (self(obs, act) - reward).pow(2).mean().reshape(1)
