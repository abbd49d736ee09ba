"""DydiffEnv: a learned simulator served as a vectorised Gymnasium environment.

    import gymnasium, dydiff_env
    env = gymnasium.make_vec("Dydiff-hopper-v0", num_envs=64, vectorization_mode="vector_entry_point")
    env.set_policy(my_actor)          # optional: the policy whose DyDiff plans the env serves
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(actions)

Two modes per sub-env (`info["mode"]`):
- "plan": the sub-env follows a *plan*, one DyDiff trajectory of the policy handle (states, actions, rewards
  labelled by the rollout). While the agent's action equals the plan's (max abs difference <=
  `action_tolerance`), the env serves the plan's transition unchanged, bit for bit: an agent whose actor is
  the handle sees exactly the DyDiff rollouts the paper trains on.
- "model": from the first action that leaves the plan (or in an episode that has none) the sub-env is
  stepped by the single-step ensemble from its actual state and action, batched over all such sub-envs in
  one call: next = f(s, a) (`model_dynamics`), reward = r(s, a) - `uncertainty_penalty` * disagreement,
  truncated when the disagreement exceeds `max_disagreement`. This is Markov: the next state depends on
  (s, a) alone, not on which plan the sub-env was on. A sub-env stays in this mode until its episode ends:
  its agent does not act as the handle, so a plan of the handle from its state would be left again at once.

Where plans come from. A plan costs a diffusion run, so no sub-env ever waits for one of its own:
- The pool: episodes start from plans generated in batches from dataset states and filtered by predicted
  return (`filter`, default hardmax 60 %). The filter chooses among start states, so it applies to pool
  plans only; a plan that has to start where the agent already is (below) is kept whatever its return.
  Every rollout call for plans also tops the pool up to `pool_size` kept plans in the same batch, so episode
  starts rarely wait for a pool call of their own (a call's fixed cost, its sequential steps, is most of
  its time at the sizes of continuation batches).
- Continuations: an on-plan sub-env's plan-end state is known as soon as its plan is assigned, so its next
  plan is queued then and generated ahead. The queue is served by one batched rollout when the first queued
  sub-env reaches the last step of its plan, or together with a pool generation or first plans: an agent
  that follows its plans waits only for amortised batched calls.
- `plans="auto"` (the default): without a policy handle no plans are served (the bundle's behaviour policy
  is stochastic, so no agent could follow its plans). With a handle, episodes start at dataset states
  without plans until an agent shows that it acts as the handle: at an episode's first step the env compares
  the agent's action with the handle's. The sub-envs that match get their first plans in one batched call
  (from their start states) and the pool is switched on for later episodes; after `pool_size` pool-plan
  episodes in a row whose first action left the plan, it is switched off again. So random, SAC or noisy
  TD3 agents never wait for a diffusion run, and an agent whose actor is the handle gets DyDiff plans.
- `plans="always"`: every episode starts from a pool plan (the behaviour policy plans when no handle is
  set); `plans="never"`: the single-step model only.

Rewards come from the reward model, `terminated` from the task's termination rule on the next state,
`truncated` from `max_episode_steps`, `max_disagreement`, and model output that is non-finite or diverged
(a state more than `max_state_std` dataset stds from the dataset mean). Such a sub-env repeats its previous
observation with reward 0 and is flagged in `info["nonfinite"]` or `info["diverged"]`, so the env never emits
NaN, inf or a runaway state. Finite out-of-bound actions are clipped and counted (`info["clipped_actions"]`);
NaN/inf actions or actions of the wrong shape raise `ValueError`.

`step` and `reset` are atomic: the next state, re-plans included, is built beside the current one and
replaces it only when the call succeeds; the random generators and counters are restored when anything
raises (a policy handle failing during a re-plan, say), so the env is exactly as it was before the call.

Rendering (`render_mode="rgb_array"` or `"human"`): each sub-env's observation is drawn through one real MuJoCo
env of the task (`dydiff_env.render`); the root's x position, which observations leave out, is integrated from
the observed x velocity since the episode's start and kept with the rest of the state (`EnvState.x_position`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from .bundle import Bundle, BundleError, load_bundle
from .config import EnvConfig, FilterConfig
from .policies import as_policy
from .render import DEFAULT_SIZE, RENDER_MODES, StateRenderer, available_render_modes, check_render_mode, integrate_x
from .rollout import RolloutResult, behaviour_policy, call_policy, dydiff_rollout, filter_trajectories, runaway
from .tasks import get_task

SHIPPED_BUNDLES = Path(__file__).parent / "assets" / "bundles"
# every key a step's info has (with Gymnasium's `_key` masks), and its value where a sub-env does not set it
INFO_DEFAULTS = {"mode": "", "disagreement": 0.0, "plan_return": 0.0, "replanned": False, "clipped_actions": 0,
                 "nonfinite": False, "diverged": False}
INFO_KEYS = tuple(INFO_DEFAULTS)
STAT_KEYS = ("plan_steps", "model_steps", "rollout_calls", "pool_generations", "pool_plans", "first_plans",
             "replans", "uncertain", "nonfinite", "diverged", "clipped_actions")


def default_plan_horizon(window: int | None) -> int:
    """The env's plan length for a diffusion window of `window` rows (None: a bundle without one): the whole
    window, every row with a next state. With the env's default refinement rule, plans of 63 steps were as
    faithful to MuJoCo as plans of 48 continued by a re-plan, up to 191 steps, for three policies on Hopper and
    TD3+BC on Walker2d and HalfCheetah (docs/throughput.md); they need a quarter fewer re-plans, which are what
    an agent that follows its plans waits for. `dydiff_rollout` keeps three quarters (`rollout.default_horizon`),
    for the paper's rule."""
    return window - 1 if window else 32


