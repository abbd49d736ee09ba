"""TD3+BC (Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021).

TD3 with a behaviour-cloning term in the actor loss:

    critic:  y = r + gamma * (1 - terminated) * min_i Q'_i(s', clip(pi'(s') + clip(eps, -c, c), -a_max, a_max)),
             eps ~ N(0, sigma^2);  L = sum_i MSE(Q_i(s, a), y)
    actor:   every `policy_delay` critic steps,
             L = -lambda * mean Q_1(s, pi(s)) + mean (pi(s) - a)^2,  lambda = alpha / mean |Q_1(s, pi(s))|.detach()
    targets: Polyak averaging with tau, on actor steps only (as in TD3).

Defaults are the paper's: deterministic tanh actor 256-256 ReLU, twin critics 256-256 ReLU, sigma = 0.2,
c = 0.5 (both times max_action), policy delay 2, alpha = 2.5, gamma = 0.99, tau = 0.005, Adam lr 3e-4 for both,
observations normalised with the dataset mean and std (+1e-3).

Differences from the paper's code (sfujim/TD3_BC):
- the bootstrap mask is the Gymnasium `terminated` flag; the paper used D4RL `terminals`, which means the same
  (time-limit ends are not terminals), so nothing changes in substance;
- the BC term is a per-element mean over the batch *and* action dimensions, like the paper's `F.mse_loss`;
- noise comes from torch's global RNG (no separate generator), so checkpoints restore it with the trainer's
  torch RNG state.

Differences from the DyDiff reference code (which also trained "TD3+BC" on the mixed batches): the reference used
a stochastic tanh-Gaussian actor (SAC-style) and no target policy smoothing. We follow the original paper, because
the DyDiff paper reports TD3+BC as the base algorithm and cites Fujimoto & Gu.

The helpers at the top (`mlp`, `ObservationNormalizer`, `TwinCritic`, `soft_update`) are shared with the
Diffusion-QL agent.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .buffers import check_transitions

# ----------------------------------------------------------------------------------------------------------------
# Shared building blocks


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    widths = [in_dim, *hidden]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), activation()]
    layers.append(nn.Linear(widths[-1], out_dim))
    return nn.Sequential(*layers)


class ObservationNormalizer(nn.Module):
    """(obs - mean) / std with statistics stored as buffers (saved in state_dicts, moved by `.to`)."""

    def __init__(self, obs_dim: int, mean: np.ndarray | None = None, std: np.ndarray | None = None):
        super().__init__()
        mean = np.zeros(obs_dim, np.float32) if mean is None else np.asarray(mean, np.float32)
        std = np.ones(obs_dim, np.float32) if std is None else np.asarray(std, np.float32)
        if mean.shape != (obs_dim,) or std.shape != (obs_dim,):
            raise ValueError(f"observation mean/std must have shape ({obs_dim},), got {mean.shape} and {std.shape}")
        if not (np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError("observation std must be finite and > 0")
        self.register_buffer("mean", torch.as_tensor(mean))
        self.register_buffer("std", torch.as_tensor(std))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


def observation_stats(observations: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Dataset mean and std + eps, the TD3+BC normalisation (eps keeps constant dimensions finite)."""
    obs = np.asarray(observations, dtype=np.float64)
    return obs.mean(0).astype(np.float32), (obs.std(0) + eps).astype(np.float32)


class TwinCritic(nn.Module):
    """Two independent Q(s, a) MLPs; `forward` returns both as (B,) tensors."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden, activation)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden, activation)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q1_only(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.q1(torch.cat([obs, actions], dim=-1)).squeeze(-1)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- tau * source + (1 - tau) * target, parameter by parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


def td_target(rewards: torch.Tensor, terminated: torch.Tensor, next_q1: torch.Tensor, next_q2: torch.Tensor,
              discount: float) -> torch.Tensor:
    """Clipped double-Q target r + gamma * (1 - terminated) * min(Q1', Q2'); truncated rows still bootstrap."""
    return rewards + discount * (1.0 - terminated) * torch.minimum(next_q1, next_q2)


def critic_loss(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of both critics' mean squared TD errors (the target carries no gradient)."""
    target = target.detach()
    return F.mse_loss(q1, target) + F.mse_loss(q2, target)


