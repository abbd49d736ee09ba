"""Tianshou's own TD3BC on the offline dataset plus DyDiff rollouts collected from DydiffEnv with a Tianshou
`Collector`, evaluated in the real Hopper-v5.

    python examples/tianshou_td3bc.py                    # ~10 min on 2 CPU cores
    python examples/tianshou_td3bc.py --real-fraction 1  # the same budget on real data only

How it fits together:
- the dataset becomes a `tianshou.data.ReplayBuffer` (`ReplayBuffer.from_data`);
- `TianshouVectorEnv` (dydiff_env.adapters) presents a DISABLED-autoreset DydiffEnv to a `Collector`, which
  fills a separate model buffer. Every `--collect-every` gradient steps the algorithm becomes the env's policy
  handle (`set_policy`): the env regenerates its plan pool with the current actor, and since the collector
  acts with that same deterministic actor, the env serves the filtered DyDiff plans exactly (on plan);
- each gradient step samples the two buffers separately (`--real-fraction` real rows, 60 % by default, the
  DyDiff reference's ratio), computes each part's TD targets against its own buffer, and updates TD3BC on the
  concatenated batch. Tianshou's `OfflineTrainer` samples a single buffer (and never calls `training_fn`),
  hence this small loop around `TD3BC._update_with_batch`.
Episodes in the model are one plan long (`plans="always"`, `max_episode_steps` = the plan horizon, from any
dataset state): the short, branched rollouts of model-based offline RL rather than 1000-step episodes. With
`--exploration-noise STD` the collector explores (Tianshou's Gaussian noise) and the env serves it from its
single-step model instead (`plans="auto"`): no diffusion run, at simulator speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

DEFAULT_STEPS = 20_000  # gradient steps; about 10 min on 2 CPU cores with the default rollout schedule


def build_parser() -> argparse.ArgumentParser:
    from agents.recipes import add_shared_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(p)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="gradient steps")
    p.add_argument("--num-envs", type=int, default=8, help="DydiffEnv sub-environments of the collector")
    p.add_argument("--real-fraction", type=float, default=0.6, help="share of dataset rows in each batch")
    p.add_argument("--collect-every", type=int, default=2_500, help="gradient steps between model collections")
    p.add_argument("--collect-steps", type=int, default=1_024, help="model transitions per collection")
    p.add_argument("--model-buffer", type=int, default=100_000, help="model buffer capacity (oldest dropped)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--alpha", type=float, default=2.5, help="TD3+BC's Q weight")
    p.add_argument("--horizon", type=int, default=None, help="plan length (default: the bundle's)")
    p.add_argument("--exploration-noise", type=float, default=0.0,
                   help="std of Gaussian exploration noise while collecting (0: act as the policy handle, so the env "
                        "serves DyDiff plans; > 0: the collector explores and the env serves its single-step model)")
    p.add_argument("--pool-size", type=int, default=32,
                   help="kept plans per pool generation (about what one collection uses; each costs diffusion time)")
    return p


class Standardized(torch.nn.Module):
    """Tianshou `ModuleWithVectorOutput` that z-scores its input with dataset statistics, then runs `net`.
    In the network rather than the buffers, so real and model rows (and evaluation) share one scaling."""

    def __init__(self, net, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.net = net
        self.output_dim = net.get_output_dim()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def get_output_dim(self) -> int:
        return self.output_dim

    def forward(self, obs, state=None, info=None):
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.mean.device)
        return self.net((obs - self.mean) / self.std, state)


def build_algorithm(data, action_space, args):
    """Tianshou TD3BC (actor and twin critics 256x256, Adam 3e-4, the TD3+BC paper's settings)."""
    from tianshou.algorithm import TD3BC
    from tianshou.algorithm.modelfree.ddpg import ContinuousDeterministicPolicy
    from tianshou.algorithm.optim import AdamOptimizerFactory
    from tianshou.exploration import GaussianNoise
    from tianshou.utils.net.common import ModuleWithVectorOutput, Net
    from tianshou.utils.net.continuous import ContinuousActorDeterministic, ContinuousCritic

    obs_dim, act_dim = data.obs_dim, data.act_dim
    mean = data.observations.mean(0)
    std = data.observations.std(0) + 1e-3
    # the critic's input is [obs, act]: only the observation part is standardised
    critic_mean, critic_std = np.concatenate([mean, np.zeros(act_dim)]), np.concatenate([std, np.ones(act_dim)])

    def preprocess(concat: bool) -> ModuleWithVectorOutput:
        net = Net(state_shape=obs_dim, action_shape=act_dim, hidden_sizes=(256, 256), concat=concat)
        wrapped = Standardized(net, critic_mean if concat else mean, critic_std if concat else std)
        return ModuleWithVectorOutput.from_module(wrapped, net.get_output_dim())

    actor = ContinuousActorDeterministic(preprocess_net=preprocess(False), action_shape=act_dim, max_action=1.0)
    noise = getattr(args, "exploration_noise", 0.0)
    policy = ContinuousDeterministicPolicy(actor=actor, action_space=action_space,
                                           exploration_noise=GaussianNoise(sigma=noise) if noise > 0 else None)
    algorithm = TD3BC(policy=policy, policy_optim=AdamOptimizerFactory(lr=3e-4),
                      critic=ContinuousCritic(preprocess_net=preprocess(True)),
                      critic_optim=AdamOptimizerFactory(lr=3e-4),
                      critic2=ContinuousCritic(preprocess_net=preprocess(True)),
                      critic2_optim=AdamOptimizerFactory(lr=3e-4), alpha=args.alpha)
    return algorithm.to(args.device)


def dataset_buffer(data):
    """The offline dataset as a Tianshou ReplayBuffer (all seven arrays `from_data` needs)."""
    from tianshou.data import ReplayBuffer

    return ReplayBuffer.from_data(
        obs=data.observations, act=data.actions, rew=data.rewards, terminated=data.terminations,
        truncated=data.truncations, done=data.dones, obs_next=data.next_observations)


def make_model_env(args, task: str):
    """The learned simulator for a Collector: DISABLED autoreset, one filtered pool plan per episode (the episode
    is truncated at the plan's end), from any dataset state."""
    from dydiff_env.adapters import make_tianshou_vec_env
    from dydiff_env.env import resolve_bundle
    from dydiff_env.rollout import default_horizon

    bundle = resolve_bundle(args.bundle, task, args.device)
    # one plan per episode, as long as the main job's rollouts (dydiff_rollout's default, not the env's plans)
    horizon = args.horizon or default_horizon(bundle.diffusion.horizon)
    env = make_tianshou_vec_env(args.num_envs, bundle=bundle, task=task, horizon=horizon,
                                num_iterations=args.iterations, max_episode_steps=horizon,
                                plans="always" if args.exploration_noise == 0 else "auto",
                                start_states=args.start_states, pool_size=args.pool_size, device=args.device)
    if args.sampler_steps:
        env.venv.sampler = replace(env.venv.sampler, num_steps=args.sampler_steps)
    env.seed(args.seed)
    return env


def collect_model_data(algorithm, collector, env, n_step: int) -> dict:
    """Refresh the env's policy handle with the current actor, then collect `n_step` model transitions."""
    start = time.monotonic()
    env.set_policy(algorithm)
    before = dict(env.venv.stats)
    stats = collector.collect(n_step=n_step, reset_before_collect=True)
    served = {k: env.venv.stats[k] - before[k] for k in ("plan_steps", "model_steps")}
    return {"n_step": int(stats.n_collected_steps), "episodes": int(stats.n_collected_episodes),
            "seconds": round(time.monotonic() - start, 1), **served}


def _sample(algorithm, buffer, size: int):
    """A batch from one buffer with its TD targets computed against that buffer (n-step returns need it)."""
    from tianshou.data import Batch

    batch, indices = buffer.sample(size)
    batch = algorithm._preprocess_batch(batch, buffer, indices)
    return Batch(obs=batch.obs, act=batch.act, returns=batch.returns, info=Batch())


def mixed_update(algorithm, real_buffer, model_buffer, batch_size: int, real_fraction: float):
    """One TD3BC update on `real_fraction` dataset rows and the rest model rows (all real while the model
    buffer is empty). Call it inside `training_step(algorithm)`."""
    from tianshou.data import Batch

    n_real = batch_size if model_buffer is None or len(model_buffer) == 0 else int(round(batch_size * real_fraction))
    parts = [_sample(algorithm, buf, n) for buf, n in ((real_buffer, n_real), (model_buffer, batch_size - n_real))
             if n > 0]
    return algorithm._update_with_batch(parts[0] if len(parts) == 1 else Batch.cat(parts))


@contextmanager
def training_step(algorithm):
    """What Tianshou's trainer sets around updates: the policy's training-step flag and torch train mode.
    Held for the whole loop (switching per update costs more than a small update); the Collector switches
    the policy to eval mode itself while it collects."""
    from tianshou.utils.torch_utils import policy_within_training_step, torch_train_mode

    with policy_within_training_step(algorithm.policy), torch_train_mode(algorithm):
        yield


def train(algorithm, real_buffer, model_env, args) -> dict:
    """The gradient-step loop with model collections every `--collect-every` steps."""
    from tianshou.data import Collector, VectorReplayBuffer
    from tqdm.auto import tqdm

    collector = None
    model_buffer = None
    collections = []
    if model_env is not None:
        model_buffer = VectorReplayBuffer(args.model_buffer, args.num_envs)
        collector = Collector(algorithm, model_env, model_buffer, exploration_noise=args.exploration_noise > 0)
    last = None
    start = time.monotonic()
    with training_step(algorithm):
        for step in tqdm(range(args.steps), desc="Tianshou TD3BC", unit="step"):
            if collector is not None and step % args.collect_every == 0:
                collections.append(collect_model_data(algorithm, collector, model_env, args.collect_steps))
            last = mixed_update(algorithm, real_buffer, model_buffer, args.batch_size, args.real_fraction)
    losses = {} if last is None else {"actor_loss": float(last.actor_loss), "critic1_loss": float(last.critic1_loss)}
    seconds = time.monotonic() - start
    return {"collections": collections, "model_rows": 0 if model_buffer is None else len(model_buffer),
            "train_seconds": round(seconds, 1),
            "update_seconds": round(seconds - sum(c["seconds"] for c in collections), 1), **losses}


def main(argv=None) -> dict:
    from agents.evaluation import evaluate
    from agents.recipes import default_run_dir, ensure_dataset, refuse_existing_run, task_and_dataset
    from dydiff_env.bundle import check_dataset_matches
    from dydiff_env.policies import as_policy

    args = build_parser().parse_args(argv)
    if not 0.0 <= args.real_fraction <= 1.0:
        raise SystemExit(f"--real-fraction must be in [0, 1], got {args.real_fraction}")
    real_only = args.real_fraction >= 1.0  # no model data: the baseline, with its own default directory
    task, dataset_id = task_and_dataset(args)
    out = args.out or default_run_dir("tianshou_td3bc", args.seed, real_only=real_only, task=task)
    refuse_existing_run(out, args, can_resume=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # Tianshou's buffers sample with numpy's global RNG
    data = ensure_dataset(dataset_id, seed=args.seed)
    env_id = data.env_id or "Hopper-v5"
    model_env = None if real_only else make_model_env(args, env_id)
    if model_env is not None:  # warns when the bundle learned another version of this dataset
        check_dataset_matches(model_env.venv.bundle, data)
    action_space = model_env.single_action_space if model_env is not None else _real_action_space(env_id)
    algorithm = build_algorithm(data, action_space, args)
    log = train(algorithm, dataset_buffer(data), model_env, args)

    actor = as_policy(algorithm)
    result = evaluate(lambda obs: actor(torch.as_tensor(obs)).cpu().numpy(), env_id, episodes=args.eval_episodes,
                      seed=args.seed + 10_000, max_episode_steps=args.eval_max_steps)
    summary = {"algorithm": "Tianshou TD3BC", "gradient_steps": args.steps, "real_fraction": args.real_fraction,
               "dataset_rows": len(data), **log, "env_stats": dict(model_env.venv.stats) if model_env else {},
               "score": result.normalized_mean, "score_std": result.normalized_std, "return": result.mean,
               "score_label": result.label, "eval": result.as_dict()}
    os.makedirs(out, exist_ok=True)
    # the network weights as safetensors, not torch.save: the project writes no pickle
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in algorithm.state_dict().items()
               if isinstance(v, torch.Tensor)}, os.path.join(out, "td3bc.safetensors"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if model_env is not None:
        model_env.close()
    print(json.dumps({k: summary[k] for k in ("score", "score_std", "return", "score_label", "gradient_steps")},
                     indent=1))
    print(result)
    return summary


def _real_action_space(env_id: str):
    import gymnasium as gym

    env = gym.make(env_id)
    space = env.action_space
    env.close()
    return space


if __name__ == "__main__":
    main()