def shipped_bundle_path(task: str) -> Path:
    return SHIPPED_BUNDLES / task


def resolve_bundle(bundle: str | Path | Bundle | None, task: str | None, device: str | torch.device = "cpu") -> Bundle:
    """The bundle to serve: a loaded one, a directory, or (None) the one shipped for `task`. `task`, when given,
    must be the bundle's; None takes the bundle's task (Hopper when no bundle is given either)."""
    if isinstance(bundle, Bundle):
        if task is not None and bundle.task.name != get_task(task).name:
            raise BundleError(f"bundle {bundle.path} models {bundle.task.env_id}, not {get_task(task).env_id}")
        bundle.require("dynamics", "reward")  # as load_bundle does for a path: fail here, not at reset
        return bundle.to(device)
    if bundle is None:
        task = task or "hopper"
        path = shipped_bundle_path(get_task(task).name)
        if not (path / "config.json").is_file():
            t = get_task(task)
            raise BundleError(
                f"no pretrained bundle ships for '{t.name}' in this installation. Train one: `dydiff-env collect "
                f"{t.name}-medium` (or use any local Minari dataset of {t.env_id}), then `dydiff-env train all "
                f"--dataset {t.dataset_id('medium')} --out DIR --preset cpu`, and pass bundle=DIR")
        bundle = path
    return load_bundle(bundle, env_id=task and get_task(task).env_id, device=device, require=("dynamics", "reward"))


@dataclass(frozen=True)
class Plans:
    """One plan per row: states s_0..s_H, then actions, rewards and ensemble disagreement per transition, the
    number of valid transitions (up to the predicted termination) and the predicted return."""

    obs: torch.Tensor  # (B, H + 1, obs_dim)
    actions: torch.Tensor  # (B, H, act_dim)
    rewards: torch.Tensor  # (B, H)
    disagreement: torch.Tensor  # (B, H)
    length: torch.Tensor  # (B,) long
    returns: torch.Tensor  # (B,)

    @classmethod
    def empty(cls, count: int, horizon: int, obs_dim: int, act_dim: int, device) -> "Plans":
        def zeros(*shape):
            return torch.zeros(*shape, device=device)

        return cls(zeros(count, horizon + 1, obs_dim), zeros(count, horizon, act_dim), zeros(count, horizon),
                   zeros(count, horizon), torch.zeros(count, dtype=torch.long, device=device), zeros(count))

    @classmethod
    def from_rollout(cls, result: RolloutResult) -> "Plans":
        return cls(torch.cat([result.obs[:, :1], result.next_obs], 1), result.actions, result.rewards,
                   result.disagreement, result.valid.sum(1), result.returns)

    def __len__(self) -> int:
        return self.obs.shape[0]

    def take(self, index) -> "Plans":
        return Plans(*(getattr(self, f.name)[index] for f in fields(self)))

    def put(self, rows: torch.Tensor, other: "Plans") -> "Plans":
        """A copy with `rows` replaced by `other`'s plans (out of place: this object stays as it was)."""
        return Plans(*(getattr(self, f.name).index_put((rows,), getattr(other, f.name)) for f in fields(self)))

    def cat(self, other: "Plans") -> "Plans":
        return Plans(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


@dataclass
class EnvState:
    """Everything `step` and `reset` change. A call works on a copy (`working_copy`) and the env keeps the copy
    only when the call succeeds; tensors are only ever replaced, never written in place, so the copy can
    share them."""

    obs: torch.Tensor  # (n, obs_dim) the current observations
    plan: Plans  # each sub-env's plan; meaningful where on_plan
    t: np.ndarray  # (n,) the plan step each sub-env is at
    on_plan: np.ndarray  # (n,) bool: "plan" mode
    next_plan: Plans  # continuations generated ahead
    has_next: np.ndarray  # (n,) bool: next_plan holds this sub-env's continuation
    wants_next: np.ndarray  # (n,) bool: queued for a continuation
    probing: np.ndarray  # (n,) bool: a planless auto-mode episode whose first step is still to come
    pool_start: np.ndarray  # (n,) bool: a pool-plan episode whose first step is still to come
    elapsed: np.ndarray  # (n,) steps taken in the current episode
    needs_reset: np.ndarray  # (n,) bool: done, waiting for an autoreset or reset(options={"reset_mask": ...})
    # (n,) float64: the root's x position, which observations leave out; integrated from the observed x velocity
    # from 0 at each episode start, for rendering only
    x_position: np.ndarray
    pool: Plans | None = None  # kept pool plans not yet served, in serving order
    pool_on: bool = False
    pool_misses: int = 0  # pool-plan episodes in a row whose first action left the plan
    served_since_refresh: int = 0

    def working_copy(self) -> "EnvState":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).copy() for f in fields(self)
                                            if isinstance(getattr(self, f.name), np.ndarray)})