def as_batch_tensor(obs, obs_dim: int, device: torch.device) -> torch.Tensor:
    """(B, obs_dim) float32 tensor on `device` from a numpy array or tensor; clear error on a wrong shape."""
    x = torch.as_tensor(obs, dtype=torch.float32, device=device)
    if x.dim() != 2 or x.shape[1] != obs_dim:
        raise ValueError(f"expected a batch of observations of shape (B, {obs_dim}), got {tuple(x.shape)}")
    return x


def check_batch(batch: Mapping[str, torch.Tensor], obs_dim: int, act_dim: int) -> None:
    check_transitions(batch, obs_dim, act_dim, what="batch")
    if batch["rewards"].dim() != 1 or batch["terminated"].dim() != 1:
        raise ValueError("batch['rewards'] and batch['terminated'] must be 1-D (B,) tensors")


# ----------------------------------------------------------------------------------------------------------------
# TD3+BC losses


def target_policy_smoothing(next_actions: torch.Tensor, noise_std: float, noise_clip: float, max_action: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """pi'(s') + clip(N(0, noise_std^2), -noise_clip, noise_clip), clipped to the action bounds."""
    noise = torch.randn(next_actions.shape, generator=generator, device=next_actions.device,
                        dtype=next_actions.dtype)
    noise = (noise * noise_std).clamp(-noise_clip, noise_clip)
    return (next_actions + noise).clamp(-max_action, max_action)


def actor_loss(policy_actions: torch.Tensor, dataset_actions: torch.Tensor, q_policy: torch.Tensor,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TD3+BC actor loss -lambda * mean Q + MSE(pi(s), a) with lambda = alpha / mean|Q|.detach().

    Returns (loss, bc_term, lambda). Normalising by mean|Q| makes the Q term scale-free, so alpha alone sets the
    RL / BC balance whatever the reward scale."""
    lmbda = alpha / q_policy.abs().mean().detach()
    bc_term = F.mse_loss(policy_actions, dataset_actions)
    return -lmbda * q_policy.mean() + bc_term, bc_term, lmbda


# ----------------------------------------------------------------------------------------------------------------
# Agent


@dataclass
class TD3BCConfig:
    hidden_dims: tuple[int, ...] = (256, 256)
    discount: float = 0.99
    tau: float = 0.005
    policy_noise: float = 0.2  # std of the target smoothing noise, times max_action
    noise_clip: float = 0.5  # times max_action
    policy_delay: int = 2
    alpha: float = 2.5
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    normalize_observations: bool = True  # used by `from_data`
    obs_std_eps: float = 1e-3


class Actor(nn.Module):
    """Deterministic policy max_action * tanh(MLP(s))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden, nn.ReLU)
        self.max_action = max_action

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self.net(obs))


