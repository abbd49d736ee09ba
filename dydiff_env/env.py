"""DydiffEnv: DyDiff rollouts served as a vectorised Gymnasium environment.

    import gymnasium, dydiff_env
    env = gymnasium.make_vec("Dydiff-hopper-v0", num_envs=64, vectorization_mode="vector_entry_point")
    env.set_policy(my_actor)          # the policy whose DyDiff rollouts the env serves
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(actions)

How a step works. Every sub-env follows a *plan*: one DyDiff trajectory (states s_0..s_H, actions, rewards)
taken from a pool that the env generates in large batches with the policy handle and filters by predicted
return. `reset` puts a fresh plan's s_0 in front of the agent.
- On plan: while the agent's state is the plan's and its action equals the plan's action (max abs difference
  <= `action_tolerance`), the env serves the plan's transition unchanged, bit for bit.
- Off plan: the next observation responds to the actual action through the single-step ensemble mean f,
      next = plan[t+1] + f(x_t, a_t) - f(plan[t], plan_action[t]),
  i.e. the diffusion plan's long-horizon shape plus the model's first-order response to the deviation of
  state and action. The reward is the reward model's r(x_t, a_t). Once the deviation ||next - plan[t+1]||
  (RMS over dimensions, in dataset-std units) exceeds `deviation_threshold`, the env either re-plans from the
  current state (a new DyDiff rollout from `next`, batched across sub-envs) or truncates the episode
  (`on_deviation`). Why: the correction term is a linearisation around the plan; far from it the plan says
  nothing about the agent's state, and a fresh diffusion plan from that state is better than a drifting one.
- At the end of a plan (its horizon, or after its predicted termination when the agent kept going) the env
  re-plans from the current state (`on_plan_end="replan"`, the default, so episodes can run to
  `max_episode_steps` like the real env) or truncates (`on_plan_end="truncate"`, MBPO-style short episodes).
Re-plans use the policy handle, no filter (one trajectory per state).

Rewards come from the reward model, `terminated` from the task's termination rule on the predicted state,
`truncated` from `max_episode_steps`, plan ends and deviations as configured. A sub-env whose model output is
not finite is truncated (the previous observation is repeated, reward 0) and counted in `info["nonfinite"]`,
so the env never emits NaN or inf. Out-of-bound actions are clipped to the action space and counted in
`info["clipped_actions"]`; NaN/inf actions or actions of the wrong shape raise `ValueError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from .bundle import Bundle, BundleError, load_bundle
from .config import SamplerConfig
from .policies import as_policy
from .rollout import FilterConfig, behaviour_policy, dydiff_rollout
from .tasks import get_task

SHIPPED_BUNDLES = Path(__file__).parent / "assets" / "bundles"
INFO_KEYS = ("deviation", "disagreement", "plan_return", "replanned", "on_plan", "clipped_actions", "nonfinite")


def parse_autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
    """An `AutoresetMode` from itself, its name ("SAME_STEP") or its value ("SameStep"), as documented."""
    if isinstance(mode, AutoresetMode):
        return mode
    for member in AutoresetMode:
        if isinstance(mode, str) and mode.lower() in (member.name.lower(), member.value.lower()):
            return member
    raise ValueError(f"autoreset_mode must be one of {[m.name for m in AutoresetMode]} (or an AutoresetMode), "
                     f"got {mode!r}")


def shipped_bundle_path(task: str) -> Path:
    return SHIPPED_BUNDLES / task


def resolve_bundle(bundle: str | Path | Bundle | None, task: str, device: str | torch.device = "cpu") -> Bundle:
    if isinstance(bundle, Bundle):
        if bundle.task.name != get_task(task).name:
            raise BundleError(f"bundle {bundle.path} models {bundle.task.env_id}, not {get_task(task).env_id}")
        return bundle.to(device)
    if bundle is None:
        path = shipped_bundle_path(get_task(task).name)
        if not (path / "config.json").is_file():
            t = get_task(task)
            raise BundleError(
                f"no pretrained bundle ships for '{t.name}'. Train one: `dydiff-env collect {t.name}-medium` "
                f"(or use any local Minari dataset of {t.env_id}) then `dydiff-env train all --dataset ID --out DIR "
                f"--preset cpu`, and pass bundle=DIR")
        bundle = path
    return load_bundle(bundle, env_id=get_task(task).env_id, device=device, require=("dynamics", "reward"))


class DydiffEnv(gym.vector.VectorEnv):
    """`num_envs` sub-environments served from DyDiff rollouts of a learned model bundle (module docstring).

    Args:
        num_envs: number of sub-environments.
        bundle: a bundle directory, a loaded `Bundle`, or None for the bundle shipped for `task`.
        policy: the policy handle (see `set_policy`); None plans with the bundle's behaviour-cloning policy.
        task: "hopper" (the default), "walker2d", "halfcheetah"; must match the bundle.
        horizon: transitions per plan (default: three quarters of the diffusion window).
        num_iterations: DyDiff refinement rounds M (0 = single-step ensemble only).
        sampler: EDM sampler settings (a `SamplerConfig` or a dict; default: the bundle's).
        filter / keep_fraction / temperature: the pool filter ("hardmax", "softmax", "none").
        pool_size: kept plans per pool generation (default max(num_envs, 16): small enough that the first
            reset of a single env is quick on a CPU; larger pools amortise nothing, the cost is per plan).
        refresh_every: regenerate the pool after this many served steps (None: when used up or on set_policy).
        max_episode_steps: truncation limit (the real Hopper-v5 uses 1000).
        start_states: reset from "episode_starts" of the dataset or from "any" dataset state.
        deviation_threshold: RMS deviation from the plan (dataset stds) that triggers `on_deviation`.
        on_deviation / on_plan_end: "replan" or "truncate".
        action_tolerance: actions within this max-abs distance of the plan's count as on plan.
        autoreset_mode: `AutoresetMode.NEXT_STEP` (default), `SAME_STEP` or `DISABLED` (or their names).
        device: torch device of the models.
    """

    def __init__(self, num_envs: int = 1, bundle: str | Path | Bundle | None = None, policy: Any = None, *,
                 task: str = "hopper", horizon: int | None = None, num_iterations: int = 2,
                 sampler: SamplerConfig | dict | None = None, filter: str = "hardmax", keep_fraction: float = 0.6,
                 temperature: float = 0.05, pool_size: int | None = None, refresh_every: int | None = None,
                 max_episode_steps: int | None = 1000, start_states: str = "episode_starts",
                 deviation_threshold: float = 1.0, on_deviation: str = "replan", on_plan_end: str = "replan",
                 action_tolerance: float = 1e-5, autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 device: str = "cpu", dynamics_mode: str = "elite_mean", render_mode: str | None = None):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        for name, value in (("on_deviation", on_deviation), ("on_plan_end", on_plan_end)):
            if value not in ("replan", "truncate"):
                raise ValueError(f"{name} must be 'replan' or 'truncate', got '{value}'")
        if start_states not in ("episode_starts", "any"):
            raise ValueError(f"start_states must be 'episode_starts' or 'any', got '{start_states}'")
        if render_mode is not None:
            raise ValueError("DydiffEnv does not render (the learned state has no x position); use render_mode=None")
        self.bundle = resolve_bundle(bundle, task, device)
        self.task = self.bundle.task
        if num_iterations > 0:
            self.bundle.require("diffusion")
        self.num_envs = int(num_envs)
        real = gym.make(self.task.env_id)
        self.single_observation_space = real.observation_space
        self.single_action_space = real.action_space
        real.close()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.autoreset_mode = parse_autoreset_mode(autoreset_mode)
        self.metadata = {"autoreset_mode": self.autoreset_mode, "render_modes": []}
        self.render_mode = None

        window = self.bundle.diffusion.horizon if self.bundle.diffusion is not None else None
        self.horizon = horizon or (max(1, 3 * window // 4) if window else 32)
        self.num_iterations = num_iterations
        self.sampler = SamplerConfig(**sampler) if isinstance(sampler, dict) else (sampler or self.bundle.config.sampler)
        self.filter = FilterConfig(filter, keep_fraction, temperature)
        self.pool_size = pool_size or max(self.num_envs, 16)
        self.refresh_every = refresh_every
        self.max_episode_steps = max_episode_steps
        self.start_states = start_states
        self.deviation_threshold = deviation_threshold
        self.on_deviation, self.on_plan_end = on_deviation, on_plan_end
        self.action_tolerance = action_tolerance
        self.dynamics_mode = dynamics_mode
        self.obs_std = torch.as_tensor(self.bundle.normalizer("obs").std, device=self.bundle.device)
        self._obs_dtype = self.single_observation_space.dtype
        self._low = torch.as_tensor(self.single_action_space.low, dtype=torch.float32)
        self._high = torch.as_tensor(self.single_action_space.high, dtype=torch.float32)

        self._policy = None
        self._policy_source = None
        self.set_policy(policy)
        self._generator = torch.Generator()
        self._pool = None  # (RolloutResult of kept plans, next index)
        self._served_since_refresh = 0
        n, h, d, a = self.num_envs, self.horizon, self.bundle.obs_dim, self.bundle.act_dim
        dev = self.bundle.device
        self._plan_obs = torch.zeros(n, h + 1, d, device=dev)  # s_0 .. s_H
        self._plan_actions = torch.zeros(n, h, a, device=dev)
        self._plan_rewards = torch.zeros(n, h, device=dev)
        self._plan_len = torch.zeros(n, dtype=torch.long)  # valid transitions in each plan
        self._plan_return = torch.zeros(n, device=dev)
        self._plan_disagreement = torch.zeros(n, h, device=dev)
        self._t = torch.zeros(n, dtype=torch.long)
        self._x = torch.zeros(n, d, device=dev)  # current observation (float32)
        self._on_plan = torch.ones(n, dtype=torch.bool)
        self._elapsed = np.zeros(n, dtype=np.int64)
        self._needs_reset = np.zeros(n, dtype=bool)
        self._started = False
        self.stats = {"replans": 0, "pool_generations": 0, "nonfinite": 0, "clipped_actions": 0}

    # ------------------------------------------------------------------------------------------ policy handle

    def set_policy(self, policy: Any = None, input: str = "auto") -> None:
        """Set the policy whose DyDiff rollouts fill the pool (callable on numpy batches, torch module, SB3 or
        Tianshou policy, or an agent with `actor_fn()`); None means the bundle's behaviour-cloning policy.
        The pool is regenerated with it at the next reset."""
        self._policy_source = policy
        if policy is None:
            self.bundle.require("bc")
            self._policy = None  # built from the env's generator at use, so seeding covers it
        else:
            self._policy = as_policy(policy, input=input)
        self._pool = None

    def _planning_policy(self):
        return self._policy if self._policy is not None else behaviour_policy(self.bundle, self._generator)

    # --------------------------------------------------------------------------------------------------- plans

    def _rollout(self, start_obs: torch.Tensor, filter: FilterConfig):
        return dydiff_rollout(self.bundle, start_obs, self._planning_policy(), horizon=self.horizon,
                              num_iterations=self.num_iterations, sampler=self.sampler, filter=filter,
                              generator=self._generator, dynamics_mode=self.dynamics_mode)

    def sample_start_obs(self, count: int, rng: np.random.Generator | None = None, start_states: str | None = None) -> torch.Tensor:
        """`count` dataset observations to start plans from ("episode_starts" or "any", default: the env's)."""
        starts = self.bundle.start_states
        if not starts:
            raise BundleError(f"bundle {self.bundle.path} stores no start states; re-train or re-export it")
        mode = start_states or self.start_states
        rows = np.flatnonzero(starts["is_episode_start"]) if mode == "episode_starts" else None
        if rows is None or len(rows) == 0:
            rows = np.arange(len(starts["observations"]))
        pick = rows[(rng or self.np_random).integers(0, len(rows), size=count)]
        return torch.as_tensor(starts["observations"][pick], device=self.bundle.device)

    def rollout(self, num_starts: int, policy: Any = None, start_obs: torch.Tensor | np.ndarray | None = None,
                rng: np.random.Generator | None = None, start_states: str = "any"):
        """One batched DyDiff rollout with this env's settings (horizon, iterations, sampler, filter), from
        `start_obs` or `num_starts` dataset states. For agents that fill a model replay buffer directly
        (`result.transitions()`), as the reference does every K gradient steps. `policy` defaults to the
        env's policy handle."""
        if rng is not None:
            self._generator.manual_seed(int(rng.integers(0, 2**63 - 1)))
        if start_obs is None:
            start_obs = self.sample_start_obs(num_starts, rng, start_states)
        plan_policy = as_policy(policy) if policy is not None else self._planning_policy()
        return dydiff_rollout(self.bundle, start_obs, plan_policy, horizon=self.horizon,
                              num_iterations=self.num_iterations, sampler=self.sampler, filter=self.filter,
                              generator=self._generator, dynamics_mode=self.dynamics_mode)

    def _generate_pool(self) -> None:
        count = int(np.ceil(self.pool_size / self.filter.keep_fraction)) if self.filter.mode != "none" else self.pool_size
        result = self._rollout(self.sample_start_obs(count), self.filter)
        kept = torch.nonzero(result.kept).flatten().cpu().numpy()
        self.np_random.shuffle(kept)
        self._pool = (result.select(torch.as_tensor(kept)), 0)
        self._served_since_refresh = 0
        self.stats["pool_generations"] += 1

    def _assign(self, env_ids: np.ndarray, plans, first: int = 0) -> None:
        """Give sub-envs `env_ids` the plans `plans[first : first + len(env_ids)]`, starting at their s_0."""
        idx = torch.arange(first, first + len(env_ids))
        ids = torch.as_tensor(env_ids)
        obs, next_obs = plans.obs[idx], plans.next_obs[idx]
        self._plan_obs[ids] = torch.cat([obs[:, :1], next_obs], 1)
        self._plan_actions[ids] = plans.actions[idx]
        self._plan_rewards[ids] = plans.rewards[idx]
        # a plan ends after its last valid transition (its predicted termination or the horizon)
        self._plan_len[ids] = plans.valid[idx].sum(1).cpu()
        self._plan_return[ids] = plans.returns[idx]
        self._plan_disagreement[ids] = plans.disagreement[idx]
        self._t[ids] = 0
        self._x[ids] = obs[:, 0]
        self._on_plan[ids] = True

    def _start_episodes(self, env_ids: np.ndarray) -> None:
        if len(env_ids) == 0:
            return
        if self._pool is None or (self.refresh_every is not None and self._served_since_refresh >= self.refresh_every):
            self._generate_pool()
        plans, nxt = self._pool
        if nxt + len(env_ids) > len(plans):
            self._generate_pool()
            plans, nxt = self._pool
            while len(plans) < len(env_ids):  # a pool smaller than the request: keep generating
                self._generate_pool()
                more, _ = self._pool
                plans = type(plans)(*(torch.cat([getattr(plans, f), getattr(more, f)]) for f in plans.__dataclass_fields__))
                self._pool = (plans, 0)
        self._assign(env_ids, plans, nxt)
        self._pool = (plans, nxt + len(env_ids))
        self._elapsed[env_ids] = 0
        self._needs_reset[env_ids] = False

    def _replan(self, env_ids: np.ndarray, from_obs: torch.Tensor) -> None:
        plans = self._rollout(from_obs, FilterConfig("none"))
        self._assign(env_ids, plans)
        self.stats["replans"] += len(env_ids)

    # ------------------------------------------------------------------------------------------- gym interface

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if seed is not None:
            if isinstance(seed, (list, tuple)):
                seed = int(np.random.SeedSequence([int(s) for s in seed if s is not None]).generate_state(1)[0])
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self._pool = None  # same seed, same observations: the pool is regenerated from the new seed
        self._generator.manual_seed(int(self.np_random.integers(0, 2**63 - 1)))
        mask = None if options is None else options.get("reset_mask")
        if mask is None:
            env_ids = np.arange(self.num_envs)
        else:
            mask = np.asarray(mask)
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},), "
                                 f"got {mask.dtype} {mask.shape}")
            if not self._started and not mask.all():
                raise ValueError("the first reset must reset every sub-env (omit reset_mask)")
            env_ids = np.flatnonzero(mask)
        self._start_episodes(env_ids)
        self._started = True
        infos: dict[str, Any] = {}
        if len(env_ids):
            infos["plan_return"] = np.zeros(self.num_envs, dtype=np.float64)
            infos["plan_return"][env_ids] = self._plan_return[torch.as_tensor(env_ids)].cpu().numpy()
            infos["_plan_return"] = np.zeros(self.num_envs, dtype=bool)
            infos["_plan_return"][env_ids] = True
        return self._observations(), infos

    def reset_to(self, start_obs: torch.Tensor | np.ndarray, *, seed: int | None = None):
        """Start every sub-env at the given observations (num_envs, obs_dim) instead of dataset states, each
        with a fresh plan from its start (the policy handle, no filter). Returns (obs, infos) like `reset`.
        For evaluations that compare the env with the real simulator from the same states."""
        start = torch.as_tensor(np.asarray(start_obs) if not isinstance(start_obs, torch.Tensor) else start_obs,
                                dtype=torch.float32).to(self.bundle.device)
        if start.shape != (self.num_envs, self.bundle.obs_dim):
            raise ValueError(f"start_obs must have shape ({self.num_envs}, {self.bundle.obs_dim}), got {tuple(start.shape)}")
        if not torch.isfinite(start).all():
            raise ValueError("start_obs contains NaN or inf")
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        self._generator.manual_seed(int(self.np_random.integers(0, 2**63 - 1)))
        env_ids = np.arange(self.num_envs)
        self._assign(env_ids, self._rollout(start, FilterConfig("none")))
        self._elapsed[env_ids] = 0
        self._needs_reset[env_ids] = False
        self._started = True
        infos = {"plan_return": self._plan_return.cpu().numpy().astype(np.float64),
                 "_plan_return": np.ones(self.num_envs, dtype=bool)}
        return self._observations(), infos

    def _observations(self) -> np.ndarray:
        return self._x.cpu().numpy().astype(self._obs_dtype, copy=True)

    def _check_actions(self, actions) -> tuple[torch.Tensor, np.ndarray]:
        arr = actions.detach().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        expected = (self.num_envs, *self.single_action_space.shape)
        if arr.shape != expected:
            hint = " (a single env's action? wrap it as a batch: actions[None])" if arr.shape == expected[1:] else ""
            raise ValueError(f"actions must have shape {expected}, got {arr.shape}{hint}")
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ValueError(f"actions must be real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr).all(1))
            raise ValueError(f"actions of sub-envs {bad.tolist()} contain NaN or inf; check the agent's outputs")
        act = torch.as_tensor(arr)
        clipped = torch.maximum(torch.minimum(act, self._high), self._low)
        clip_count = (clipped != act).sum(1).numpy()
        return clipped.to(self.bundle.device), clip_count

    def step(self, actions):
        if not self._started:
            raise RuntimeError("call reset() before step()")
        act, clip_count = self._check_actions(actions)
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float64)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        info_values = {k: np.zeros(n, dtype=np.float64 if k in ("deviation", "disagreement", "plan_return") else
                                   (np.int64 if k == "clipped_actions" else bool)) for k in INFO_KEYS}
        reset_now = np.zeros(n, dtype=bool)

        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self._needs_reset.any():
            reset_now = self._needs_reset.copy()
            self._start_episodes(np.flatnonzero(reset_now))
        elif self.autoreset_mode == AutoresetMode.DISABLED and self._needs_reset.any():
            raise RuntimeError(f"sub-envs {np.flatnonzero(self._needs_reset).tolist()} are done; reset them with "
                               "reset(options={'reset_mask': mask}) before stepping (autoreset_mode=DISABLED)")
        elif self.autoreset_mode == AutoresetMode.SAME_STEP and self._needs_reset.any():
            raise RuntimeError("internal error: SAME_STEP sub-envs left done")  # they are reset inside step
        active = np.flatnonzero(~reset_now)
        if len(active):
            self._advance(active, act, rewards, terminated, truncated, info_values)
            info_values["clipped_actions"][active] = clip_count[active]
            self.stats["clipped_actions"] += int(clip_count[active].sum())
            self._served_since_refresh += len(active)

        obs = self._observations()
        done = terminated | truncated
        infos: dict[str, Any] = {}
        for key in INFO_KEYS:
            infos[key] = info_values[key]
            infos[f"_{key}"] = ~reset_now
        if self.autoreset_mode == AutoresetMode.SAME_STEP and done.any():
            # as Gymnasium's SyncVectorEnv: the step's info goes to final_info, the reset's info takes its place
            done_ids = np.flatnonzero(done)
            final_obs = np.full(n, None, dtype=object)
            for i in done_ids:
                final_obs[i] = obs[i].copy()
            final_info = {k: v.copy() for k, v in infos.items()}
            for key in INFO_KEYS:
                final_info[f"_{key}"] &= done
                infos[f"_{key}"] &= ~done
            self._start_episodes(done_ids)
            obs = self._observations()
            self._add_reset_info(infos, done_ids)
            infos["final_obs"], infos["_final_obs"] = final_obs, done.copy()
            infos["final_info"], infos["_final_info"] = final_info, done.copy()
        else:
            self._needs_reset |= done
        if reset_now.any():  # NEXT_STEP: the reset sub-envs report their reset info
            self._add_reset_info(infos, np.flatnonzero(reset_now))
        return obs, rewards, terminated, truncated, infos

    def _add_reset_info(self, infos: dict, env_ids: np.ndarray) -> None:
        infos["plan_return"][env_ids] = self._plan_return[torch.as_tensor(env_ids)].cpu().numpy()
        infos["_plan_return"][env_ids] = True

    @torch.no_grad()
    def _advance(self, ids: np.ndarray, act: torch.Tensor, rewards, terminated, truncated, info_values) -> None:
        """One transition for the sub-envs `ids` (see the module docstring for the rule)."""
        tid = torch.as_tensor(ids)
        t = self._t[tid]
        x, a = self._x[tid], act[tid]
        plan_s, plan_a = self._plan_obs[tid, t], self._plan_actions[tid, t]
        plan_next = self._plan_obs[tid, t + 1]
        exact = self._on_plan[tid] & ((a - plan_a).abs().amax(1) <= self.action_tolerance).cpu()
        next_obs = plan_next.clone()
        reward = self._plan_rewards[tid, t].clone()
        disagreement = self._plan_disagreement[tid, t].clone()  # on plan: the rollout's own figure
        off = torch.nonzero(~exact).flatten()
        if len(off):
            both_s = torch.cat([x[off], plan_s[off]])
            both_a = torch.cat([a[off], plan_a[off]])
            pred, spread = self.bundle.dynamics.predict(both_s, both_a, mode="mean")
            response = pred[: len(off)] - pred[len(off):]
            next_obs[off] = plan_next[off] + response
            reward[off] = self.bundle.reward(x[off], a[off])
            disagreement[off] = spread[: len(off)]
        deviation = ((next_obs - plan_next) / self.obs_std).pow(2).mean(1).sqrt()
        finite = torch.isfinite(next_obs).all(1) & torch.isfinite(reward)
        term = torch.as_tensor(self.task.terminated(next_obs)) & finite
        # a non-finite model output ends the episode; the agent sees its last observation again
        next_obs = torch.where(finite[:, None], next_obs, x)
        reward = torch.where(finite, reward, torch.zeros_like(reward))
        self._x[tid] = next_obs
        self._on_plan[tid] = exact.to(self._on_plan.device)
        self._t[tid] = t + 1
        self._elapsed[ids] += 1

        term_np, finite_np = term.cpu().numpy(), finite.cpu().numpy()
        trunc_np = ~finite_np
        if self.max_episode_steps is not None:
            trunc_np |= self._elapsed[ids] >= self.max_episode_steps
        alive = ~term_np & ~trunc_np
        plan_over = (self._t[tid] >= self._plan_len[tid]).numpy()
        drifted = (deviation > self.deviation_threshold).cpu().numpy()
        need_plan = alive & ((plan_over & (self.on_plan_end == "replan")) | (drifted & (self.on_deviation == "replan")))
        trunc_np |= alive & ((plan_over & (self.on_plan_end == "truncate")) | (drifted & (self.on_deviation == "truncate")))
        replan_ids = ids[need_plan & ~trunc_np]
        if len(replan_ids):
            self._replan(replan_ids, self._x[torch.as_tensor(replan_ids)])

        rewards[ids] = reward.cpu().numpy().astype(np.float64)
        terminated[ids] = term_np
        truncated[ids] = trunc_np
        info_values["deviation"][ids] = deviation.cpu().numpy()
        info_values["disagreement"][ids] = disagreement.cpu().numpy()
        info_values["plan_return"][ids] = self._plan_return[tid].cpu().numpy()
        info_values["replanned"][replan_ids] = True
        info_values["on_plan"][ids] = exact.numpy()
        info_values["nonfinite"][ids] = ~finite_np
        self.stats["nonfinite"] += int((~finite_np).sum())

    def close_extras(self, **kwargs) -> None:
        self._pool = None


