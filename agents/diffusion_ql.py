"""Diffusion-QL (Wang, Hunt & Zhou, "Diffusion Policies as an Expressive Policy Class for Offline RL", ICLR 2023).

The policy is a conditional DDPM over actions: a noise predictor eps(a_t, t, s) (3x256 Mish MLP with a 16-d
sinusoidal time embedding) and a 5-step "vp" schedule, beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1)/(2T^2))
with b_min = 0.1, b_max = 10. Sampling runs the full reverse chain (DDPM posterior mean and variance, x_0
prediction clipped to the action bounds at every step) and is differentiable, so the Q term trains the actor
through all T steps.

    critic: y = r + gamma (1 - terminated) min_i Q'_i(s', a'),  a' ~ EMA actor(s');   L = sum_i MSE(Q_i(s, a), y)
    actor:  L = L_bc + eta * (-mean Q_i(s, a_pi) / mean |Q_j(s, a_pi)|.detach()),   a_pi ~ actor(s)
            with L_bc the DDPM noise-prediction loss on dataset actions and (i, j) = (1, 2) or (2, 1) at random.

Defaults (the paper's code, Zhendong-Wang/Diffusion-Policies-for-Offline-RL, for Hopper): T = 5, eta = 1.0,
Adam lr 3e-4 for actor and critic, gamma = 0.99, tau = 0.005 (critic target every step), EMA decay 0.995 updated
every 5 steps from step 1000 (the EMA actor only provides target actions), twin Mish critics 3x256,
grad-norm clipping of both actor and critic.

Choices and differences from the paper / its code:
- Action selection: `act` samples `eval_candidates` = 50 actions per state and takes the argmax of the target
  critic's min(Q1, Q2) (`action_selection="argmax"`). The paper's code samples an index from softmax(Q) instead
  (`action_selection="softmax"` reproduces that; with Hopper's Q values in the hundreds the two nearly coincide).
  Candidates come from the online actor, as in the paper's code (`act_with_ema=True` uses the EMA actor).
- Rollout policy: `actor_fn()` draws `rollout_candidates` = 1 sample per state from the diffusion policy (the
  learned stochastic policy, cheap enough for thousands of model rollouts); pass `candidates=50` for the
  deployment-time selection.
- Grad-norm clip 5.0 by default (the paper's table uses 9.0 for hopper-medium and 5.0 for hopper-medium-expert).
- No learning-rate decay: the paper's `--lr_decay` steps a cosine schedule with T_max = 2000 only once per 50k
  updates, so over its 2M updates the learning rate hardly moves; omitting it changes little.
- `max_q_backup` (antmaze only) is not implemented; observations are not normalised by default (the paper does not
  normalise; `normalize_observations=True` enables it with the dataset mean/std).
- Randomness (which critic is used in the Q term, diffusion noise) comes from torch's RNG, not numpy's, so a
  checkpointed torch RNG state reproduces it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .td3bc import (ObservationNormalizer, TwinCritic, _check_compatible, dataset_obs_stats, _jsonable_config, _optimizer_to,
                    as_batch_tensor, check_batch, critic_loss, mlp, soft_update, td_target)

# ----------------------------------------------------------------------------------------------------------------
# Diffusion schedule and sampler (pure functions on batched tensors)


def vp_beta_schedule(num_steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> torch.Tensor:
    """Discretised variance-preserving SDE: beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1) / (2 T^2)), t = 1..T."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = np.arange(1, num_steps + 1, dtype=np.float64)
    alphas = np.exp(-beta_min / num_steps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / num_steps ** 2)
    return torch.tensor(1.0 - alphas, dtype=torch.float32)


@dataclass(frozen=True)
class DiffusionSchedule:
    """Per-step DDPM coefficients, each a (T,) tensor indexed by the step t = 0..T-1."""

    betas: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor  # forward process x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor  # x_0 from (x_t, eps)
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # q(x_{t-1} | x_t, x_0) mean = c1 x_0 + c2 x_t
    posterior_mean_coef2: torch.Tensor
    posterior_log_variance: torch.Tensor  # clipped below at 1e-20 since the variance is 0 at t = 0

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def to(self, device: str | torch.device) -> "DiffusionSchedule":
        return DiffusionSchedule(**{k: v.to(device) for k, v in self.__dict__.items()})