class TD3BC:
    """TD3+BC agent. Batches hold raw (unnormalised) observations; the agent normalises them itself."""

    def __init__(self, obs_dim: int, act_dim: int, obs_mean: np.ndarray | None = None,
                 obs_std: np.ndarray | None = None, max_action: float = 1.0, config: TD3BCConfig | None = None,
                 device: str | torch.device = "cpu"):
        self.config = config = config or TD3BCConfig()
        self.obs_dim, self.act_dim, self.max_action = int(obs_dim), int(act_dim), float(max_action)
        self.device = torch.device(device)
        hidden = tuple(config.hidden_dims)
        self.normalizer = ObservationNormalizer(obs_dim, obs_mean, obs_std).to(self.device)
        self.actor = Actor(obs_dim, act_dim, hidden, self.max_action).to(self.device)
        self.critic = TwinCritic(obs_dim, act_dim, hidden, nn.ReLU).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.step = 0  # critic updates done

    @classmethod
    def from_data(cls, data, config: TD3BCConfig | None = None, max_action: float = 1.0,
                  device: str | torch.device = "cpu") -> "TD3BC":
        """An agent sized for an `OfflineData`, normalising observations with its statistics."""
        config = config or TD3BCConfig()
        return cls(data.obs_dim, data.act_dim, *dataset_obs_stats(data, config), max_action, config, device)

    def to(self, device: str | torch.device) -> "TD3BC":
        self.device = torch.device(device)
        for module in (self.normalizer, self.actor, self.critic, self.actor_target, self.critic_target):
            module.to(self.device)
        for optimizer in (self.actor_optimizer, self.critic_optimizer):
            _optimizer_to(optimizer, self.device)
        return self

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One critic step, and an actor + target step every `policy_delay` calls. Returns scalar metrics."""
        cfg = self.config
        check_batch(batch, self.obs_dim, self.act_dim)
        b = {k: v.to(self.device, torch.float32) for k, v in batch.items()}
        obs, next_obs = self.normalizer(b["obs"]), self.normalizer(b["next_obs"])
        self.step += 1

        with torch.no_grad():
            next_actions = target_policy_smoothing(self.actor_target(next_obs), cfg.policy_noise * self.max_action,
                                                   cfg.noise_clip * self.max_action, self.max_action)
            target = td_target(b["rewards"], b["terminated"], *self.critic_target(next_obs, next_actions),
                               cfg.discount)
        q1, q2 = self.critic(obs, b["actions"])
        loss_q = critic_loss(q1, q2, target)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss_q.backward()
        self.critic_optimizer.step()
        metrics = {"critic_loss": loss_q.item(), "q_mean": q1.mean().item(), "target_q_mean": target.mean().item()}

        if self.step % cfg.policy_delay == 0:
            pi = self.actor(obs)
            loss_pi, bc_term, lmbda = actor_loss(pi, b["actions"], self.critic.q1_only(obs, pi), cfg.alpha)
            self.actor_optimizer.zero_grad(set_to_none=True)
            loss_pi.backward()
            self.actor_optimizer.step()
            soft_update(self.critic_target, self.critic, cfg.tau)
            soft_update(self.actor_target, self.actor, cfg.tau)
            metrics.update(actor_loss=loss_pi.item(), bc_loss=bc_term.item(), **{"lambda": lmbda.item()})
        return metrics

    @torch.no_grad()
    def _actions(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.normalizer(obs))

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic actions (B, act_dim) float32 for a batch of raw observations (B, obs_dim)."""
        x = as_batch_tensor(obs, self.obs_dim, self.device)
        return self._actions(x).cpu().numpy().astype(np.float32)

    def actor_fn(self) -> Callable:
        """A policy for rollouts: numpy in -> numpy out, tensor in -> tensor out (on the input's device).
        It reads the live actor, so it follows training."""

        def policy(obs):
            if isinstance(obs, torch.Tensor):
                return self._actions(as_batch_tensor(obs, self.obs_dim, self.device)).to(obs.device)
            return self.act(obs)

        return policy

    def state_dict(self) -> dict:
        return {
            "algorithm": "td3bc", "obs_dim": self.obs_dim, "act_dim": self.act_dim, "max_action": self.max_action,
            "config": _jsonable_config(self.config), "step": self.step,
            "normalizer": self.normalizer.state_dict(),
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        _check_compatible(state, "td3bc", self.obs_dim, self.act_dim)
        self.normalizer.load_state_dict(state["normalizer"])
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optimizer", "critic_optimizer"):
            getattr(self, name).load_state_dict(state[name])
        self.step = int(state["step"])
        _optimizer_to(self.actor_optimizer, self.device)
        _optimizer_to(self.critic_optimizer, self.device)


# ----------------------------------------------------------------------------------------------------------------
# Small shared utilities for agents


def dataset_obs_stats(data, config) -> tuple:
    """(mean, std) of a dataset's observations for agents that normalise them, else (None, None)."""
    if not config.normalize_observations:
        return None, None
    return observation_stats(data.observations, config.obs_std_eps)


def _jsonable_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def _check_compatible(state: Mapping, algorithm: str, obs_dim: int, act_dim: int) -> None:
    if state.get("algorithm") != algorithm:
        raise ValueError(f"state is for algorithm {state.get('algorithm')!r}, not {algorithm!r}")
    if (int(state["obs_dim"]), int(state["act_dim"])) != (obs_dim, act_dim):
        raise ValueError(f"state has obs_dim/act_dim {state['obs_dim']}/{state['act_dim']}, agent {obs_dim}/{act_dim}")


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move optimizer moments to `device` (Adam's `step` counters stay on the CPU, as torch keeps them)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)
