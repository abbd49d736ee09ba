"""Fidelity of learned rollouts against the real simulator: does DyDiff stay accurate over long horizons?

    python -m benchmarks.fidelity --quick                       # a few minutes on 2 CPU cores
    python -m benchmarks.fidelity --policy td3bc -n 256         # the full comparison

Writes to --out (default benchmarks/results/fidelity/): fidelity.json (configuration, per-horizon curves and
every metric), fidelity.png (state error against horizon, one panel per regime, 95 % CI bands), fidelity.md
(the markdown table also printed on stdout) and, with --video (the default without --quick), rollouts.gif:
3 policy-driven rollouts, MuJoCo above DydiffEnv from the same start states (`fidelity_video`); `--policy td3bc`
caches its trained actor there too.

DyDiff's claim (Zhao et al. 2024, arXiv 2405.19189) is that diffusion rollouts stay accurate over long horizons
for a policy other than the behaviour policy, where a single-step model compounds its errors. This script
measures that against Hopper-v5 itself: N dataset states whose simulator state (qpos, qvel) is recorded are
replayed in MuJoCo and rolled out for H steps, and the same states are rolled out by every model method.

Regimes (reported separately):
- teacher-forced: the dataset's own recorded actions a_t, t = 0..H-1, from each start row. The real simulator
  replays them (and must reproduce the dataset, checked). The model methods use the same actions: the
  single-step ensemble steps with them and the diffusion model is conditioned on them: `dydiff_rollout` with
  a time-indexed policy (`RecordedActions`, called with each state's step and trajectory). Window rows past
  the end of the start's episode (only when H < window - 1) have no recorded action; they get the bundle's
  deterministic BC action, relabelled like a policy action.
- policy-driven: a learning policy different from the behaviour policy (--policy), in the simulator and in
  the models (`dydiff_rollout` itself).
- noisy-policy: the same policy plus N(0, 0.1) noise per action (as TD3 explores), clipped to [-1, 1]; one
  noise draw per start and step, used by the simulator and by every model (a time-indexed policy).
- random-actions: uniform random actions, one draw per start and step, the same in the simulator and the
  models (open loop). With the noisy policy, the agents the env serves from its single-step model.

Methods (--methods):
- ensemble: `dydiff_rollout` with M = 0, the single-step ensemble alone (MBPO/MOPO-style compounding rollout);
- dydiff-M1 / -M2 / -M3: DyDiff with M refinement rounds and the paper's rule (only s_0 given, 50/50 average);
  any M with suffixes for `RefineConfig` settings: `-a<k>` anchors the first k states to the single-step
  rollout, `-u` weights each step by the ensemble's uncertainty, its error floor probed on the first free
  steps (`-u<e>`: diffusion_error e; `-p<n>`: n probe steps, -p0 none; `-g<r>`: max_probe_ratio r; no gate
  without it), `-k<K>` averages K diffusion samples per round, e.g. dydiff-M2-a16, dydiff-M1-u,
  dydiff-M2-a8-u0.1-p0, dydiff-M2-k4. dydiff-M2-u-g4 is `dydiff_rollout`'s and `DydiffEnv`'s default;
- behaviour-prior: DyDiff (M = 2, the paper's rule) driven by the bundle's stochastic BC policy, i.e. the regime's actions are
  *not* injected (what a diffusion model without policy injection would predict). It is one computation
  shared by both regimes; only the true trajectory it is compared with differs;
- env: `DydiffEnv` with its default settings (plans="auto", M = 2 with the default refinement, plans of the
  window minus one step (`--env-horizon`) continued at their ends; filter "none", no time limit) started at the
  same states (`reset_to`), with the learning policy as its handle, and stepped with the regime's actions.
  policy-driven: the agent acts as the handle, so the env serves DyDiff plans (the first from the start state,
  matching dydiff-M2-u-g4 up to sampling noise, then their continuations); every other regime leaves the plan
  at the first step, so the env steps its single-step model (`model_dynamics`, by default one random elite's
  mean): these rows measure the env's own off-plan transitions against MuJoCo.
behaviour-prior runs in the first two regimes only. Every method runs unfiltered (filter "none"): the filter picks trajectories by predicted return, which would
change which start states are compared. Every method has its own seeded generator.

Metrics per horizon h = 1..H (see `fidelity_metrics`): normalised state error mean_d |s_model - s_true| / std_d
(std of the bundle's training data), mean and 95 % CI over the start states whose true trajectory is alive at h
(up to and including its terminal state); model states after a model's own predicted termination are still
compared for the rollout methods (they exist), but not for the env (its episode has ended: such states are
counted as `missing`). Also the error of the predicted H-step return (each summed up to its own first
termination) against the true one, termination agreement per h, and wall time. Per regime, the return error
of the bundle's reward model alone (on the simulator's own states and actions) is the part of every method's
return error that better states cannot remove. Headline: the horizon from
which each diffusion method's mean error stays below the ensemble's.

Start states: N rows drawn without replacement (seeded) among the rows that have at least H more transitions
in their episode, so the teacher-forced regime has recorded actions for all H steps; both regimes use the same
rows. This leaves out the last H states of every episode (in particular states just before a fall).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import re
import sys
import time
import zlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/fidelity.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fidelity_video  # noqa: E402
from benchmarks.fidelity_metrics import (crossover_horizon, return_error, state_error_curve,  # noqa: E402
                                         termination_agreement, trajectory_length)
from dydiff_env.bundle import Bundle, check_dataset_matches, load_bundle  # noqa: E402
from dydiff_env.config import PRECISIONS, SAMPLER_KINDS, RefineConfig, SamplerConfig  # noqa: E402
from dydiff_env.data import DEFAULT_DATASET_ID, OfflineData, load_dataset  # noqa: E402
from dydiff_env.env import DydiffEnv, shipped_bundle_path  # noqa: E402
from dydiff_env.policies import as_policy  # noqa: E402
from dydiff_env.render import RenderError  # noqa: E402
from dydiff_env.tasks import TASKS, get_task  # noqa: E402
from agents.trainer import json_safe  # noqa: E402
from dydiff_env.rollout import (FilterConfig, RolloutResult, behaviour_policy, call_policy,  # noqa: E402
                                dydiff_rollout)

METHODS = ("ensemble", "dydiff-M1", "dydiff-M2", "dydiff-M3", "behaviour-prior", "env", "dydiff-M2-u-g4")
ITERATIONS = {"ensemble": 0, "dydiff-M1": 1, "dydiff-M2": 2, "dydiff-M3": 3, "behaviour-prior": 2, "env": 2}
REFERENCE = RefineConfig(blend="average")  # the paper's rule: only s_0 given, 50/50 average
VARIANT = re.compile(r"dydiff-M(?P<m>\d+)(?:-a(?P<anchor>\d+))?"
                     r"(?P<blend>-u(?P<error>\d*\.?\d+)?(?:-p(?P<probe>\d+))?(?:-g(?P<gate>\d*\.?\d+))?)?"
                     r"(?:-k(?P<samples>\d+))?")


def parse_method(name: str) -> tuple[int, RefineConfig]:
    """(refinement rounds, refine settings) of a method name; see the module docstring."""
    if name in ITERATIONS:
        return ITERATIONS[name], REFERENCE
    match = VARIANT.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown method '{name}'; choose from {list(METHODS)} or a variant such as "
                         "dydiff-M2-a16, dydiff-M1-u, dydiff-M2-a8-u0.1")
    # every setting the name leaves out is off (no gate without -g), so a name means the same under any defaults
    refine = RefineConfig(anchor_steps=int(match["anchor"] or 0), blend="uncertainty" if match["blend"] else "average",
                          max_probe_ratio=float(match["gate"]) if match["gate"] else None,
                          **({"diffusion_error": float(match["error"])} if match["error"] else {}),
                          **({"probe_steps": int(match["probe"])} if match["probe"] else {}),
                          num_samples=int(match["samples"] or 1))
    return int(match["m"]), refine
REGIMES = ("teacher-forced", "policy-driven", "noisy-policy", "random-actions")
NOISE_STD = 0.1  # the noisy-policy regime's exploration noise
DEFAULT_OUT = Path("benchmarks/results/fidelity")
QUICK = {"num_starts": 32, "horizon": 16, "sampler_steps": 10, "policy_steps": 1000}
FULL = {"num_starts": 256, "policy_steps": 5000}

TorchPolicy = Callable[[torch.Tensor], torch.Tensor]
# a time-indexed action function: (t (B,) long, obs (B, obs_dim), rows (B,) long) -> actions (B, act_dim)


@dataclass
class Trajectories:
    """N trajectories of horizon H: states (N, H + 1, D) with NaN where no state exists, rewards (N, H) (0 after
    the end), terminated (N, H) (first True = termination), returns (N,) up to the first termination."""

    states: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    returns: np.ndarray
    seconds: float
    nonfinite: int = 0
    plan_share: float | None = None  # env only: the share of transitions served from DyDiff plans
    actions: np.ndarray | None = None  # simulator only: (N, H, A), NaN after the end

    @classmethod
    def from_rollout(cls, result: RolloutResult, seconds: float) -> "Trajectories":
        states = torch.cat([result.obs[:, :1], result.next_obs], 1).double().cpu().numpy()
        return cls(states, result.rewards.double().cpu().numpy(), result.terminated.cpu().numpy().astype(bool),
                   result.returns.double().cpu().numpy(), seconds, int(result.nonfinite.sum()))


# --------------------------------------------------------------------------------------------- start states


def episode_end_of_rows(data: OfflineData) -> np.ndarray:
    """(len(data),) exclusive end row of each row's episode."""
    episode_of_row = np.repeat(np.arange(len(data.episode_starts)), data.episode_lengths)
    return (data.episode_starts + data.episode_lengths)[episode_of_row]


