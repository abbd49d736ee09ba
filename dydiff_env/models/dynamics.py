"""Single-step dynamics: a probabilistic Gaussian ensemble s' = s + delta, delta ~ N(mu(s, a), var(s, a)).

Inputs are z-scored (state and action statistics of the dataset), targets are z-scored state changes.
The log-variance is soft-bounded between *learned* limits (the reference fixed them). Members are ranked
by holdout error; the `num_elites` best serve predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import EnsembleMLP


class DynamicsEnsemble(nn.Module):
    precision = "float32"  # of the members' forward pass when serving (`models.precision`)

    def __init__(self, obs_dim: int, act_dim: int, ensemble_size: int = 7, num_elites: int = 5,
                 hidden: tuple[int, ...] = (200, 200, 200, 200)):
        super().__init__()
        if not 1 <= num_elites <= ensemble_size:
            raise ValueError(f"num_elites must be in [1, ensemble_size={ensemble_size}], got {num_elites}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.net = EnsembleMLP(ensemble_size, obs_dim + act_dim, 2 * obs_dim, hidden, nn.SiLU)
        self.max_logvar = nn.Parameter(torch.full((ensemble_size, 1, obs_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((ensemble_size, 1, obs_dim), -10.0))
        # normalisation statistics and elite indices are buffers: saved with the weights, never trained
        for name, dim in (("in_mean", obs_dim + act_dim), ("in_std", obs_dim + act_dim), ("delta_mean", obs_dim), ("delta_std", obs_dim)):
            self.register_buffer(name, torch.zeros(dim) if "mean" in name else torch.ones(dim))
        self.register_buffer("elites", torch.arange(num_elites))
        self.ensemble_size, self.num_elites = ensemble_size, num_elites

    def set_normalization(self, in_mean, in_std, delta_mean, delta_std) -> None:
        for name, value in (("in_mean", in_mean), ("in_std", in_std), ("delta_mean", delta_mean), ("delta_std", delta_std)):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def forward_normalized(self, obs: torch.Tensor, act: torch.Tensor,
                           members: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member mean and log-variance of the z-scored state change: (K, B, obs) each (K: every member, or
        only `members`)."""
        x = (torch.cat([obs, act], -1) - self.in_mean) / self.in_std
        # bf16 by casting (as autocast would, bit for bit) with the cast weights kept between calls
        out = self.net(x, members, dtype=torch.bfloat16 if self.precision == "bfloat16" else None)
        mean, logvar = out.to(x.dtype).split(self.obs_dim, -1)
        max_logvar = self.max_logvar if members is None else self.max_logvar[members]
        min_logvar = self.min_logvar if members is None else self.min_logvar[members]
        logvar = max_logvar - F.softplus(max_logvar - logvar)
        logvar = min_logvar + F.softplus(logvar - min_logvar)
        return mean, logvar

    def loss(self, obs, act, next_obs, weight_decay: tuple[float, ...]) -> torch.Tensor:
        """Gaussian NLL per member (inputs of shape (K, B, .), one bootstrap batch per member) plus the
        log-variance bound penalty and per-layer weight decay."""
        target = (next_obs - obs - self.delta_mean) / self.delta_std
        mean, logvar = self.forward_normalized(obs, act)
        nll = ((mean - target).pow(2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
        bound = 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())
        return nll + bound + self.net.weight_penalty(weight_decay)

    @torch.no_grad()
    def holdout_mse(self, obs, act, next_obs) -> torch.Tensor:
        """Per-member MSE of the mean z-scored state change on a holdout set: (K,)."""
        target = (next_obs - obs - self.delta_mean) / self.delta_std
        mean, _ = self.forward_normalized(obs, act)
        return (mean - target).pow(2).mean(dim=(1, 2))

    def set_elites(self, holdout_errors) -> None:
        order = torch.argsort(torch.as_tensor(holdout_errors))[: self.num_elites]
        self.elites.copy_(order)

    def member_predictions(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Elite members' predicted next-state means and stds in raw units: (E, B, obs) each."""
        mean, logvar = self.forward_normalized(obs, act, members=self.elites)  # non-elites are never used
        next_mean = obs + mean * self.delta_std + self.delta_mean
        std = torch.exp(0.5 * logvar) * self.delta_std
        return next_mean, std

    def predict(self, obs: torch.Tensor, act: torch.Tensor, mode: str = "elite_mean",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next states (B, obs) and ensemble disagreement (B,).

        mode: "mean" - average of the elites' means (smooth, deterministic);
              "elite_mean" - the mean of one random elite per sample (the reference's rollout rule);
              "sample" - a draw from one random elite's Gaussian.
        Disagreement is the largest per-dimension std of the elites' means, in dataset-std units of the
        state change (MOPO/MOBILE-style uncertainty).
        """
        means, stds = self.member_predictions(obs, act)
        disagreement = (self.member_variance(means).sqrt() / self.delta_std).max(-1).values
        return self.next_from_members(means, stds, mode, generator), disagreement

    @staticmethod
    def member_variance(means: torch.Tensor) -> torch.Tensor:
        """(B, obs) the members' (biased) variance of `means` (E, B, obs). Written out: torch's `var(0)`, a reduction
        over the leading dimension, was 10-17x slower at these shapes (0.12 against 0.014 ms at B = 91)."""
        return (means - means.mean(0)).square().mean(0)

    @staticmethod
    def next_from_members(means: torch.Tensor, stds: torch.Tensor, mode: str = "elite_mean",
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Next states (B, obs) from `member_predictions`' output by the rule `mode` (see `predict`)."""
        if mode == "mean":
            return means.mean(0)
        if mode not in ("elite_mean", "sample"):
            raise ValueError(f"unknown prediction mode '{mode}'; use mean, elite_mean or sample")
        batch = means.shape[1]
        pick = torch.randint(0, means.shape[0], (batch,), generator=generator).to(means.device)
        rows = torch.arange(batch, device=means.device)
        next_obs = means[pick, rows]
        if mode == "sample":
            noise = torch.randn(next_obs.shape, generator=generator).to(means.device)
            next_obs = next_obs + stds[pick, rows] * noise
        return next_obs