class DydiffEnv(gym.vector.VectorEnv):
    """`num_envs` sub-environments of a learned model bundle (see the module docstring).

    Args:
        num_envs: number of sub-environments.
        bundle: a bundle directory, a loaded `Bundle`, or None for the bundle shipped for `task`.
        policy: the policy handle (see `set_policy`); None: no handle.
        config: an `EnvConfig`; keyword arguments override its fields (`gymnasium.make` passes them so).
        task: "hopper", "walker2d", "halfcheetah"; must match the bundle. None (the default): the bundle's task,
            or Hopper's shipped bundle when no bundle is given.
        render_mode: None, "rgb_array" (`render()` returns one (height, width, 3) uint8 frame per sub-env) or
            "human" (a window shows sub-env 0 after every reset and step; needs a display). The model's state is
            drawn through MuJoCo, with the unobserved x position integrated from the observed x velocity.
        width, height: frame size in pixels.
    """

    def __init__(self, num_envs: int = 1, bundle: str | Path | Bundle | None = None, policy: Any = None,
                 config: EnvConfig | None = None, *, task: str | None = None, render_mode: str | None = None,
                 width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE, **overrides):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        check_render_mode(render_mode)
        self.config = cfg = EnvConfig.from_kwargs(config, **overrides)
        self.bundle = resolve_bundle(bundle, task, cfg.device)
        self.task = self.bundle.task
        if cfg.plans != "never" and cfg.num_iterations > 0:
            self.bundle.require("diffusion")
        self.num_envs = int(num_envs)
        real = gym.make(self.task.env_id)
        self.single_observation_space = real.observation_space
        self.single_action_space = real.action_space
        real.close()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.autoreset_mode = AutoresetMode(cfg.autoreset_mode)
        self.metadata = {"autoreset_mode": self.autoreset_mode, "render_modes": available_render_modes(),
                         "render_fps": self.task.render_fps}
        self.render_mode = render_mode
        self._renderer = None if render_mode is None else StateRenderer(self.task, render_mode, width, height)

        window = self.bundle.diffusion.horizon if self.bundle.diffusion is not None else None
        self.horizon = cfg.horizon or default_plan_horizon(window)
        if cfg.plans != "never" and cfg.num_iterations > 0 and self.horizon > window - 1:
            raise ValueError(f"horizon must be at most {window - 1} for this bundle's diffusion window of {window}")
        if cfg.plans != "never" and cfg.num_iterations > 0:
            cfg.refine.check_horizon(self.horizon)  # at construction, not at the first plan
        self.sampler = cfg.sampler or self.bundle.config.sampler
        if cfg.plans != "never" and cfg.num_iterations > 0 and self.sampler.kind == "student":
            self.bundle.student_sigmas(self.sampler.num_steps)  # a student that can take num_steps, checked now
        self.pool_size = cfg.pool_size or max(self.num_envs, 16)
        self.max_episode_steps = cfg.max_episode_steps
        self._obs_dtype = self.single_observation_space.dtype
        self._low = self.single_action_space.low.astype(np.float64)
        self._high = self.single_action_space.high.astype(np.float64)
        self._generator = torch.Generator()
        obs_norm = self.bundle.normalizer("obs")  # the divergence guard's scale
        self._obs_mean = torch.as_tensor(obs_norm.mean, dtype=torch.float32, device=self.bundle.device)
        self._obs_std = torch.as_tensor(obs_norm.std, dtype=torch.float32, device=self.bundle.device)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._state = self._initial_state()
        self._started = False
        self.set_policy(policy)

    # ------------------------------------------------------------------------------------------ policy handle

    def set_policy(self, policy: Any = None, input: str = "auto") -> None:
        """Set the policy whose DyDiff plans the env serves: a callable on numpy batches, a torch module, an
        SB3 or Tianshou policy, or an agent with `actor_fn()`. None: no handle (`plans="always"` then plans
        with the bundle's behaviour-cloning policy). The pool is regenerated with the new handle."""
        self._policy = None if policy is None else as_policy(policy, input=input)
        self._policy_source = policy
        if policy is None and self.config.plans == "always":
            self.bundle.require("bc")
        self._state = dataclasses.replace(self._state, pool=None, pool_on=self.config.plans == "always",
                                          pool_misses=0)

    @property
    def started(self) -> bool:
        """Whether `reset` was called."""
        return self._started

    def _planning_policy(self):
        return self._policy if self._policy is not None else behaviour_policy(self.bundle, self._generator)

    def _probes(self) -> bool:
        """Whether planless episodes check if their agent acts as the handle (auto mode with a handle)."""
        return self.config.plans == "auto" and self._policy is not None

    # ---------------------------------------------------------------------------------------------- rollouts

    def rollout(self, num_starts: int, policy: Any = None, start_obs: torch.Tensor | np.ndarray | None = None,
                rng: np.random.Generator | None = None, start_states: str = "any") -> RolloutResult:
        """One batched DyDiff rollout with this env's settings (horizon, iterations, sampler, filter), from
        `start_obs` or `num_starts` dataset states (a `start_states` mode of `EnvConfig`). For agents that fill a model
        replay buffer directly (`result.transitions()`), as the reference does every K gradient steps.
        `policy` defaults to the env's policy handle (the behaviour policy without one)."""
        if rng is not None:
            self._generator.manual_seed(int(rng.integers(0, 2**63 - 1)))
        if start_obs is None:
            start_obs = self.bundle.sample_start_obs(num_starts, rng or self.np_random, start_states)
        plan_policy = as_policy(policy) if policy is not None else self._planning_policy()
        return self._dydiff(start_obs, plan_policy, self.config.filter)

    def _dydiff(self, start_obs, policy, filter_config: FilterConfig) -> RolloutResult:
        """`dydiff_rollout` with this env's horizon, iterations, sampler, generator, ensemble mode and precision."""
        return dydiff_rollout(self.bundle, start_obs, policy, horizon=self.horizon,
                              num_iterations=self.config.num_iterations, sampler=self.sampler,
                              filter=filter_config, generator=self._generator,
                              dynamics_mode=self.config.rollout_dynamics, refine=self.config.refine,
                              precision=self.config.precision, max_state_std=self.config.max_state_std)

    def _generate(self, s: EnvState, first_ids: np.ndarray | None = None, pool_count: int = 0) -> None:
        """One batched DyDiff rollout for everything pending in `s`: first plans for the sub-envs `first_ids`
        (from where they are), the continuations of every queued sub-env, and, when `pool_count` > 0, pool
        candidates from dataset states of which the filter keeps at least `pool_count` (added to the pool)."""
        first_ids = np.zeros(0, np.int64) if first_ids is None else first_ids
        queued = np.flatnonzero(self._due_continuations(s))
        q = torch.as_tensor(queued)
        plan_ends = s.plan.obs[q, s.plan.length[q]]
        fixed = torch.cat([s.obs[torch.as_tensor(first_ids, dtype=torch.long)], plan_ends])
        keep = self.config.filter.keep_fraction if self.config.filter.mode != "none" else 1.0
        candidates = math.ceil(pool_count / keep - 1e-9) if pool_count else 0
        if len(fixed) + candidates == 0:
            return
        starts = fixed
        if candidates:
            drawn = self.bundle.sample_start_obs(candidates, self.np_random, self.config.start_states)
            starts = torch.cat([fixed, drawn])
        result = self._dydiff(starts, self._planning_policy(), FilterConfig("none"))
        plans = Plans.from_rollout(result)
        first = len(first_ids)
        if first:
            self._assign(s, first_ids, plans.take(slice(0, first)))
        if len(queued):
            s.next_plan = s.next_plan.put(q, plans.take(slice(first, len(fixed))))
            s.has_next[queued], s.wants_next[queued] = True, False
        if candidates:
            rest = result.select(slice(len(fixed), None))
            kept = torch.nonzero(filter_trajectories(rest.returns, self.config.filter, self._generator)).flatten()
            order = kept.cpu().numpy()
            self.np_random.shuffle(order)
            fresh = Plans.from_rollout(rest.select(torch.as_tensor(order)))
            if s.pool is None or len(s.pool) == 0:  # a new pool; a top-up keeps the age of the one it adds to
                s.pool, s.served_since_refresh = fresh, 0
            else:
                s.pool = s.pool.cat(fresh)
            self.stats["pool_generations"] += 1
            self.stats["pool_plans"] += len(fresh)
        self.stats["rollout_calls"] += 1
        self.stats["first_plans"] += first
        self.stats["replans"] += len(queued)

    def _pool_shortfall(self, s: EnvState) -> int:
        """How many kept plans the pool lacks (0 while it is off). Every rollout call for plans tops the pool up
        in the same batch: a separate pool call would pay again the fixed cost of a rollout (its sequential
        single-step steps), which dominates at the batch sizes of continuations."""
        return max(0, self.pool_size - (len(s.pool) if s.pool is not None else 0)) if s.pool_on else 0

    def _due_continuations(self, s: EnvState) -> np.ndarray:
        """Mask of the sub-envs whose queued continuation is still needed: on plan, and alive after the plan's end
        (not done, and not truncated by max_episode_steps at that end)."""
        due = s.wants_next & s.on_plan & ~s.has_next & ~s.needs_reset
        if self.max_episode_steps is not None:
            due &= s.elapsed + (s.plan.length.cpu().numpy() - s.t) < self.max_episode_steps
        return due

    def _assign(self, s: EnvState, env_ids: np.ndarray, plans: Plans) -> None:
        """Put sub-envs `env_ids` at the start of `plans` (one each) and queue the continuations they need: a
        plan that reaches its horizon alive goes on; one that ends in a predicted termination ends the episode."""
        ids = torch.as_tensor(env_ids)
        s.plan = s.plan.put(ids, plans)
        s.obs = s.obs.index_put((ids,), plans.obs[:, 0])
        last = plans.obs[torch.arange(len(plans)), plans.length]
        alive_at_end = (plans.length == self.horizon) & ~torch.as_tensor(self.task.terminated(last))
        s.t[env_ids], s.on_plan[env_ids], s.has_next[env_ids] = 0, True, False
        s.wants_next[env_ids] = alive_at_end.cpu().numpy()

    # ---------------------------------------------------------------------------------------------- episodes

    def _initial_state(self) -> EnvState:
        n, h, d, a, dev = self.num_envs, self.horizon, self.bundle.obs_dim, self.bundle.act_dim, self.bundle.device
        flags = np.zeros(n, dtype=bool)
        return EnvState(torch.zeros(n, d, device=dev), Plans.empty(n, h, d, a, dev), np.zeros(n, np.int64),
                        flags.copy(), Plans.empty(n, h, d, a, dev), flags.copy(), flags.copy(), flags.copy(),
                        flags.copy(), np.zeros(n, np.int64), flags.copy(), np.zeros(n, np.float64),
                        pool_on=self.config.plans == "always")

    def _start_episodes(self, s: EnvState, env_ids: np.ndarray) -> None:
        """New episodes for `env_ids`: pool plans while the pool is on, else dataset states without plans."""
        if len(env_ids) == 0:
            return
        s.on_plan[env_ids] = s.has_next[env_ids] = s.wants_next[env_ids] = False  # the old plans are over
        refresh = self.config.refresh_every
        if s.pool is not None and refresh is not None and s.served_since_refresh >= refresh:
            s.pool = None
        if s.pool_on:
            missing = len(env_ids) - (len(s.pool) if s.pool is not None else 0)
            if missing > 0:
                self._generate(s, pool_count=max(missing, self.pool_size))
            self._assign(s, env_ids, s.pool.take(slice(0, len(env_ids))))
            s.pool = s.pool.take(slice(len(env_ids), None))
            s.pool_start[env_ids], s.probing[env_ids] = True, False
        else:
            starts = self.bundle.sample_start_obs(len(env_ids), self.np_random, self.config.start_states)
            self._begin_planless(s, env_ids, starts)
        s.elapsed[env_ids] = 0
        s.needs_reset[env_ids] = False
        s.x_position[env_ids] = 0.0

    def _begin_planless(self, s: EnvState, env_ids: np.ndarray, starts: torch.Tensor) -> None:
        s.obs = s.obs.index_put((torch.as_tensor(env_ids),), starts)
        s.x_position[env_ids] = 0.0
        s.on_plan[env_ids] = s.has_next[env_ids] = s.wants_next[env_ids] = s.pool_start[env_ids] = False
        s.probing[env_ids] = self._probes()

    def _transaction(self, body, seed: int | None = None):
        """Run `body(working copy of the state)` (after re-seeding and starting from a fresh state when `seed` is
        given); keep its state only if it returns, else restore the RNGs and counters, so the env is exactly as
        before the call."""
        rng = self.np_random
        saved = (rng, self._np_random_seed, copy.deepcopy(rng.bit_generator.state), self._generator.get_state(),
                 dict(self.stats))
        s = self._state.working_copy()
        try:
            if seed is not None:
                self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
                # same seed, same observations: a fresh state (the pool is regenerated from the new seed)
                s = dataclasses.replace(self._initial_state(), obs=s.obs, pool_on=s.pool_on and self.config.plans == "always")
            self._generator.manual_seed(int(self.np_random.integers(0, 2**63 - 1)))
            result = body(s)
        except BaseException:
            self._np_random, self._np_random_seed = saved[0], saved[1]
            saved[0].bit_generator.state = saved[2]
            self._generator.set_state(saved[3])
            self.stats = saved[4]
            raise
        self._state = s
        return result

    # ------------------------------------------------------------------------------------------- gym interface

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):
            seed = int(np.random.SeedSequence([int(x) for x in seed if x is not None]).generate_state(1)[0])
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

        def body(s: EnvState):
            self._start_episodes(s, env_ids)
            return self._observations(s), self._reset_infos(s, env_ids)

        out = self._transaction(body, seed)
        self._started = True
        self._show()
        return out

    def reset_to(self, start_obs: torch.Tensor | np.ndarray, *, seed: int | None = None):
        """Start every sub-env at the given observations (num_envs, obs_dim) instead of dataset states (with
        plans from there in `plans="always"` mode, else planless as after any reset). Returns (obs, infos) like
        `reset`. For evaluations that compare the env with the real simulator from the same states."""
        start = torch.as_tensor(np.asarray(start_obs) if not isinstance(start_obs, torch.Tensor) else start_obs,
                                dtype=torch.float32).to(self.bundle.device)
        if start.shape != (self.num_envs, self.bundle.obs_dim):
            raise ValueError(f"start_obs must have shape ({self.num_envs}, {self.bundle.obs_dim}), got {tuple(start.shape)}")
        if not torch.isfinite(start).all():
            raise ValueError("start_obs contains NaN or inf")
        env_ids = np.arange(self.num_envs)

        def body(s: EnvState):
            self._begin_planless(s, env_ids, start)
            if self.config.plans == "always":
                s.probing[:] = False
                self._generate(s, first_ids=env_ids)
            s.elapsed[:], s.needs_reset[:] = 0, False
            return self._observations(s), self._reset_infos(s, env_ids)

        out = self._transaction(body, seed)
        self._started = True
        self._show()
        return out

    def planned_actions(self) -> np.ndarray:
        """Each sub-env's plan action at its current step (num_envs, act_dim); zeros where a sub-env is in model
        mode. Acting with these keeps every on-plan sub-env on its plan."""
        s = self._state
        t = torch.as_tensor(np.minimum(s.t, self.horizon - 1))
        actions = s.plan.actions[torch.arange(self.num_envs), t].cpu().numpy().astype(np.float32)
        actions[~s.on_plan] = 0.0
        return actions

    def _observations(self, s: EnvState) -> np.ndarray:
        return s.obs.cpu().numpy().astype(self._obs_dtype, copy=True)

    def _reset_infos(self, s: EnvState, env_ids: np.ndarray) -> dict:
        infos: dict[str, Any] = {}
        if len(env_ids):
            self._put_plan_return(infos, s, env_ids)
        return infos

    def _put_plan_return(self, infos: dict, s: EnvState, env_ids: np.ndarray) -> None:
        """info["plan_return"]: the predicted return of the plan the sub-env is on (masked where it has none)."""
        if "plan_return" not in infos:
            infos["plan_return"] = np.zeros(self.num_envs, dtype=np.float64)
            infos["_plan_return"] = np.zeros(self.num_envs, dtype=bool)
        with_plan = env_ids[s.on_plan[env_ids]]
        infos["plan_return"][with_plan] = s.plan.returns[torch.as_tensor(with_plan)].cpu().numpy()
        infos["_plan_return"][env_ids] = s.on_plan[env_ids]

    def _check_actions(self, actions) -> tuple[torch.Tensor, np.ndarray]:
        if isinstance(actions, torch.Tensor):  # any device, dtype (bfloat16 has no numpy type) or grad
            actions = actions.detach().cpu()
            arr = (actions.double() if actions.is_floating_point() else actions).numpy()
        else:
            arr = np.asarray(actions)
        expected = (self.num_envs, *self.single_action_space.shape)
        if arr.shape != expected:
            hint = " (a single env's action? wrap it as a batch: actions[None])" if arr.shape == expected[1:] else ""
            raise ValueError(f"actions must have shape {expected}, got {arr.shape}{hint}")
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"actions must be real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)  # clip before casting: a finite float64 beyond float32's range is clipped
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr).all(1))
            raise ValueError(f"actions of sub-envs {bad.tolist()} contain NaN or inf; check the agent's outputs")
        clipped = np.clip(arr, self._low, self._high)
        clip_count = (clipped != arr).sum(1)
        return torch.as_tensor(clipped, dtype=torch.float32, device=self.bundle.device), clip_count

    def step(self, actions):
        if not self._started:
            raise RuntimeError("call reset() before step()")
        act, clip_count = self._check_actions(actions)
        out = self._transaction(lambda s: self._step(s, act, clip_count))
        self._show()
        return out

    def render(self) -> tuple[np.ndarray, ...] | None:
        """"rgb_array": one (height, width, 3) uint8 frame per sub-env, of its current state; "human": draws
        sub-env 0 in the window and returns None. The state is drawn through the real MuJoCo env with the x
        position integrated from the observed x velocity since the episode's start."""
        if self._renderer is None:
            gym.logger.warn("render() was called on a DydiffEnv made without a render mode; make it with "
                            "render_mode='rgb_array' (or 'human' where there is a display)")
            return None
        if not self._started:
            raise RuntimeError("call reset() before render()")
        obs, x = self._state.obs.cpu().numpy(), self._state.x_position
        if self.render_mode == "human":
            self._renderer.draw(obs[0], x[0])
            return None
        return tuple(self._renderer.draw(obs[i], x[i]) for i in range(self.num_envs))

    def _show(self) -> None:
        """Human mode draws every new state, as Gymnasium's MuJoCo envs do."""
        if self.render_mode == "human":
            self.render()

    def _step(self, s: EnvState, act: torch.Tensor, clip_count: np.ndarray):
        n = self.num_envs
        reset_now = np.zeros(n, dtype=bool)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and s.needs_reset.any():
            reset_now = s.needs_reset.copy()
            self._start_episodes(s, np.flatnonzero(reset_now))
        elif self.autoreset_mode == AutoresetMode.DISABLED and s.needs_reset.any():
            raise RuntimeError(f"sub-envs {np.flatnonzero(s.needs_reset).tolist()} are done; reset them with "
                               "reset(options={'reset_mask': mask}) before stepping (autoreset_mode=DISABLED)")
        ids = np.flatnonzero(~reset_now)
        infos = {key: np.zeros(n, dtype=dtype) for key, dtype in
                 (("mode", "<U5"), ("disagreement", np.float64), ("replanned", bool), ("clipped_actions", np.int64),
                  ("nonfinite", bool), ("diverged", bool))}
        rewards, terminated, truncated = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if len(ids):
            self._advance(s, ids, act, infos, rewards, terminated, truncated)
            infos["clipped_actions"][ids] = clip_count[ids]
            self.stats["clipped_actions"] += int(clip_count[ids].sum())
            s.served_since_refresh += len(ids)
        for key in list(infos):
            infos[f"_{key}"] = ~reset_now
        self._put_plan_return(infos, s, ids)
        obs = self._observations(s)
        done = terminated | truncated
        if self.autoreset_mode == AutoresetMode.SAME_STEP and done.any():
            # as Gymnasium's SyncVectorEnv: the step's info goes to final_info, the reset's info takes its place
            done_ids = np.flatnonzero(done)
            final_obs = np.full(n, None, dtype=object)
            for i in done_ids:
                final_obs[i] = obs[i].copy()
            final_info = {k: v.copy() for k, v in infos.items()}
            for key in [k for k in infos if k.startswith("_")]:
                final_info[key] &= done
                infos[key] &= ~done
            self._start_episodes(s, done_ids)
            obs = self._observations(s)
            self._put_plan_return(infos, s, done_ids)
            infos["final_obs"], infos["_final_obs"] = final_obs, done.copy()
            infos["final_info"], infos["_final_info"] = final_info, done.copy()
        else:
            s.needs_reset |= done
        if reset_now.any():  # NEXT_STEP: the reset sub-envs report their reset info
            self._put_plan_return(infos, s, np.flatnonzero(reset_now))
        return obs, rewards, terminated, truncated, infos

    @torch.no_grad()
    def _advance(self, s: EnvState, ids: np.ndarray, act: torch.Tensor, infos: dict, rewards: np.ndarray,
                 terminated: np.ndarray, truncated: np.ndarray) -> None:
        """One transition for the sub-envs `ids` (module docstring): plan or model, then plan ends."""
        cfg, tol = self.config, self.config.action_tolerance
        tid = torch.as_tensor(ids)
        a = act[tid]
        # the first step of a planless episode: does the agent act as the handle? Those that do get plans
        probe = s.probing[ids]
        if probe.any():
            handle = call_policy(self._planning_policy(), s.obs[tid[probe]], self.bundle.act_dim)
            acts_as_handle = ((a[probe] - handle).abs().amax(1) <= tol).cpu().numpy()
            s.probing[ids] = False
            if acts_as_handle.any():
                s.pool_on = True
                self._generate(s, first_ids=ids[probe][acts_as_handle], pool_count=self._pool_shortfall(s))
        t = s.t[ids]
        plan_a = s.plan.actions[tid, torch.as_tensor(np.minimum(t, self.horizon - 1))]
        plan_length = s.plan.length[tid].cpu().numpy()  # the plans stay put below: continuations go to next_plan
        in_plan = s.on_plan[ids] & (t < plan_length)
        follows = in_plan & ((a - plan_a).abs().amax(1) <= tol).cpu().numpy()
        self._count_pool_starts(s, ids, follows)
        # a follower about to use the last step of its plan needs its continuation now: serve the whole queue
        at_end = follows & (t + 1 >= plan_length)
        if (at_end & self._due_continuations(s)[ids]).any():
            self._generate(s, pool_count=self._pool_shortfall(s))

        on, off = torch.as_tensor(follows), torch.as_tensor(~follows)
        next_obs = torch.empty_like(s.obs[tid])
        reward = torch.empty(len(ids), device=next_obs.device)
        disagreement = torch.empty_like(reward)
        if follows.any():
            rows, steps = tid[on], torch.as_tensor(t[follows])
            next_obs[on] = s.plan.obs[rows, steps + 1]
            reward[on] = s.plan.rewards[rows, steps]
            disagreement[on] = s.plan.disagreement[rows, steps]
        if (~follows).any():
            x, u = s.obs[tid[off]], a[off]
            next_obs[off], disagreement[off] = self.bundle.dynamics.predict(x, u, mode=cfg.model_dynamics,
                                                                            generator=self._generator)
            reward[off] = self.bundle.reward(x, u) - cfg.uncertainty_penalty * disagreement[off]
        finite = torch.isfinite(next_obs).all(1) & torch.isfinite(reward) & torch.isfinite(disagreement)
        diverged = finite & runaway(next_obs, self._obs_mean, self._obs_std, cfg.max_state_std)
        usable = finite & ~diverged  # a state the agent may see
        term = torch.as_tensor(self.task.terminated(next_obs)) & usable
        # a non-finite or diverged model output ends the episode; the agent sees its last observation again
        next_obs = torch.where(usable[:, None], next_obs, s.obs[tid])
        reward = torch.where(usable, reward, torch.zeros_like(reward))
        disagreement = torch.where(usable, disagreement, torch.zeros_like(disagreement))

        xv = self.task.x_velocity_index
        s.x_position[ids] = integrate_x(s.x_position[ids], s.obs[tid, xv].cpu().numpy(), next_obs[:, xv].cpu().numpy(),
                                        self.task.dt)
        s.obs = s.obs.index_put((tid,), next_obs)
        s.on_plan[ids] = follows
        s.t[ids] = np.where(follows, t + 1, t)
        s.has_next[ids] &= follows  # a sub-env that left its plan drops its continuation
        s.wants_next[ids] &= follows
        s.elapsed[ids] += 1
        finite_np, term_np, dis_np = finite.cpu().numpy(), term.cpu().numpy(), disagreement.cpu().numpy()
        usable_np, diverged_np = usable.cpu().numpy(), diverged.cpu().numpy()
        uncertain = np.zeros(len(ids), dtype=bool)
        if cfg.max_disagreement is not None:
            uncertain = ~follows & (dis_np > cfg.max_disagreement)
        trunc_np = ~usable_np | uncertain
        if self.max_episode_steps is not None:
            trunc_np |= s.elapsed[ids] >= self.max_episode_steps
        s.wants_next[ids] &= ~(term_np | trunc_np)
        # plan ends: an alive follower goes on with its continuation (or in model mode if it has none)
        ended = ids[at_end & ~term_np & ~trunc_np]
        go_on, stop = ended[s.has_next[ended]], ended[~s.has_next[ended]]
        s.on_plan[stop] = False
        if len(go_on):
            self._assign(s, go_on, s.next_plan.take(torch.as_tensor(go_on)))

        rewards[ids] = reward.cpu().numpy().astype(np.float64)
        terminated[ids] = term_np
        truncated[ids] = trunc_np
        infos["mode"][ids] = np.where(follows, "plan", "model")
        infos["disagreement"][ids] = dis_np
        infos["replanned"][go_on] = True
        infos["nonfinite"][ids] = ~finite_np
        infos["diverged"][ids] = diverged_np
        self.stats["plan_steps"] += int(follows.sum())
        self.stats["model_steps"] += int((~follows).sum())
        self.stats["uncertain"] += int(uncertain.sum())
        self.stats["nonfinite"] += int((~finite_np).sum())
        self.stats["diverged"] += int(diverged_np.sum())

    def _count_pool_starts(self, s: EnvState, ids: np.ndarray, follows: np.ndarray) -> None:
        """Auto mode: switch the pool off after `pool_size` pool-plan episodes in a row left their plan at once."""
        first = s.pool_start[ids]
        if not first.any():
            return
        s.pool_start[ids] = False
        s.pool_misses = 0 if follows[first].any() else s.pool_misses + int(first.sum())
        if self.config.plans == "auto" and s.pool_misses >= self.pool_size:
            s.pool_on, s.pool, s.pool_misses = False, None, 0

    def close_extras(self, **kwargs) -> None:
        self._state = dataclasses.replace(self._state, pool=None)
        if self._renderer is not None:
            self._renderer.close()