def select_starts(data: OfflineData, num_starts: int, horizon: int, seed: int) -> tuple[np.ndarray, int]:
    """`num_starts` rows (sorted) drawn without replacement among those with >= `horizon` more transitions in
    their episode; fewer when fewer are eligible. Returns (rows, number of eligible rows)."""
    if data.qpos is None or data.qvel is None:
        raise ValueError(f"dataset '{data.dataset_id}' does not record qpos/qvel, so its states cannot be replayed in "
                         "the simulator; collect one with `dydiff-env collect hopper-medium`")
    eligible = np.flatnonzero(np.arange(len(data)) + horizon <= episode_end_of_rows(data))
    if len(eligible) == 0:
        raise ValueError(f"no row of '{data.dataset_id}' has {horizon} more transitions in its episode; lower --horizon")
    count = min(num_starts, len(eligible))
    if count < num_starts:
        warnings.warn(f"only {len(eligible)} rows are eligible for horizon {horizon}; using all of them")
    rows = np.sort(np.random.default_rng(seed).choice(eligible, size=count, replace=False))
    return rows, len(eligible)


def recorded_actions(data: OfflineData, rows: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Actions of rows r + t, t < length, as (N, length, A) and a mask (N, length), True inside r's episode."""
    index = rows[:, None] + np.arange(length)[None, :]
    available = index < episode_end_of_rows(data)[rows][:, None]
    actions = data.actions[np.minimum(index, len(data) - 1)].astype(np.float32)
    actions[~available] = 0.0
    return actions, available


class NoisyPolicy:
    """Time-indexed policy: `policy(obs)` plus the fixed noise of trajectory `row` at step t, clipped to [-1, 1]."""

    time_indexed = True

    def __init__(self, policy: TorchPolicy, noise: np.ndarray):
        self.policy = policy
        self.noise = torch.as_tensor(noise, dtype=torch.float32)

    def __call__(self, obs: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        base = call_policy(self.policy, obs, self.noise.shape[-1])
        t = t.cpu().clamp(max=self.noise.shape[1] - 1)
        return (base + self.noise[rows.cpu(), t].to(obs.device)).clamp(-1.0, 1.0)


class RecordedActions:
    """Time-indexed policy for `dydiff_rollout`: the recorded action of trajectory `row` at step t where the
    dataset has one, else `fallback(obs)` (a batch policy)."""

    time_indexed = True

    def __init__(self, actions: np.ndarray, available: np.ndarray, fallback: TorchPolicy | None = None):
        self.actions = torch.as_tensor(actions, dtype=torch.float32)
        self.available = torch.as_tensor(available, dtype=torch.bool)
        self.fallback = fallback

    def __call__(self, obs: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t, rows = t.cpu(), rows.cpu()
        inside = t < self.actions.shape[1]
        tc = t.clamp(max=self.actions.shape[1] - 1)
        have = self.available[rows, tc] & inside
        out = self.actions[rows, tc].to(obs.device)
        if not bool(have.all()):
            if self.fallback is None:
                raise ValueError("a recorded action is missing and no fallback policy was given")
            missing = torch.nonzero(~have).flatten().to(obs.device)
            out[missing] = torch.as_tensor(self.fallback(obs[missing]), dtype=out.dtype, device=obs.device)
        return out


# ----------------------------------------------------------------------------------------------- simulator


def simulate(env_id: str, qpos: np.ndarray, qvel: np.ndarray,
             act: Callable[[int, np.ndarray, np.ndarray], np.ndarray], horizon: int) -> Trajectories:
    """Roll N simulator states (qpos, qvel) forward `horizon` steps in lock step; `act(t, obs (K, D), ids (K,))`
    gives the actions of the still-running trajectories `ids`. Each trajectory stops at its first termination."""
    import gymnasium as gym

    start = time.perf_counter()
    envs = []
    for i in range(len(qpos)):
        env = gym.make(env_id)
        env.reset(seed=i)
        env.unwrapped.set_state(np.asarray(qpos[i], np.float64), np.asarray(qvel[i], np.float64))
        envs.append(env)
    obs0 = np.stack([e.unwrapped._get_obs() for e in envs]).astype(np.float64)
    n, d = obs0.shape
    states = np.full((n, horizon + 1, d), np.nan)
    states[:, 0] = obs0
    rewards = np.zeros((n, horizon))
    terminated = np.zeros((n, horizon), bool)
    taken = None
    alive = np.ones(n, bool)
    for t in range(horizon):
        ids = np.flatnonzero(alive)
        if len(ids) == 0:
            break
        actions = np.asarray(act(t, states[ids, t], ids), dtype=np.float32).reshape(len(ids), -1)
        if taken is None:
            taken = np.full((n, horizon, actions.shape[1]), np.nan)
        taken[ids, t] = actions
        for k, i in enumerate(ids):
            obs, reward, term, trunc, _ = envs[i].step(actions[k])
            states[i, t + 1], rewards[i, t], terminated[i, t] = obs, reward, term
            alive[i] = not (term or trunc)
    for env in envs:
        env.close()
    return Trajectories(states, rewards, terminated, rewards.sum(1), time.perf_counter() - start, actions=taken)


@torch.no_grad()
def reward_model_return_error(bundle: Bundle, truth: Trajectories) -> dict[str, float]:
    """The return error of the bundle's reward model alone: r(s, a) on the simulator's own states and actions,
    summed like the true return. The part of every method's return error that better states cannot remove."""
    taken = ~np.isnan(truth.actions[..., 0])
    obs = torch.as_tensor(np.nan_to_num(truth.states[:, :-1]), dtype=torch.float32)
    act = torch.as_tensor(np.nan_to_num(truth.actions), dtype=torch.float32)
    predicted = bundle.reward(obs, act).double().cpu().numpy()
    return return_error(np.where(taken, predicted, 0.0).sum(1), truth.returns)


# -------------------------------------------------------------------------------------------- model methods


def fidelity_env(bundle: Bundle, num_envs: int, sampler: SamplerConfig, dynamics_mode: str, num_iterations: int,
                 plan_horizon: int | None = None, **render) -> DydiffEnv:
    """The `env` method's DydiffEnv: default plans (of `plan_horizon` steps; None: the env's default), no filter,
    no time limit, the bundle's precision (`render`: render_mode, width...)."""
    return DydiffEnv(num_envs=num_envs, bundle=bundle, num_iterations=num_iterations, sampler=sampler, filter="none",
                     pool_size=min(num_envs, 16), max_episode_steps=None, rollout_dynamics=dynamics_mode,
                     model_dynamics=dynamics_mode, precision=bundle.precision, horizon=plan_horizon, **render)


def env_rollout(bundle: Bundle, start_obs: np.ndarray, act: Callable[[int, np.ndarray], np.ndarray],
                plan_policy: TorchPolicy | None, horizon: int, sampler: SamplerConfig, seed: int,
                dynamics_mode: str = "elite_mean", num_iterations: int = 2,
                plan_horizon: int | None = None) -> Trajectories:
    """`DydiffEnv` (default plans and continuations) with N sub-envs started at `start_obs` and stepped with
    `act(t, obs (N, D))` for `horizon` steps; `plan_policy` is its policy handle (None: none). A sub-env's
    trajectory ends at its first termination or non-finite truncation (recorded as termination, as
    `dydiff_rollout` does); later steps (the env auto-resets it) are not used."""
    n = len(start_obs)
    start = time.perf_counter()
    env = fidelity_env(bundle, n, sampler, dynamics_mode, num_iterations, plan_horizon)
    if plan_policy is not None:
        env.set_policy(plan_policy, input="torch")
    obs, _ = env.reset_to(start_obs, seed=seed)
    states = np.full((n, horizon + 1, bundle.obs_dim), np.nan)
    states[:, 0] = obs
    rewards = np.zeros((n, horizon))
    terminated = np.zeros((n, horizon), bool)
    done = np.zeros(n, bool)
    failed = np.zeros(n, bool)
    plan_steps = 0
    for t in range(horizon):
        obs, reward, term, trunc, info = env.step(np.asarray(act(t, obs.astype(np.float32)), dtype=np.float32))
        plan_steps += int(((info["mode"] == "plan") & ~done).sum())
        live = ~done
        states[live, t + 1] = obs[live]
        rewards[live, t] = reward[live]
        terminated[live, t] = (term | info["nonfinite"])[live]
        failed |= live & info["nonfinite"]
        done |= term | trunc
    env.close()
    traj = Trajectories(states, rewards, terminated, rewards.sum(1), time.perf_counter() - start, int(failed.sum()))
    traj.plan_share = plan_steps / max(1, int((~np.isnan(states[:, 1:, 0])).sum()))
    return traj


# ------------------------------------------------------------------------------------------------- policies


def _td3bc_policy(data: OfflineData, steps: int, seed: int, cache_dir: Path) -> tuple[TorchPolicy, dict]:
    from safetensors.torch import load_file, save_file

    from agents import TD3BC
    from agents.buffers import ReplayBuffer

    torch.manual_seed(seed)  # before the networks are built: their initial weights come from the global RNG
    agent = TD3BC.from_data(data)
    path = cache_dir / f"td3bc-{data.content_hash}-{steps}steps-seed{seed}.safetensors"
    info = {"kind": "td3bc", "steps": steps, "cache": str(path)}
    if path.is_file():
        state = load_file(str(path))
        agent.actor.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("actor.")})
        agent.normalizer.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("normalizer.")})
        info["cached"] = True
    else:
        rng = np.random.default_rng(seed)
        buffer = ReplayBuffer.from_offline(data)
        begin = time.perf_counter()
        for _ in range(steps):
            agent.update(buffer.sample(256, rng))
        info["train_seconds"] = round(time.perf_counter() - begin, 1)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"actor.{k}": v.detach().cpu().contiguous() for k, v in agent.actor.state_dict().items()}
        tensors.update({f"normalizer.{k}": v.detach().cpu().contiguous() for k, v in agent.normalizer.state_dict().items()})
        save_file(tensors, str(path))
        info["cached"] = False
    return as_policy(agent), info