class DydiffSingleEnv(gym.Env):
    """A single-environment `gymnasium.Env` view of `DydiffEnv` (what `gymnasium.make` returns)."""

    metadata = {"render_modes": []}

    def __init__(self, **kwargs):
        kwargs.pop("num_envs", None)
        kwargs["autoreset_mode"] = AutoresetMode.DISABLED
        self.vector_env = DydiffEnv(num_envs=1, **kwargs)
        self.observation_space = self.vector_env.single_observation_space
        self.action_space = self.vector_env.single_action_space
        self._needs_reset = True

    @property
    def bundle(self) -> Bundle:
        return self.vector_env.bundle

    def set_policy(self, policy: Any = None, input: str = "auto") -> None:
        self.vector_env.set_policy(policy, input)

    @staticmethod
    def _unbatch(infos: dict) -> dict:
        return {k: (v[0].item() if isinstance(v[0], np.generic) else v[0]) for k, v in infos.items()
                if not k.startswith("_") and infos.get(f"_{k}", np.ones(1, bool))[0]}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or not self.vector_env._started:
            # share one RNG: the single env's np_random seeds the vector env's generators
            self.vector_env._np_random = self.np_random
            self.vector_env._pool = None if seed is not None else self.vector_env._pool
        obs, infos = self.vector_env.reset(options=options)
        self._needs_reset = False
        return obs[0], self._unbatch(infos)

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (the episode has ended or never started)")
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        obs, reward, terminated, truncated, infos = self.vector_env.step(action[None])
        self._needs_reset = bool(terminated[0] or truncated[0])
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), self._unbatch(infos)


def make_env(**kwargs) -> DydiffSingleEnv:
    """`gymnasium.make` entry point."""
    kwargs.pop("render_mode", None)
    return DydiffSingleEnv(**kwargs)


def make_vector_env(num_envs: int = 1, **kwargs) -> DydiffEnv:
    """`gymnasium.make_vec(..., vectorization_mode="vector_entry_point")` entry point."""
    kwargs.pop("render_mode", None)
    return DydiffEnv(num_envs=num_envs, **kwargs)