class DydiffSingleEnv(gym.Env):
    """A single-environment `gymnasium.Env` view of `DydiffEnv` (what `gymnasium.make` returns). Keyword
    arguments are DydiffEnv's, `render_mode`, `width` and `height` included."""

    # every mode the class supports; an instance lists those this machine can honour, with its task's render_fps
    metadata = {"render_modes": list(RENDER_MODES)}

    def __init__(self, **kwargs):
        kwargs.pop("num_envs", None)
        kwargs["autoreset_mode"] = AutoresetMode.DISABLED
        self.vector_env = DydiffEnv(num_envs=1, **kwargs)
        self.observation_space = self.vector_env.single_observation_space
        self.action_space = self.vector_env.single_action_space
        self.render_mode = self.vector_env.render_mode
        self.metadata = {"render_modes": available_render_modes(), "render_fps": self.vector_env.task.render_fps}
        self._needs_reset = True

    @property
    def bundle(self) -> Bundle:
        return self.vector_env.bundle

    @property
    def config(self) -> EnvConfig:
        return self.vector_env.config

    @property
    def stats(self) -> dict:
        return self.vector_env.stats

    def set_policy(self, policy: Any = None, input: str = "auto") -> None:
        self.vector_env.set_policy(policy, input)

    @staticmethod
    def _unbatch(infos: dict) -> dict:
        return {k: (v[0].item() if isinstance(v[0], np.generic) else v[0]) for k, v in infos.items()
                if not k.startswith("_") and infos.get(f"_{k}", np.ones(1, bool))[0]}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or not self.vector_env.started:
            # share one RNG: the single env's np_random seeds the vector env's generators
            self.vector_env._np_random = self.np_random
            if seed is not None:
                self.vector_env._state = self.vector_env._initial_state()
        obs, infos = self.vector_env.reset(options=options)
        self._needs_reset = False
        return obs[0], self._unbatch(infos)

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (the episode has ended or never started)")
        action = action.detach().cpu().numpy() if isinstance(action, torch.Tensor) else np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        obs, reward, terminated, truncated, infos = self.vector_env.step(action[None])
        self._needs_reset = bool(terminated[0] or truncated[0])
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), self._unbatch(infos)

    def render(self) -> np.ndarray | None:
        """"rgb_array": the current state as one (height, width, 3) uint8 frame; "human": None (drawn in the
        window after every reset and step)."""
        frames = self.vector_env.render()
        return None if frames is None else frames[0]

    def close(self) -> None:
        self.vector_env.close()


def make_env(**kwargs) -> DydiffSingleEnv:
    """`gymnasium.make` entry point."""
    return DydiffSingleEnv(**kwargs)


def make_vector_env(num_envs: int = 1, **kwargs) -> DydiffEnv:
    """`gymnasium.make_vec(..., vectorization_mode="vector_entry_point")` entry point."""
    return DydiffEnv(num_envs=num_envs, **kwargs)