def build_policy(spec: str, bundle: Bundle, data: OfflineData | None, steps: int, seed: int,
                 cache_dir: Path) -> tuple[TorchPolicy, dict]:
    """The learning policy of the policy-driven regime, as a torch batch policy, and a description.

    td3bc: TD3+BC trained on the dataset for `steps` updates (cached under `cache_dir`);
    snapshot:PATH: a GaussianActor .safetensors, deterministic mean action;
    bc: the bundle's BC policy, deterministic mean action;
    module:attr: any object `dydiff_env.as_policy` accepts (numpy callable, torch module, SB3, agent)."""
    if spec == "td3bc":
        if data is None:
            raise ValueError("--policy td3bc needs the dataset")
        return _td3bc_policy(data, steps, seed, cache_dir)
    if spec == "bc":
        bundle.require("bc")
        return (lambda obs: bundle.bc.act(obs, deterministic=True)), {"kind": "bc", "deterministic": True}
    if spec.startswith("snapshot:"):
        from dydiff_env.behaviour import snapshot_policy

        path = spec.split(":", 1)[1]
        return snapshot_policy(path, bundle.device), {"kind": "snapshot", "path": path, "deterministic": True}
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return as_policy(obj), {"kind": "callable", "target": spec}
    raise ValueError(f"unknown --policy '{spec}'; use td3bc, bc, snapshot:PATH or module:func")


