"""Policy evaluation in the real Gymnasium simulator.

`evaluate` runs `episodes` episodes side by side, one env each (episode i resets with seed + i, so the start
states are the same at every evaluation), and calls the policy once per step on the batch of still-running
episodes. Actions are clipped to the action space. Scores are D4RL-normalised with the task's reference returns
(x100) and labelled with the env actually used, e.g. "on Hopper-v5" (the D4RL references were measured on -v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dydiff_env.tasks import get_task


@dataclass
class EvalResult:
    env_id: str
    returns: np.ndarray  # (episodes,) undiscounted episode returns
    lengths: np.ndarray  # (episodes,) steps per episode
    normalized_returns: np.ndarray  # (episodes,) D4RL-normalised x100; NaN when the env has no reference scores
    mean: float
    std: float
    normalized_mean: float
    normalized_std: float

    @classmethod
    def from_returns(cls, env_id: str, returns, lengths) -> "EvalResult":
        returns = np.asarray(returns, dtype=np.float64)
        try:
            normalized = np.asarray(get_task(env_id).normalized_score(returns), dtype=np.float64)
        except ValueError:  # an env without reference scores: raw returns only
            normalized = np.full_like(returns, np.nan)
        return cls(env_id, returns, np.asarray(lengths, dtype=np.int64), normalized,
                   float(returns.mean()), float(returns.std()), float(normalized.mean()), float(normalized.std()))

    @property
    def label(self) -> str:
        return f"D4RL-normalised score on {self.env_id}"

    def as_dict(self) -> dict:
        """Scalars for logs and JSON summaries."""
        return {"env_id": self.env_id, "episodes": int(len(self.returns)), "return_mean": self.mean,
                "return_std": self.std, "normalized_mean": self.normalized_mean,
                "normalized_std": self.normalized_std, "length_mean": float(self.lengths.mean())}

    def __str__(self) -> str:
        return (f"return {self.mean:.1f} ± {self.std:.1f}, {self.label} {self.normalized_mean:.1f} ± "
                f"{self.normalized_std:.1f} over {len(self.returns)} episodes")


def evaluate(policy_fn: Callable[[np.ndarray], np.ndarray], env_id: str = "Hopper-v5", episodes: int = 10,
             seed: int = 0, max_episode_steps: int | None = None) -> EvalResult:
    """Returns of `episodes` episodes of `policy_fn` (numpy obs (B, obs_dim) -> actions (B, act_dim)) in the
    real env `env_id`. `max_episode_steps` overrides the env's time limit (for quick checks)."""
    import gymnasium as gym

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": int(max_episode_steps)}
    envs = [gym.make(env_id, **kwargs) for _ in range(episodes)]
    try:
        space = envs[0].action_space
        if not isinstance(space, gym.spaces.Box):
            raise ValueError(f"{env_id}: only Box action spaces are supported, got {space}")
        obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
        returns = np.zeros(episodes)
        lengths = np.zeros(episodes, dtype=np.int64)
        running = list(range(episodes))
        while running:
            batch = np.stack([obs[i] for i in running]).astype(np.float32)
            actions = np.asarray(policy_fn(batch), dtype=np.float32)
            if actions.shape != (len(running), *space.shape):
                raise ValueError(f"policy_fn returned actions of shape {actions.shape} for {len(running)} "
                                 f"observations; expected {(len(running), *space.shape)}")
            if not np.all(np.isfinite(actions)):
                raise ValueError("policy_fn returned non-finite actions")
            actions = np.clip(actions, space.low, space.high)
            still_running = []
            for i, action in zip(running, actions):
                obs[i], reward, terminated, truncated, _ = envs[i].step(action)
                returns[i] += float(reward)
                lengths[i] += 1
                if not (terminated or truncated):
                    still_running.append(i)
            running = still_running
    finally:
        for env in envs:
            env.close()
    return EvalResult.from_returns(env_id, returns, lengths)