def make_schedule(betas: torch.Tensor) -> DiffusionSchedule:
    betas = betas.to(torch.float64)  # compute in double, store in float
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    coefficients = dict(
        betas=betas,
        sqrt_alphas_cumprod=abar.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - abar).sqrt(),
        sqrt_recip_alphas_cumprod=(1.0 / abar).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / abar - 1.0).sqrt(),
        posterior_mean_coef1=betas * abar_prev.sqrt() / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        posterior_log_variance=posterior_variance.clamp(min=1e-20).log(),
    )
    return DiffusionSchedule(**{k: v.float() for k, v in coefficients.items()})


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of (B,) step indices: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class NoisePredictor(nn.Module):
    """eps(a_t, t, s): the time embedding goes through a small Mish MLP, then [a_t, emb(t), s] -> 3x256 Mish MLP."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256, 256), time_dim: int = 16):
        super().__init__()
        if time_dim < 4 or time_dim % 2:
            raise ValueError(f"time_dim must be even and >= 4, got {time_dim}")
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * time_dim), nn.Mish(), nn.Linear(2 * time_dim, time_dim))
        self.net = mlp(act_dim + time_dim + obs_dim, act_dim, hidden, nn.Mish)

    def forward(self, noisy_actions: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        return self.net(torch.cat([noisy_actions, emb, obs], dim=-1))


def diffusion_bc_loss(noise_model: nn.Module, actions: torch.Tensor, obs: torch.Tensor,
                      schedule: DiffusionSchedule) -> torch.Tensor:
    """DDPM noise-prediction loss on dataset actions: E_{t, eps} ||eps - eps_theta(q(a_t | a), t, s)||^2 (mean)."""
    t = torch.randint(0, schedule.num_steps, (len(actions),), device=actions.device)
    noise = torch.randn_like(actions)
    noisy = schedule.sqrt_alphas_cumprod[t, None] * actions + schedule.sqrt_one_minus_alphas_cumprod[t, None] * noise
    return F.mse_loss(noise_model(noisy, t, obs), noise)


def ddpm_sample(noise_model: nn.Module, obs: torch.Tensor, schedule: DiffusionSchedule, act_dim: int,
                max_action: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Actions (B, act_dim) in [-max_action, max_action] by the full reverse DDPM chain, conditioned on obs (B, .).

    Differentiable with respect to the noise model's parameters (the Q term of the actor loss needs that)."""
    batch = obs.shape[0]
    x = torch.randn((batch, act_dim), generator=generator, device=obs.device, dtype=obs.dtype)
    for i in reversed(range(schedule.num_steps)):
        t = torch.full((batch,), i, device=obs.device, dtype=torch.long)
        eps = noise_model(x, t, obs)
        x0 = (schedule.sqrt_recip_alphas_cumprod[i] * x - schedule.sqrt_recipm1_alphas_cumprod[i] * eps)
        x0 = x0.clamp(-max_action, max_action)
        mean = schedule.posterior_mean_coef1[i] * x0 + schedule.posterior_mean_coef2[i] * x
        if i > 0:  # the last step returns the posterior mean, without noise
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + (0.5 * schedule.posterior_log_variance[i]).exp() * noise
        else:
            x = mean
    return x.clamp(-max_action, max_action)