# --------------------------------------------------------------------------------------------------- runner


def _generator(seed: int, method: str) -> torch.Generator:
    index = METHODS.index(method) if method in METHODS else zlib.crc32(method.encode()) % 1_000_000 + len(METHODS)
    return torch.Generator().manual_seed(seed * 1_000_003 + index + 1)


def evaluate_methods(bundle: Bundle, start_obs: np.ndarray, truth: Trajectories, regime: str, methods: list[str],
                     action_fn: TorchPolicy, step_act: Callable[[int, np.ndarray], np.ndarray],
                     plan_policy: TorchPolicy | None, horizon: int, sampler: SamplerConfig, seed: int,
                     dynamics_mode: str, shared: dict, log=print, env_horizon: int | None = None) -> dict:
    """Every requested method's trajectories from `start_obs` and their metrics against `truth` (`env_horizon`:
    the env method's plan length; None: the env's default)."""
    std = np.asarray(bundle.normalizer("obs").std, np.float64)
    out = {}
    s0 = torch.as_tensor(start_obs, dtype=torch.float32)
    for method in methods:
        (m, refine), note = parse_method(method), None
        gen = _generator(seed, method)
        if method == "behaviour-prior":
            if "behaviour-prior" not in shared:  # one computation for both regimes
                begin = time.perf_counter()
                result = dydiff_rollout(bundle, s0, behaviour_policy(bundle, gen), horizon, m, sampler,
                                        FilterConfig("none"), gen, dynamics_mode, refine=REFERENCE)
                shared["behaviour-prior"] = Trajectories.from_rollout(result, time.perf_counter() - begin)
            else:
                note = "shared: the same trajectories (and wall time) as in the other regime"
            traj = shared["behaviour-prior"]
        elif method == "env":
            traj = env_rollout(bundle, start_obs, step_act, plan_policy, horizon, sampler, seed, dynamics_mode, m,
                               env_horizon)
        else:
            begin = time.perf_counter()
            # teacher-forced: `action_fn` replays the recorded actions (a time-indexed policy)
            result = dydiff_rollout(bundle, s0, action_fn, horizon, m, sampler, FilterConfig("none"), gen,
                                    dynamics_mode, chunk_size=len(s0), refine=refine)
            traj = Trajectories.from_rollout(result, time.perf_counter() - begin)
        curve = state_error_curve(traj.states, truth.states, truth.terminated, std)
        out[method] = {
            "iterations": m, "seconds": round(traj.seconds, 3), "nonfinite": traj.nonfinite, "note": note,
            "length_mean": float(trajectory_length(traj.terminated).mean()), "return_mean": float(traj.returns.mean()),
            "plan_share": traj.plan_share,
            "state_error": {k: v.tolist() for k, v in curve.items()},
            "return_error": return_error(traj.returns, truth.returns),
            "termination": {k: v.tolist() for k, v in termination_agreement(traj.terminated, truth.terminated).items()},
        }
        log(f"[fidelity] {regime:14s} {method:15s} error@H {curve['mean'][-1]:.3f}  ({traj.seconds:.1f}s)")
    return out


