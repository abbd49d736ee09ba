"""The DyDiff rollout (Zhao et al. 2024, arXiv 2405.19189) as one function on batched tensors.

    result = dydiff_rollout(bundle, start_obs, policy, horizon=48, num_iterations=2)

1. Initial trajectory: a_t = policy(s_t), s_{t+1} = single-step ensemble(s_t, a_t).
2. `num_iterations` times: sample states from the diffusion model given s_0 and the current actions,
   average them with the previous states, relabel every action with the policy. `RefineConfig` can anchor
   the first k states to the single-step rollout (inpainted as conditions, kept bit for bit) and weight
   the average per step by the ensemble's uncertainty instead of 50/50.
3. Label rewards with the reward model, termination with the task's rule; cut each trajectory after its
   first predicted termination.
4. Score trajectories by predicted return and keep a fraction (hardmax / softmax / none).

Baselines are settings of the same function: `num_iterations=0` is a pure single-step-ensemble rollout
(MBPO/MOPO style); `policy=behaviour_policy(bundle)` is the "behaviour prior" mode (the diffusion model
driven by the bundle's behaviour-cloning actions, no learning policy injected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import MAX_STATE_STD, FilterConfig, RefineConfig, SamplerConfig
from .models import DynamicsEnsemble, edm_sample, student_sample

Policy = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


class PolicyError(ValueError):
    pass


@dataclass
class RolloutResult:
    """Batched trajectories, all (B, H, ...) except `returns` and `kept` (B,).

    Transition t is (obs[:, t], actions[:, t], rewards[:, t], next_obs[:, t], terminated[:, t]);
    next_obs[:, t] == obs[:, t + 1]. `valid` is True up to and including the first predicted termination.
    `disagreement` is the dynamics ensemble's spread on each transition (dataset-std units).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    valid: torch.Tensor
    returns: torch.Tensor
    kept: torch.Tensor
    disagreement: torch.Tensor
    nonfinite: torch.Tensor  # (B,) a model produced NaN/inf; such trajectories end there
    diverged: torch.Tensor  # (B,) a state ran away (beyond `max_state_std`); such trajectories end there too

    def __len__(self) -> int:
        return self.obs.shape[0]

    def select(self, index) -> "RolloutResult":
        return RolloutResult(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def transitions(self, kept_only: bool = True) -> dict[str, np.ndarray]:
        """Flat numpy transitions of the valid steps (of the kept trajectories), for replay buffers."""
        mask = self.valid & self.kept[:, None] if kept_only else self.valid
        return {
            "obs": self.obs[mask].cpu().numpy(), "actions": self.actions[mask].cpu().numpy(),
            "rewards": self.rewards[mask].cpu().numpy(), "next_obs": self.next_obs[mask].cpu().numpy(),
            "terminated": self.terminated[mask].cpu().numpy(),
        }


def default_horizon(window: int) -> int:
    """`dydiff_rollout`'s horizon for a diffusion window of `window` rows: three quarters of it, because under the
    paper's 50/50 rule the window's last rows are its least accurate (teacher-forced on the shipped Hopper bundle:
    0.039-0.044 from h = 15 to 47, 0.078 at h = 63; docs/throughput.md). The env's plans take the whole window
    (`env.default_plan_horizon`): its default rule measured no such loss."""
    return max(1, 3 * window // 4)


def call_policy(policy: Policy, obs: torch.Tensor, act_dim: int) -> torch.Tensor:
    """Evaluate a batch policy and check its output: (B, act_dim), finite; clipped to [-1, 1].

    Non-finite model states are shown to the policy as zeros, so a model failure (which the rollout
    flags) is never reported as a policy failure."""
    with torch.no_grad():
        actions = policy(torch.nan_to_num(obs, nan=0.0, posinf=0.0, neginf=0.0))
    actions = torch.as_tensor(np.asarray(actions) if not isinstance(actions, torch.Tensor) else actions,
                              dtype=obs.dtype, device=obs.device)
    if actions.shape != (obs.shape[0], act_dim):
        raise PolicyError(f"policy returned actions of shape {tuple(actions.shape)} for {obs.shape[0]} observations; "
                          f"expected ({obs.shape[0]}, {act_dim}) (a batch of observations in, a batch of actions out)")
    if not torch.isfinite(actions).all():
        raise PolicyError("policy returned NaN or inf actions; check the policy's inputs and weights")
    return actions.clamp(-1.0, 1.0)


def _act(policy: Policy, obs: torch.Tensor, act_dim: int, step: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A policy's actions; a *time-indexed* policy (attribute `time_indexed = True`) is called as
    policy(obs, step, rows) with each state's step t and trajectory index, e.g. to replay recorded actions
    (the fidelity benchmark's teacher-forced regime)."""
    if getattr(policy, "time_indexed", False):
        return call_policy(lambda o: policy(o, step, rows), obs, act_dim)
    return call_policy(policy, obs, act_dim)


def behaviour_policy(bundle, generator: torch.Generator | None = None, deterministic: bool = False) -> Policy:
    """The bundle's behaviour-cloning policy as a rollout policy (stochastic by default, like the data)."""
    bundle.require("bc")
    return lambda obs: bundle.bc.act(obs, deterministic=deterministic, generator=generator)


def filter_trajectories(returns: torch.Tensor, config: FilterConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask (B,) of the kept trajectories; keeps exactly ceil(keep_fraction * B) unless mode is none."""
    batch = returns.shape[0]
    if config.mode == "none" or batch == 0:
        return torch.ones(batch, dtype=torch.bool, device=returns.device)
    count = max(1, math.ceil(config.keep_fraction * batch - 1e-9))
    scores = returns.double().cpu()
    if config.mode == "softmax":  # Gumbel top-k = sampling without replacement with p ~ exp(z / T)
        z = (scores - scores.mean()) / scores.std(unbiased=False).clamp_min(1e-8)
        uniform = torch.rand(batch, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        scores = z / config.temperature - torch.log(-torch.log(uniform))
    kept = torch.zeros(batch, dtype=torch.bool)
    kept[torch.topk(scores, count, sorted=False).indices] = True
    return kept.to(returns.device)


def _first_termination_cut(terminated: torch.Tensor) -> torch.Tensor:
    """valid[t] = no termination strictly before t (the terminating transition itself stays valid)."""
    before = torch.cumsum(terminated.int(), dim=1) - terminated.int()
    return before == 0


@torch.no_grad()
def dydiff_rollout(bundle, start_obs: torch.Tensor | np.ndarray, policy: Policy, horizon: int | None = None,
                   num_iterations: int = 2, sampler: SamplerConfig | None = None,
                   filter: FilterConfig | None = None, generator: torch.Generator | None = None,
                   dynamics_mode: str = "elite_mean", chunk_size: int = 512,
                   refine: RefineConfig | None = None, precision: str | None = None,
                   max_state_std: float | None = MAX_STATE_STD) -> RolloutResult:
    """DyDiff rollouts of `policy` from `start_obs` (B, obs_dim); see the module docstring.

    horizon: transitions per trajectory; at most the diffusion window minus one (the window's last state
    is only a next state). Defaults to three quarters of the window, because the last rows of a U-Net
    window are its least accurate. sampler: EDM sampler settings (default: the bundle's). filter: which
    trajectories to keep (default hardmax 60 %). refine: how each round combines the diffusion sample with
    the current states (default: the reference's 50/50 average, only s_0 given). Large batches run in
    chunks of `chunk_size`. precision: the networks' serving precision during this call ("float32",
    "bfloat16", "auto"; `Bundle.serving`); None keeps the bundle's. max_state_std: a step whose next state is
    more than this many dataset stds from the dataset mean in some dimension is treated like a non-finite one:
    the trajectory ends before it and it is no data (`EnvConfig.max_state_std` has the evidence; None: off).
    """
    sampler = sampler or bundle.config.sampler
    refine = refine or RefineConfig()
    filter = filter or FilterConfig()
    device = bundle.device
    start_obs = torch.as_tensor(np.asarray(start_obs) if not isinstance(start_obs, torch.Tensor) else start_obs,
                                dtype=torch.float32).to(device)
    if start_obs.dim() != 2 or start_obs.shape[1] != bundle.obs_dim:
        raise ValueError(f"start_obs must have shape (batch, {bundle.obs_dim}), got {tuple(start_obs.shape)}")
    if not torch.isfinite(start_obs).all():
        raise ValueError("start_obs contains NaN or inf")
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    bundle.require("dynamics", "reward", *(("diffusion",) if num_iterations > 0 else ()))
    window = bundle.diffusion.horizon if bundle.diffusion is not None else None
    if horizon is None:
        if window is None:
            raise ValueError("pass horizon: this bundle has no diffusion model to take a default from")
        horizon = default_horizon(window)
    if num_iterations > 0 and not 1 <= horizon <= window - 1:
        raise ValueError(f"horizon must be in [1, {window - 1}] for this bundle's diffusion window of {window} rows")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if num_iterations > 0:
        refine.check_horizon(horizon)
        if sampler.kind == "student":  # now, before the single-step rollouts: no student, or too many steps
            bundle.student_sigmas(sampler.num_steps)

    with bundle.serving(precision):
        chunks = [_rollout_chunk(bundle, part, policy, horizon, num_iterations, sampler, generator, dynamics_mode,
                                 window, refine, max_state_std, first_row=i * chunk_size)
                  for i, part in enumerate(start_obs.split(chunk_size))]
    result = RolloutResult(*(torch.cat([getattr(c, f) for c in chunks]) for f in RolloutResult.__dataclass_fields__))
    result.kept = filter_trajectories(result.returns, filter, generator)
    return result


def sample_windows(bundle, cond_values: torch.Tensor, cond_mask: torch.Tensor, sampler: SamplerConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffusion windows given the conditions (unit scale): the bundle's distilled student for sampler kind
    "student" (`BundleError` naming the fix when the bundle has none), else its diffusion model."""
    if sampler.kind == "student":
        sigmas = bundle.student_sigmas(sampler.num_steps)  # checks the student first
        return student_sample(bundle.student.denoise, cond_values, cond_mask, sigmas, generator)
    return edm_sample(bundle.diffusion.denoise, cond_values, cond_mask, sampler, generator)


def runaway(states: torch.Tensor, obs_mean: torch.Tensor, obs_std: torch.Tensor,
            max_state_std: float | None) -> torch.Tensor:
    """(...,) True where a state (..., obs) lies more than `max_state_std` dataset stds from the dataset mean in
    some dimension: a model that left the data for good (never, for None)."""
    if max_state_std is None:
        return torch.zeros(states.shape[:-1], dtype=torch.bool, device=states.device)
    return ((states - obs_mean) / obs_std).abs().amax(-1) > max_state_std


def elite_spread(means: torch.Tensor, obs_var: torch.Tensor) -> torch.Tensor:
    """(B,) the elites' variance of their predicted next states (means (E, B, obs)), mean over dimensions, in
    dataset-std units: one step's term of the ensemble's running variance estimate v."""
    return (DynamicsEnsemble.member_variance(means) / obs_var).mean(-1)


def diffusion_weight(step_variance: torch.Tensor, refine: RefineConfig,
                     probe_gap: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, 1) weight of the diffusion sample per trajectory and step; 1 - weight goes to the current states.

    step_variance (B, L): the ensemble's per-step variance (mean over dimensions, dataset-std units) of the
    transition into each state; its running sum v estimates the single-step rollout's error variance there.
    probe_gap (B,): the mean square distance between the first diffusion sample and the single-step
    states over the probe steps, a per-trajectory floor on the diffusion model's error variance e^2.
    The weight is the inverse-variance rule v / (v + e^2)."""
    if refine.blend == "average":
        return torch.full((*step_variance.shape, 1), 0.5, dtype=step_variance.dtype, device=step_variance.device)
    variance = torch.cumsum(step_variance, dim=1)
    error = torch.full_like(variance[:, :1], refine.diffusion_error ** 2)
    if probe_gap is not None:
        error = torch.maximum(error, probe_gap[:, None])
    weight = variance / (variance + error)
    if probe_gap is not None and refine.max_probe_ratio is not None:
        # off where the ensemble is accurate: keep the single-step states
        weight = weight * (probe_gap <= refine.max_probe_ratio * refine.diffusion_error ** 2)[:, None]
    return weight[..., None]


def probe_distance(sampled_states: torch.Tensor, states: torch.Tensor, obs_var: torch.Tensor, first: int,
                   steps: int) -> torch.Tensor | None:
    """(B,) mean square distance (dataset-std units) between two state trajectories over `steps` steps from
    `first` on (the first free states: anchored ones are conditions, equal in both)."""
    last = min(first + steps, states.shape[1])
    if steps == 0 or last <= first:
        return None
    gap = (sampled_states[:, first:last] - states[:, first:last]) ** 2 / obs_var
    return gap.mean(dim=(1, 2))


def _rollout_chunk(bundle, s0, policy, horizon, num_iterations, sampler, generator, dynamics_mode, window, refine,
                   max_state_std, first_row: int = 0) -> RolloutResult:
    obs_dim, act_dim = bundle.obs_dim, bundle.act_dim
    # the diffusion model works on whole windows; a pure single-step rollout needs only horizon + 1 states
    length = window if num_iterations > 0 else horizon + 1
    batch = s0.shape[0]
    rows = torch.arange(first_row, first_row + batch)  # trajectory indices, for time-indexed policies
    obs_norm = bundle.normalizer("obs")
    obs_var = torch.as_tensor(obs_norm.std, dtype=s0.dtype, device=s0.device) ** 2

    # 1. initial trajectory from the single-step ensemble
    states = [s0]
    actions = []
    step_variance = [torch.zeros(batch, dtype=s0.dtype, device=s0.device)]  # s_0 is exact
    for t in range(length):
        a = _act(policy, states[-1], act_dim, torch.full((batch,), t, dtype=torch.long), rows)
        means, stds = bundle.dynamics.member_predictions(states[-1], a)
        actions.append(a)
        states.append(bundle.dynamics.next_from_members(means, stds, dynamics_mode, generator))
        step_variance.append(elite_spread(means, obs_var))
    states = torch.stack(states[:length], 1)  # (B, L, obs): s_0 .. s_{L-1}
    actions = torch.stack(actions, 1)  # (B, L, act)

    # 2. diffusion refinement: sample states given s_0 (and the anchored prefix) and the actions, combine,
    # relabel the actions; the anchored states and the actions that produced them stay as they are
    norm = bundle.normalizer("transition")
    anchor = refine.anchor_steps
    anchored_states, anchored_actions = states[:, : anchor + 1].clone(), actions[:, :anchor].clone()
    step_variance = torch.stack(step_variance[:length], 1)
    if num_iterations > 0:
        cond_mask = bundle.diffusion.condition_mask(device=s0.device).clone()
        cond_mask[: anchor + 1, :obs_dim] = True
    for iteration in range(num_iterations):
        cond = norm.to_unit(torch.cat([states, actions], -1))
        # K samples in one batch, averaged: an estimate of the model's conditional mean
        sample = sample_windows(bundle, cond.repeat(refine.num_samples, 1, 1), cond_mask, sampler, generator)
        sampled_states = norm.from_unit(sample.reshape(refine.num_samples, *cond.shape).mean(0))[..., :obs_dim]
        if iteration == 0:  # the weights, from the first sample against the single-step states
            gap = (probe_distance(sampled_states, states, obs_var, anchor + 1, refine.probe_steps)
                   if refine.blend == "uncertainty" else None)
            weight = diffusion_weight(step_variance, refine, gap)
        states = weight * sampled_states + (1 - weight) * states
        # the unit-scaling round trip is not bit-exact; given states are kept exact
        states[:, : anchor + 1] = anchored_states
        actions = _act(policy, states.reshape(-1, obs_dim), act_dim, torch.arange(length).repeat(batch),
                       rows.repeat_interleave(length)).reshape(actions.shape)
        actions[:, :anchor] = anchored_actions

    # 3. labels: transition t goes from states[:, t] to states[:, t + 1]
    obs, next_obs, acts = states[:, :horizon], states[:, 1 : horizon + 1], actions[:, :horizon]
    rewards = bundle.reward(obs, acts)
    _, disagreement = bundle.dynamics.predict(obs.reshape(-1, obs_dim), acts.reshape(-1, act_dim), mode="mean")
    disagreement = disagreement.reshape(obs.shape[:2])
    finite = torch.isfinite(next_obs).all(-1) & torch.isfinite(rewards) & torch.isfinite(obs).all(-1)
    obs_mean = torch.as_tensor(obs_norm.mean, dtype=s0.dtype, device=s0.device)
    diverged = finite & runaway(next_obs, obs_mean, obs_var.sqrt(), max_state_std)
    usable = finite & ~diverged
    terminated = torch.as_tensor(bundle.task.terminated(next_obs), device=obs.device) | ~usable
    # a non-finite or runaway step counts as a termination (so nothing after it is valid) but is never data itself
    valid = _first_termination_cut(terminated) & usable
    # 4. score by predicted return over the valid steps
    returns = torch.where(valid, rewards, torch.zeros_like(rewards)).sum(1)
    return RolloutResult(obs, acts, rewards, next_obs, terminated, valid, returns,
                         torch.ones(obs.shape[0], dtype=torch.bool, device=obs.device), disagreement,
                         ~finite.all(1), diverged.any(1))
