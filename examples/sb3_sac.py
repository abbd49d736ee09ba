"""Stable-Baselines3 SAC (or TD3) on DydiffEnv, as a user runs it: the replay buffer starts with the offline
dataset, the agent then collects from the learned simulator with its own exploration (SAC: SB3's random
warm-up, then its stochastic actions), and the score is measured in the real Hopper-v5.

    python examples/sb3_sac.py                       # 20k env transitions from 8 sub-envs, a few minutes
    python examples/sb3_sac.py --algo td3 --steps 50000

How it fits together:
- `SB3VecEnv` (dydiff_env.adapters) presents a SAME_STEP-autoreset DydiffEnv as an SB3 `VecEnv`.
- SB3 has no offline algorithms, so the replay buffer is pre-filled with every dataset transition before
  `learn`; SB3 samples it uniformly together with what the agent collects in the model.
- An exploring agent does not act as a policy handle, so DydiffEnv serves it from its single-step model
  (Markov, batched, no diffusion run): it runs at simulator speed. `--handle-every N` makes the SB3 model the
  env's policy handle every N transitions (`env_method("set_policy", model)`), which pays only for an agent
  that acts deterministically (TD3 with `--action-noise 0`): its episodes are then served DyDiff plans.

This is an integration example with plain online algorithms (no behaviour-cloning term or pessimism), trained
briefly: expect a score well below examples/tianshou_td3bc.py or examples/train_td3bc.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

DEFAULT_STEPS = 20_000  # env transitions: 2,500 steps of 8 sub-envs, one gradient step each (SB3's defaults)


def build_parser() -> argparse.ArgumentParser:
    from agents.recipes import add_shared_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(p)
    p.add_argument("--algo", choices=("sac", "td3"), default="sac", help="SB3 algorithm (default sac)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="env transitions collected in the model")
    p.add_argument("--num-envs", type=int, default=8, help="DydiffEnv sub-environments")
    p.add_argument("--handle-every", type=int, default=0,
                   help="env transitions between policy-handle refreshes (0: never set a handle)")
    p.add_argument("--gradient-steps", type=int, default=1, help="gradient steps per vector-env step (SB3's default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-starts", type=int, default=100,
                   help="env transitions of uniform random warm-up before the actor acts (SB3's default 100)")
    p.add_argument("--action-noise", type=float, default=0.1, help="std of TD3's Gaussian exploration noise")
    p.add_argument("--pool-size", type=int, default=32,
                   help="kept plans per pool generation (plans for episode starts; each costs diffusion time)")
    return p


def make_env(args, task: str):
    """The learned simulator as an SB3 VecEnv (SAME_STEP autoreset, as SB3 expects)."""
    from dydiff_env.adapters import make_sb3_vec_env

    env = make_sb3_vec_env(args.num_envs, bundle=args.bundle, task=task, num_iterations=args.iterations,
                           pool_size=args.pool_size, start_states=args.start_states, device=args.device)
    # when a handle is set, plans are only served to sub-envs whose agent acts as it (plans="auto")
    if args.sampler_steps:
        env.venv.sampler = replace(env.venv.sampler, num_steps=args.sampler_steps)
    env.seed(args.seed)
    return env


def prefill_replay_buffer(buffer, data) -> int:
    """Write the dataset into SB3's (buffer_size, n_envs, ...) arrays, n_envs transitions per row, exactly as
    `ReplayBuffer.add` would store them (timeouts: truncated, not terminated). The last len(data) % n_envs
    transitions do not fill a row and are left out. Returns the rows written."""
    n_envs = buffer.n_envs
    rows = len(data) // n_envs
    if rows == 0:
        raise ValueError(f"the dataset has {len(data)} transitions, fewer than --num-envs={n_envs}")
    if rows >= buffer.buffer_size:
        raise ValueError(f"buffer_size {buffer.buffer_size} cannot hold {rows} dataset rows; raise it")
    count = rows * n_envs
    columns = {
        "observations": data.observations, "next_observations": data.next_observations, "actions": data.actions,
        "rewards": data.rewards, "dones": data.dones, "timeouts": data.truncations & ~data.terminations,
    }
    for name, values in columns.items():
        target = getattr(buffer, name)
        target[:rows] = np.asarray(values[:count]).reshape(rows, n_envs, *target.shape[2:]).astype(target.dtype)
    buffer.pos, buffer.full = rows, False
    return rows


def policy_handle_callback(every: int):
    """An SB3 callback that hands the model to the env as its policy handle every `every` transitions."""
    from stable_baselines3.common.callbacks import BaseCallback

    class PolicyHandleCallback(BaseCallback):
        """Keeps the DydiffEnv's plans following the current actor (the pool is regenerated with it)."""

        def __init__(self):
            super().__init__()
            self.last_refresh = 0
            self.refreshes = 0

        def _on_step(self) -> bool:
            if self.num_timesteps - self.last_refresh >= every:
                self.training_env.env_method("set_policy", self.model)
                self.last_refresh = self.num_timesteps
                self.refreshes += 1
            return True

    return PolicyHandleCallback()