@dataclass
class Setup:
    """Everything the model methods are compared against: the bundle, the start states, the learning policy,
    and per regime the true trajectories and the inputs of the methods (action_fn, step_act, plan_policy)."""

    bundle: Bundle
    bundle_path: Path
    data: OfflineData
    rows: np.ndarray
    eligible: int
    start_obs: np.ndarray
    horizon: int
    window: int | None
    sampler: SamplerConfig
    methods: list[str]
    policy: TorchPolicy
    policy_info: dict
    truths: dict
    regime_inputs: dict
    checks: dict
    out_dir: Path
    env_horizon: int | None = None  # the env method's plan length (None: the env's default)


def prepare(args: argparse.Namespace, log=print) -> Setup:
    """Load the bundle and dataset, pick the start states, build the learning policy and replay every regime's
    actions in the simulator (see the module docstring)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    named_task = getattr(args, "task", None)  # None: the task of --bundle, or hopper
    bundle_path = Path(args.bundle) if args.bundle else shipped_bundle_path(get_task(named_task or "hopper").name)
    bundle = load_bundle(bundle_path, env_id=named_task and get_task(named_task).env_id, require=("dynamics", "reward"),
                         precision=getattr(args, "precision", "float32"))
    task = bundle.task
    dataset_id = args.dataset or task.dataset_id("medium")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    iterations = [parse_method(m)[0] for m in methods]  # raises on an unknown name
    if any(m > 0 for m in iterations):
        bundle.require("diffusion")
    if "behaviour-prior" in methods or "env" in methods:
        bundle.require("bc")
    window = bundle.diffusion.horizon if bundle.diffusion is not None else None
    max_h = window - 1 if window else None
    horizon = args.horizon or (min(QUICK["horizon"], max_h) if quick and max_h else max_h)
    if horizon is None:
        raise ValueError("pass --horizon: this bundle has no diffusion model to take a default from")
    # the env re-plans at its plans' ends, so only the other diffusion methods are bound to one window
    one_window = [m for m, it in zip(methods, iterations) if it > 0 and m != "env"]
    if max_h is not None and one_window and not 1 <= horizon <= max_h:
        raise ValueError(f"--horizon must be in [1, {max_h}] for this bundle's diffusion window of {window} rows "
                         f"(methods {', '.join(one_window)}; only ensemble and env run longer)")
    if horizon < 1:
        raise ValueError(f"--horizon must be positive, got {horizon}")
    num_starts = args.num_starts or (QUICK if quick else FULL)["num_starts"]
    policy_steps = args.policy_steps or (QUICK if quick else FULL)["policy_steps"]
    sampler = bundle.config.sampler
    steps = args.sampler_steps or (min(QUICK["sampler_steps"], sampler.num_steps) if quick else None)
    if steps:
        sampler = dataclasses.replace(sampler, num_steps=int(steps))
    if getattr(args, "sampler_kind", None):
        sampler = dataclasses.replace(sampler, kind=args.sampler_kind)
    out_dir = Path(args.out or default_out(task.name))
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_dataset(dataset_id)
    if data.env_id and data.env_id != bundle.task.env_id:
        raise ValueError(f"dataset '{dataset_id}' is of {data.env_id}, the bundle models {bundle.task.env_id}")
    check_dataset_matches(bundle, data)  # warns when the bundle learned another version of this dataset
    rows, eligible = select_starts(data, num_starts, horizon, args.seed)
    start_obs = data.observations[rows].astype(np.float32)
    qpos, qvel = data.qpos[rows], data.qvel[rows]
    policy, policy_info = build_policy(args.policy, bundle, data, policy_steps, args.seed, out_dir)
    log(f"[fidelity] bundle {bundle_path}, dataset {dataset_id}: {len(rows)} starts ({eligible} eligible), "
        f"H={horizon}, sampler steps {sampler.num_steps}, policy {args.policy}")

    # teacher-forced truth: replay the recorded actions in the simulator; it must reproduce the dataset
    length = window if window else horizon + 1
    rec, available = recorded_actions(data, rows, max(length, horizon + 1))
    truths = {"teacher-forced": simulate(bundle.task.env_id, qpos, qvel, lambda t, obs, ids: rec[ids, t], horizon)}
    tf = truths["teacher-forced"]
    index = rows[:, None] + np.arange(horizon)[None, :]
    compared = ~np.isnan(tf.states[:, 1:, 0])
    replay_diff = float(np.abs(tf.states[:, 1:][compared] - data.next_observations[index][compared]).max())
    start_diff = float(np.abs(tf.states[:, 0] - start_obs).max())
    act_dim = bundle.act_dim

    def policy_act(t, obs, ids=None):
        return call_policy(policy, torch.as_tensor(obs, dtype=torch.float32), act_dim).cpu().numpy()

    truths["policy-driven"] = simulate(bundle.task.env_id, qpos, qvel, policy_act, horizon)
    # exploration: one noise draw (and one random action) per start and step, shared by the simulator and models
    draws = np.random.default_rng(args.seed + 7919)
    noise = (NOISE_STD * draws.standard_normal((len(rows), max(length, horizon + 1), act_dim))).astype(np.float32)
    uniform = draws.uniform(-1, 1, (len(rows), max(length, horizon + 1), act_dim)).astype(np.float32)
    noisy_fn = NoisyPolicy(policy, noise)

    def noisy_act(t, obs, ids=None):
        ids = np.arange(len(obs)) if ids is None else ids
        return np.clip(policy_act(t, obs) + noise[ids, t], -1.0, 1.0)

    truths["noisy-policy"] = simulate(bundle.task.env_id, qpos, qvel, noisy_act, horizon)
    truths["random-actions"] = simulate(bundle.task.env_id, qpos, qvel, lambda t, obs, ids: uniform[ids, t], horizon)

    fallback = (lambda obs: bundle.bc.act(obs, deterministic=True)) if bundle.bc is not None else None
    recorded_fn = RecordedActions(rec, available, fallback)
    regime_inputs = {
        "teacher-forced": (recorded_fn, lambda t, obs: rec[:, t], policy),
        "policy-driven": (policy, policy_act, policy),
        "noisy-policy": (noisy_fn, noisy_act, policy),
        "random-actions": (RecordedActions(uniform, np.ones(uniform.shape[:2], bool)), lambda t, obs: uniform[:, t],
                           policy),
    }
    checks = {"replay_max_abs_diff": replay_diff, "start_obs_max_abs_diff": start_diff}
    if replay_diff > 1e-4 or start_diff > 1e-4:
        warnings.warn(f"the simulator replay differs from the dataset (max abs diff {max(replay_diff, start_diff):.2g})")
    return Setup(bundle, bundle_path, data, rows, eligible, start_obs, horizon, window, sampler, methods, policy,
                 policy_info, truths, regime_inputs, checks, out_dir, getattr(args, "env_horizon", None))


def run(args: argparse.Namespace, log=print) -> dict:
    setup = prepare(args, log)
    bundle, data, rows, horizon, sampler = setup.bundle, setup.data, setup.rows, setup.horizon, setup.sampler
    std = np.asarray(bundle.normalizer("obs").std, np.float64)
    shared: dict = {}
    results = {
        "config": {"bundle": str(setup.bundle_path), "dataset": data.dataset_id, "dataset_hash": data.content_hash,
                   "bundle_dataset_hash": bundle.meta.get("dataset_hash"), "policy": args.policy,
                   "policy_info": setup.policy_info, "num_starts": int(len(rows)), "eligible_starts": setup.eligible,
                   "horizon": horizon, "window": setup.window, "seed": args.seed, "sampler_steps": sampler.num_steps,
                   "sampler_kind": sampler.kind, "precision": bundle.precision, "dynamics_mode": args.dynamics_mode, "filter": "none",
                   "methods": setup.methods, "env_horizon": setup.env_horizon, "quick": args.quick,
                   "threads": torch.get_num_threads(),
                   "obs_std": std.tolist()},
        "starts": {"rows": rows.tolist()},
        "checks": setup.checks,
        "regimes": {},
    }
    for regime in REGIMES:
        truth = setup.truths[regime]
        action_fn, step_act, plan_policy = setup.regime_inputs[regime]
        regime_methods = [m for m in setup.methods if regime in REGIMES[:2] or m != "behaviour-prior"]
        per_method = evaluate_methods(bundle, setup.start_obs, truth, regime, regime_methods, action_fn, step_act,
                                      plan_policy, horizon, sampler, args.seed, args.dynamics_mode, shared, log,
                                      setup.env_horizon)
        curves = {m: {k: np.asarray(v, np.float64) for k, v in r["state_error"].items()} for m, r in per_method.items()}
        crossover = {m: crossover_horizon(curves[m], curves["ensemble"]) for m in per_method
                     if m.startswith("dydiff-") and "ensemble" in curves}
        lengths = trajectory_length(truth.terminated)
        results["regimes"][regime] = {
            "truth": {"seconds": round(truth.seconds, 3), "return_mean": float(truth.returns.mean()),
                      "terminated_fraction": float(truth.terminated.any(1).mean()),
                      "length_mean": float(lengths.mean()),
                      "reward_model_return_error": reward_model_return_error(bundle, truth)},
            "methods": per_method, "crossover": crossover,
        }
    results["headline"] = headline(results)
    out_dir = setup.out_dir
    if args.video if args.video is not None else not args.quick:
        results["video"] = write_video(setup, args.dynamics_mode, args.seed, log)
    json_path, png_path, md_path = out_dir / "fidelity.json", out_dir / "fidelity.png", out_dir / "fidelity.md"
    json_path.write_text(json.dumps(json_safe(results), indent=1))
    plot(results, png_path)
    results["table"] = markdown_table(results)
    md_path.write_text(results["table"] + "\n")
    log(results["table"])
    log(f"[fidelity] wrote {json_path}, {png_path} and {md_path}")
    return results


def write_video(setup: Setup, dynamics_mode: str, seed: int, log=print) -> str | None:
    """rollouts.gif in the output directory: the policy-driven regime from the first `fidelity_video.STARTS`
    start states, MuJoCo above DydiffEnv. Returns its file name, or None (with a warning) where MuJoCo cannot
    render: the measurements are kept either way."""
    count = min(fidelity_video.STARTS, len(setup.rows))
    rows = setup.rows[:count]
    _, step_act, plan_policy = setup.regime_inputs["policy-driven"]

    def act(obs):
        return step_act(0, obs)  # the policy-driven actions do not depend on the step

    begin = time.perf_counter()
    size = fidelity_video.PANEL
    env = fidelity_env(setup.bundle, count, setup.sampler, dynamics_mode, ITERATIONS["env"], setup.env_horizon,
                       render_mode="rgb_array",
                       width=size, height=size)
    try:
        truth = fidelity_video.real_frames(setup.bundle.task.env_id, setup.data.qpos[rows], setup.data.qvel[rows], act,
                                           setup.horizon, size)
        env.set_policy(plan_policy, input="torch")
        model = fidelity_video.env_frames(env, setup.start_obs[:count], act, setup.horizon, seed)
    except RenderError as err:
        warnings.warn(f"no rollouts.gif: {err}")
        return None
    finally:
        env.close()
    path = fidelity_video.write_gif(fidelity_video.grid_frames([truth, model]), setup.out_dir / "rollouts.gif")
    log(f"[fidelity] wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {truth.shape[1]} frames, "
        f"{time.perf_counter() - begin:.1f}s)")
    return path.name


# ------------------------------------------------------------------------------------------------ reporting


def headline(results: dict) -> dict[str, str]:
    lines = {}
    for regime, r in results["regimes"].items():
        parts = []
        for method, c in r["crossover"].items():
            if c["below_from"] is not None:
                sig = (f"95% CIs separate from h={c['significant_from']}" if c["significant_from"] is not None
                       else "95% CIs overlap at H")
                parts.append(f"{method} stays below the ensemble from h={c['below_from']} (first below at "
                             f"h={c['first_below']}; {sig})")
            else:
                parts.append(f"{method} does not stay below the ensemble up to H"
                             + (f" (first below at h={c['first_below']})" if c["first_below"] else ""))
        lines[regime] = "; ".join(parts) if parts else "needs the ensemble and a dydiff-M* method"
    return lines


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
    horizon = results["config"]["horizon"]
    cols = sorted({1, max(1, horizon // 4), max(1, horizon // 2), max(1, 3 * horizon // 4), horizon})
    out = [f"Fidelity against {results['config']['dataset']} replayed in the simulator: "
           f"{results['config']['num_starts']} starts, H={horizon}, policy {results['config']['policy']}, "
           f"sampler {results['config'].get('sampler_kind', 'heun')} {results['config']['sampler_steps']} steps, precision "
           f"{results['config'].get('precision', 'float32')}, filter none"
           + (f", env plans of {results['config']['env_horizon']} steps"
              if results["config"].get("env_horizon") else "")
           + ". State error: mean |model - true| / "
           "dataset std (mean +- 95% CI over the starts still alive at h; n@H: starts compared at H)."]
    for regime, r in results["regimes"].items():
        t = r["truth"]
        floor = t.get("reward_model_return_error")  # absent in results written before it was measured
        floor_note = (f"; the reward model on the true states: return abs err {_fmt(floor['abs_mean'], 2)}"
                      if floor else "")
        out += ["", f"### {regime} (true return {t['return_mean']:.1f}, {100 * t['terminated_fraction']:.0f}% of true "
                f"trajectories terminate, real simulator {t['seconds']:.1f}s{floor_note})", "",
                "| method | " + " | ".join(f"err h={h}" for h in cols)
                + " | n@H | return abs err (rel) | term. agree @H | length (true) | return (true) | time s |",
                "|---|" + "---|" * (len(cols) + 6)]
        for method, m in r["methods"].items():
            e = m["state_error"]
            cells = []
            for h in cols:
                mean, low = e["mean"][h - 1], e["low"][h - 1]
                half = (mean - low) if (mean is not None and low is not None and math.isfinite(mean - low)) else None
                cells.append(f"{_fmt(mean)} +- {_fmt(half)}" if half is not None else _fmt(mean))
            re = m["return_error"]
            out.append(f"| {method} | " + " | ".join(cells) + f" | {e['n'][-1]} | {_fmt(re['abs_mean'], 1)} ({_fmt(re['relative'], 2)})"
                       f" | {_fmt(m['termination']['agreement'][-1], 2)} | {_fmt(m['length_mean'], 1)} "
                       f"({_fmt(t['length_mean'], 1)}) | {_fmt(m['return_mean'], 1)} ({_fmt(t['return_mean'], 1)})"
                       f" | {m['seconds']:.1f} |")
        out += ["", f"Headline ({regime}): {results['headline'][regime]}"]
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(results["regimes"])
    ncols = min(2, len(regimes))
    nrows = math.ceil(len(regimes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(regimes):]:
        ax.set_visible(False)
    for ax, regime in zip(axes.flat, regimes):
        for method, m in results["regimes"][regime]["methods"].items():
            e = {k: np.asarray(v, np.float64) for k, v in m["state_error"].items() if k in ("mean", "low", "high")}
            h = np.arange(1, len(e["mean"]) + 1)
            (line,) = ax.plot(h, e["mean"], label=method, lw=1.6)
            ax.fill_between(h, e["low"], e["high"], color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(regime)
        ax.set_xlabel("horizon h (steps)")
        ax.set_ylabel("state error (dataset std units)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = results["config"]
    fig.suptitle(f"{c['dataset']}: {c['num_starts']} starts, policy {c['policy']}, 95% CI", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ CLI


def add_task_args(p: argparse.ArgumentParser) -> None:
    """--task, --bundle and --dataset, as every fidelity benchmark takes them."""
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="the task: the defaults of --bundle and --dataset are its shipped bundle and medium dataset "
                        "(default: the task of --bundle, else hopper)")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped for --task)")
    p.add_argument("--dataset", default=None,
                   help=f"Minari dataset with recorded qpos/qvel (default: the task's medium dataset, {DEFAULT_DATASET_ID} "
                        "for hopper)")


def default_out(task: str) -> Path:
    return DEFAULT_OUT if task == "hopper" else DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{task}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--policy", default="td3bc", help="td3bc | bc | snapshot:PATH | module:func (default td3bc)")
    p.add_argument("--policy-steps", type=int, default=None,
                   help=f"TD3+BC updates (default {FULL['policy_steps']}, --quick {QUICK['policy_steps']}); cached in --out")
    p.add_argument("-n", "--num-starts", type=int, default=None,
                   help=f"start states (default {FULL['num_starts']}, --quick {QUICK['num_starts']})")
    p.add_argument("--horizon", type=int, default=None,
                   help=f"steps H (default: diffusion window - 1; --quick {QUICK['horizon']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--sampler-steps", type=int, default=None,
                   help=f"EDM sampler steps (default: the bundle's; --quick {QUICK['sampler_steps']})")
    p.add_argument("--sampler-kind", default=None, choices=SAMPLER_KINDS,
                   help="diffusion sampler (default: the bundle's; see dydiff_env.SamplerConfig; student: the "
                        "bundle's distilled student, with --sampler-steps K of its noise levels)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    p.add_argument("--env-horizon", type=int, default=None,
                   help="plan length of the env method (default: the env's). --horizon may exceed the diffusion "
                        "window when the methods are ensemble and env only: the env re-plans")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="serving precision of the bundle's networks (Bundle.set_precision; default float32; auto: "
                        "bfloat16 where the CPU has native bf16)")
    p.add_argument("--dynamics-mode", default="elite_mean", choices=("elite_mean", "mean", "sample"),
                   help="single-step ensemble prediction mode (default elite_mean, as dydiff_rollout)")
    p.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}, for another task than "
                                                 f"hopper {DEFAULT_OUT}-<task>)")
    p.add_argument("--quick", action="store_true", help="small N, short H, fewer sampler steps (a few minutes)")
    p.add_argument("--video", action=argparse.BooleanOptionalAction, default=None,
                   help="write rollouts.gif, MuJoCo above DydiffEnv from 3 start states (default: on, off with --quick)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
