"""Behaviour policies: the agents that collect the offline datasets.

`train_sac` trains a Stable-Baselines3 SAC agent in the real simulator and exports an actor snapshot
every `snapshot_every` steps as a small safetensors file (no pickle) together with its measured return.
`GaussianActor` is a dependency-free torch copy of SB3's SAC actor (tanh-squashed Gaussian, 256-256 ReLU)
that loads those files, so collecting data never needs SB3 or a pickled model.

Shipped snapshots live in `dydiff_env/assets/behaviour/<task>-<name>.safetensors`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

ASSET_DIR = Path(__file__).parent / "assets" / "behaviour"
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # SB3's SAC bounds


class GaussianActor(nn.Module):
    """tanh-Gaussian MLP actor with the layout of SB3's SAC actor (`latent_pi`, `mu`, `log_std`)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        last = obs_dim
        for width in hidden:
            layers += [nn.Linear(last, width), nn.ReLU()]
            last = width
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(last, act_dim)
        self.log_std = nn.Linear(last, act_dim)
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, tuple(hidden)

    def forward(self, obs: torch.Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        latent = self.latent_pi(obs)
        mean = self.mu(latent)
        if deterministic:
            return torch.tanh(mean)
        std = self.log_std(latent).clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        # drawn on the generator's device (a CPU generator drives an actor on a GPU), then moved
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=generator.device if generator is not None else mean.device).to(mean.device)
        return torch.tanh(mean + std * noise)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False, generator: torch.Generator | None = None) -> np.ndarray:
        """numpy in, numpy out (float32, within [-1, 1])."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        return self(x, deterministic=deterministic, generator=generator).numpy()

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        meta = {"obs_dim": str(self.obs_dim), "act_dim": str(self.act_dim), "hidden": json.dumps(list(self.hidden))}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in self.state_dict().items()}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianActor":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"behaviour actor {path} not found; train one with `dydiff-env behaviour train`")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            actor = cls(int(meta["obs_dim"]), int(meta["act_dim"]), tuple(json.loads(meta["hidden"])))
            actor.load_state_dict(load_file(str(path)))
        except KeyError as err:
            raise ValueError(f"{path} is not a dydiff-env behaviour actor (metadata {err} missing)") from err
        except (SafetensorError, ValueError, TypeError, RuntimeError) as err:  # not safetensors, bad metadata, shapes
            raise ValueError(f"{path} is not a readable dydiff-env behaviour actor ({err}); pass a snapshot "
                             "written by `dydiff-env behaviour train`") from err
        actor.metadata = meta
        return actor.eval()

    @classmethod
    def from_sb3(cls, sb3_actor) -> "GaussianActor":
        """Copy the weights of an SB3 SAC `model.actor` (default MLP features extractor).

        The copy is built under a forked torch RNG: its throw-away initial weights would otherwise draw from
        the global generator that SB3 trains with, so taking snapshots more or less often changed training.
        """
        linears = [m for m in sb3_actor.latent_pi if isinstance(m, nn.Linear)]
        obs_dim = linears[0].in_features
        with torch.random.fork_rng(devices=[]):
            actor = cls(obs_dim, sb3_actor.mu.out_features, tuple(m.out_features for m in linears))
        actor.latent_pi.load_state_dict(sb3_actor.latent_pi.state_dict())
        actor.mu.load_state_dict(sb3_actor.mu.state_dict())
        actor.log_std.load_state_dict(sb3_actor.log_std.state_dict())
        return actor.eval()


def shipped_actor_path(task: str, name: str) -> Path:
    return ASSET_DIR / f"{task}-{name}.safetensors"


def load_shipped_actor(task: str, name: str) -> GaussianActor:
    path = shipped_actor_path(task, name)
    if not path.is_file():
        available = sorted(p.stem for p in ASSET_DIR.glob("*.safetensors"))
        raise FileNotFoundError(
            f"no shipped behaviour actor '{task}-{name}' (available: {available}); "
            "train one with `dydiff-env behaviour train` and pass its snapshot with --actor"
        )
    return GaussianActor.load(path)


def snapshot_policy(path: str | os.PathLike, device: str | torch.device = "cpu", deterministic: bool = True,
                    generator: torch.Generator | None = None, obs_dim: int | None = None,
                    act_dim: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A behaviour snapshot (.safetensors, e.g. a shipped `assets/behaviour/hopper-expert.safetensors`) as a torch
    batch policy, obs (B, obs_dim) -> actions (B, act_dim): the mean action, or sampled with `generator` when not
    `deterministic`. Pass `obs_dim` / `act_dim` to refuse a snapshot of another env at once."""
    actor = GaussianActor.load(path).to(device)
    expected = (obs_dim or actor.obs_dim, act_dim or actor.act_dim)
    if (actor.obs_dim, actor.act_dim) != expected:
        raise ValueError(f"snapshot {path} maps {actor.obs_dim} observations to {actor.act_dim} actions, but "
                         f"{expected[0]} observations and {expected[1]} actions are needed; pass a snapshot of "
                         "the same env")

    def policy(obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return actor(obs, deterministic=deterministic, generator=generator)

    return policy


def evaluate_actor(actor, env_id: str, episodes: int = 5, seed: int = 0, deterministic: bool = False) -> tuple[float, float]:
    """Mean and std of the undiscounted return of `actor` in the real simulator."""
    import gymnasium as gym

    env = gym.make(env_id)
    if env.observation_space.shape != (actor.obs_dim,) or env.action_space.shape != (actor.act_dim,):
        env.close()
        raise ValueError(f"the actor maps {actor.obs_dim} observations to {actor.act_dim} actions, but {env_id} has "
                         f"{env.observation_space.shape[0]} and {env.action_space.shape[0]}; pass an actor of that env")
    gen = torch.Generator().manual_seed(seed)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total = False, 0.0
        while not done:
            action = actor.act(obs[None], deterministic=deterministic, generator=gen)[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


@dataclass
class SACTrainConfig:
    env_id: str = "Hopper-v5"
    total_steps: int = 300_000
    snapshot_every: int = 10_000
    eval_episodes: int = 5
    learning_starts: int = 10_000
    seed: int = 0


def train_sac(out_dir: str | os.PathLike, config: SACTrainConfig = SACTrainConfig()) -> list[dict]:
    """Train SB3 SAC and write `step_<k>.safetensors` snapshots plus `snapshots.csv` (step, return mean/std).

    Returns the snapshot table. Snapshots are exported as we go, so an interrupted run keeps them.
    """
    import csv

    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table: list[dict] = []

    class Snapshot(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % config.snapshot_every == 0:
                actor = GaussianActor.from_sb3(self.model.actor)
                mean, std = evaluate_actor(actor, config.env_id, config.eval_episodes, seed=10_000 + self.num_timesteps)
                row = {"step": self.num_timesteps, "return_mean": round(mean, 2), "return_std": round(std, 2)}
                actor.save(out / f"step_{self.num_timesteps}.safetensors", {"env_id": config.env_id, **row})
                table.append(row)
                with open(out / "snapshots.csv", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    writer.writeheader()
                    writer.writerows(table)
                print(f"[behaviour] step {self.num_timesteps}: return {mean:.1f} +- {std:.1f}", flush=True)
            return True

    env = gym.make(config.env_id)
    model = SAC("MlpPolicy", env, seed=config.seed, learning_starts=config.learning_starts, verbose=0, device="cpu")
    model.learn(total_timesteps=config.total_steps, callback=Snapshot(), progress_bar=False)
    return table