def q_loss_term(q1_pi: torch.Tensor, q2_pi: torch.Tensor, use_q1: bool) -> torch.Tensor:
    """-mean Q_i(s, a_pi) / mean |Q_j(s, a_pi)|.detach(), (i, j) = (1, 2) if use_q1 else (2, 1), as in the paper."""
    q, other = (q1_pi, q2_pi) if use_q1 else (q2_pi, q1_pi)
    return -q.mean() / other.abs().mean().detach()


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def select_by_q(candidates: torch.Tensor, q: torch.Tensor, mode: str = "argmax",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one of K candidate actions per state: candidates (B, K, act), q (B, K) -> (B, act).

    "argmax" takes the best; "softmax" samples an index with probabilities softmax(q) (the paper's code)."""
    if mode == "argmax":
        index = q.argmax(dim=1)
    elif mode == "softmax":
        index = torch.multinomial(torch.softmax(q, dim=1), 1, generator=generator).squeeze(1)
    else:
        raise ValueError(f"action selection must be 'argmax' or 'softmax', got {mode!r}")
    return candidates[torch.arange(len(candidates), device=candidates.device), index]


# ----------------------------------------------------------------------------------------------------------------
# Agent


@dataclass
class DiffusionQLConfig:
    hidden_dims: tuple[int, ...] = (256, 256, 256)  # noise predictor and each critic
    time_embedding_dim: int = 16
    diffusion_steps: int = 5
    beta_min: float = 0.1
    beta_max: float = 10.0
    discount: float = 0.99
    tau: float = 0.005
    eta: float = 1.0
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    grad_norm: float = 5.0  # <= 0 disables clipping
    clip_critic_grad: bool = True  # the paper's code clips the critic with the same norm
    ema_decay: float = 0.995
    step_start_ema: int = 1000
    update_ema_every: int = 5
    eval_candidates: int = 50
    action_selection: str = "argmax"  # or "softmax" (the paper's code)
    act_with_ema: bool = False  # the paper's code samples evaluation candidates from the online actor
    rollout_candidates: int = 1  # actions drawn per state by `actor_fn` (1 = sample the diffusion policy)
    normalize_observations: bool = False  # used by `from_data`; the paper does not normalise
    obs_std_eps: float = 1e-3


class DiffusionQL:
    """Diffusion-QL agent. Batches hold raw observations; any normalisation happens inside."""

    def __init__(self, obs_dim: int, act_dim: int, obs_mean: np.ndarray | None = None,
                 obs_std: np.ndarray | None = None, max_action: float = 1.0,
                 config: DiffusionQLConfig | None = None, device: str | torch.device = "cpu"):
        self.config = config = config or DiffusionQLConfig()
        if config.action_selection not in ("argmax", "softmax"):
            raise ValueError(f"action_selection must be 'argmax' or 'softmax', got {config.action_selection!r}")
        self.obs_dim, self.act_dim, self.max_action = int(obs_dim), int(act_dim), float(max_action)
        self.device = torch.device(device)
        hidden = tuple(config.hidden_dims)
        self.schedule = make_schedule(vp_beta_schedule(config.diffusion_steps, config.beta_min, config.beta_max))
        self.schedule = self.schedule.to(self.device)
        self.normalizer = ObservationNormalizer(obs_dim, obs_mean, obs_std).to(self.device)
        self.actor = NoisePredictor(obs_dim, act_dim, hidden, config.time_embedding_dim).to(self.device)
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = TwinCritic(obs_dim, act_dim, hidden, nn.Mish).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.step = 0  # updates done

    @classmethod
    def from_data(cls, data, config: DiffusionQLConfig | None = None, max_action: float = 1.0,
                  device: str | torch.device = "cpu") -> "DiffusionQL":
        config = config or DiffusionQLConfig()
        return cls(data.obs_dim, data.act_dim, *dataset_obs_stats(data, config), max_action, config, device)

    def to(self, device: str | torch.device) -> "DiffusionQL":
        self.device = torch.device(device)
        self.schedule = self.schedule.to(self.device)
        for module in (self.normalizer, self.actor, self.actor_ema, self.critic, self.critic_target):
            module.to(self.device)
        for optimizer in (self.actor_optimizer, self.critic_optimizer):
            _optimizer_to(optimizer, self.device)
        return self

    def sample_actions(self, obs_normalized: torch.Tensor, use_ema: bool = False) -> torch.Tensor:
        model = self.actor_ema if use_ema else self.actor
        return ddpm_sample(model, obs_normalized, self.schedule, self.act_dim, self.max_action)

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        cfg = self.config
        check_batch(batch, self.obs_dim, self.act_dim)
        b = {k: v.to(self.device, torch.float32) for k, v in batch.items()}
        obs, next_obs, actions = self.normalizer(b["obs"]), self.normalizer(b["next_obs"]), b["actions"]

        # critic: bootstrap from the EMA actor's sampled next actions
        with torch.no_grad():
            next_actions = self.sample_actions(next_obs, use_ema=True)
            target = td_target(b["rewards"], b["terminated"], *self.critic_target(next_obs, next_actions),
                               cfg.discount)
        q1, q2 = self.critic(obs, actions)
        loss_q = critic_loss(q1, q2, target)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss_q.backward()
        critic_grad_norm = _clip(self.critic.parameters(), cfg.grad_norm if cfg.clip_critic_grad else 0.0)
        self.critic_optimizer.step()

        # actor: diffusion BC + normalised Q; the critic is frozen so no gradient is computed for it
        bc = diffusion_bc_loss(self.actor, actions, obs, self.schedule)
        self.critic.requires_grad_(False)
        try:
            q1_pi, q2_pi = self.critic(obs, self.sample_actions(obs))
        finally:
            self.critic.requires_grad_(True)
        use_q1 = bool(torch.rand(()) < 0.5)
        q_term = q_loss_term(q1_pi, q2_pi, use_q1)
        loss_pi = bc + cfg.eta * q_term
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss_pi.backward()
        actor_grad_norm = _clip(self.actor.parameters(), cfg.grad_norm)
        self.actor_optimizer.step()

        # targets; the EMA schedule counts steps before this update, as the paper's code does
        if self.step % cfg.update_ema_every == 0 and self.step >= cfg.step_start_ema:
            ema_update(self.actor_ema, self.actor, cfg.ema_decay)
        soft_update(self.critic_target, self.critic, cfg.tau)
        self.step += 1
        return {"critic_loss": loss_q.item(), "bc_loss": bc.item(), "q_loss": q_term.item(),
                "actor_loss": loss_pi.item(), "q_mean": q1.mean().item(), "target_q_mean": target.mean().item(),
                "actor_grad_norm": actor_grad_norm, "critic_grad_norm": critic_grad_norm}

    @torch.no_grad()
    def _select(self, obs: torch.Tensor, candidates: int) -> torch.Tensor:
        """Best-of-`candidates` actions (or one plain sample when candidates == 1) for raw obs (B, obs_dim)."""
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        s = self.normalizer(obs)
        if candidates == 1:
            return self.sample_actions(s, use_ema=self.config.act_with_ema)
        s_rep = s.repeat_interleave(candidates, dim=0)  # (B*K, obs), state-major
        a = self.sample_actions(s_rep, use_ema=self.config.act_with_ema)
        q = torch.minimum(*self.critic_target(s_rep, a)).view(len(obs), candidates)
        return select_by_q(a.view(len(obs), candidates, self.act_dim), q, self.config.action_selection)

    def act(self, obs: np.ndarray, candidates: int | None = None) -> np.ndarray:
        """Actions (B, act_dim) float32 for raw observations (B, obs_dim): best of `eval_candidates` samples."""
        x = as_batch_tensor(obs, self.obs_dim, self.device)
        k = self.config.eval_candidates if candidates is None else candidates
        return self._select(x, k).cpu().numpy().astype(np.float32)

    def actor_fn(self, candidates: int | None = None) -> Callable:
        """Rollout policy (numpy -> numpy, tensor -> tensor), `rollout_candidates` samples per state by default."""
        k = self.config.rollout_candidates if candidates is None else candidates

        def policy(obs):
            if isinstance(obs, torch.Tensor):
                return self._select(as_batch_tensor(obs, self.obs_dim, self.device), k).to(obs.device)
            return self.act(obs, candidates=k)

        return policy

    def state_dict(self) -> dict:
        return {
            "algorithm": "diffusion_ql", "obs_dim": self.obs_dim, "act_dim": self.act_dim,
            "max_action": self.max_action, "config": _jsonable_config(self.config), "step": self.step,
            "normalizer": self.normalizer.state_dict(), "actor": self.actor.state_dict(),
            "actor_ema": self.actor_ema.state_dict(), "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(), "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        _check_compatible(state, "diffusion_ql", self.obs_dim, self.act_dim)
        self.normalizer.load_state_dict(state["normalizer"])
        for name in ("actor", "actor_ema", "critic", "critic_target", "actor_optimizer", "critic_optimizer"):
            getattr(self, name).load_state_dict(state[name])
        self.step = int(state["step"])
        _optimizer_to(self.actor_optimizer, self.device)
        _optimizer_to(self.critic_optimizer, self.device)


def _clip(parameters, max_norm: float) -> float:
    """Clip the global grad norm when max_norm > 0; returns the norm before clipping (NaN when not computed)."""
    if max_norm > 0:
        return float(nn.utils.clip_grad_norm_(list(parameters), max_norm=max_norm))
    return float("nan")