def progress_callback(total: int):
    """A tqdm bar over env transitions (SB3's own `progress_bar=True` needs `rich`, which we do not require)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    class ProgressCallback(BaseCallback):
        def _on_training_start(self) -> None:
            self.bar = tqdm(total=total, desc=f"SB3 {type(self.model).__name__} on DydiffEnv", unit="transition")

        def _on_step(self) -> bool:
            self.bar.update(min(self.num_timesteps, total) - self.bar.n)
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return ProgressCallback()


def build_model(env, args, buffer_size: int):
    """SB3's defaults but for the buffer size (dataset + collected), batch size and gradient steps."""
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.noise import NormalActionNoise

    common = dict(buffer_size=buffer_size, batch_size=args.batch_size, train_freq=1, learning_starts=args.learning_starts,
                  gradient_steps=args.gradient_steps, seed=args.seed, device=args.device, verbose=0)
    if args.algo == "sac":
        return SAC("MlpPolicy", env, **common)
    act_dim = env.action_space.shape[0]
    noise = None
    if args.action_noise > 0:
        noise = NormalActionNoise(np.zeros(act_dim), args.action_noise * np.ones(act_dim))
    return TD3("MlpPolicy", env, action_noise=noise, **common)


def save_actor(model, path: str) -> None:
    """The trained actor's weights as safetensors (no pickle: SB3's own `save` writes a pickled zip)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.actor.state_dict().items()}, path)


def main(argv=None) -> dict:
    from stable_baselines3.common.vec_env import VecMonitor

    from agents.evaluation import evaluate
    from agents.recipes import default_run_dir, ensure_dataset, refuse_existing_run, task_and_dataset
    from dydiff_env.bundle import check_dataset_matches

    args = build_parser().parse_args(argv)
    task, dataset_id = task_and_dataset(args)
    out = args.out or default_run_dir(f"sb3_{args.algo}", args.seed, task=task)
    refuse_existing_run(out, args, can_resume=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = ensure_dataset(dataset_id, seed=args.seed)
    env_id = data.env_id or "Hopper-v5"
    env = make_env(args, env_id)
    check_dataset_matches(env.venv.bundle, data)  # warns when the bundle learned another version of this dataset
    # SB3 counts buffer_size in transitions (rows of n_envs each): the dataset plus everything collected
    model = build_model(VecMonitor(env), args, buffer_size=len(data) + args.steps + 2 * args.num_envs)
    rows = prefill_replay_buffer(model.replay_buffer, data)
    callbacks = [progress_callback(args.steps)]
    handle = None
    if args.handle_every:
        env.set_policy(model)
        handle = policy_handle_callback(args.handle_every)
        callbacks.append(handle)
    start = time.monotonic()
    model.learn(total_timesteps=args.steps, callback=callbacks)
    train_seconds = time.monotonic() - start

    result = evaluate(lambda obs: model.predict(obs, deterministic=True)[0], env_id, episodes=args.eval_episodes,
                      seed=args.seed + 10_000, max_episode_steps=args.eval_max_steps)
    summary = {"algorithm": f"SB3 {args.algo.upper()}", "env_steps": args.steps, "num_envs": args.num_envs,
               "dataset_rows": rows * args.num_envs, "policy_refreshes": handle.refreshes if handle else 0,
               "env_stats": dict(env.venv.stats), "train_seconds": round(train_seconds, 1),
               "env_transitions_per_s": round(args.steps / train_seconds, 1),
               "score": result.normalized_mean, "score_std": result.normalized_std, "return": result.mean,
               "score_label": result.label, "eval": result.as_dict()}
    os.makedirs(out, exist_ok=True)
    save_actor(model, os.path.join(out, "actor.safetensors"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    env.close()
    print(json.dumps({k: summary[k] for k in ("score", "score_std", "return", "score_label", "env_steps")}, indent=1))
    print(result)
    return summary


if __name__ == "__main__":
    main()
