"""Transition buffers: the real dataset and the FIFO buffer of model-generated rows, and their mixed batches.

A batch is a dict of torch tensors with the keys in `TRANSITION_KEYS`:
obs (B, obs_dim), actions (B, act_dim), rewards (B,), next_obs (B, obs_dim), terminated (B,) float 0/1.
`terminated` is the true termination flag (the MDP ended, no bootstrapping); time-limit truncations are not
in it, so a truncated row still bootstraps from its next observation.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from dydiff_env.data import OfflineData

TRANSITION_KEYS = ("obs", "actions", "rewards", "next_obs", "terminated")


def check_transitions(transitions: Mapping, obs_dim: int, act_dim: int, what: str = "transitions") -> int:
    """Validate a dict of transition arrays / tensors and return its row count.

    rewards and terminated may be (n,) or (n, 1); everything else must match exactly."""
    missing = [k for k in TRANSITION_KEYS if k not in transitions]
    if missing:
        raise KeyError(f"{what} lack keys {missing}; expected {list(TRANSITION_KEYS)}")
    n = len(transitions["obs"])
    expected = {"obs": (n, obs_dim), "actions": (n, act_dim), "next_obs": (n, obs_dim)}
    for key, shape in expected.items():
        got = tuple(transitions[key].shape)
        if got != shape:
            raise ValueError(f"{what}['{key}'] has shape {got}, expected {shape}")
    for key in ("rewards", "terminated"):
        got = tuple(transitions[key].shape)
        if got not in ((n,), (n, 1)):
            raise ValueError(f"{what}['{key}'] has shape {got}, expected ({n},)")
    return n


class ReplayBuffer:
    """Numpy ring buffer of transitions. When full, new rows overwrite the oldest (FIFO)."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.obs_dim, self.act_dim, self.capacity = int(obs_dim), int(act_dim), int(capacity)
        # np.zeros is lazily backed by the OS, so a large, mostly empty model buffer costs little memory
        self._arrays = {
            "obs": np.zeros((capacity, obs_dim), np.float32),
            "actions": np.zeros((capacity, act_dim), np.float32),
            "rewards": np.zeros(capacity, np.float32),
            "next_obs": np.zeros((capacity, obs_dim), np.float32),
            "terminated": np.zeros(capacity, np.float32),
        }
        self._next = 0  # row the next write goes to
        self._size = 0
        self.total_added = 0  # rows ever added, including overwritten ones

    @classmethod
    def from_offline(cls, data: OfflineData, capacity: int | None = None) -> "ReplayBuffer":
        """All transitions of a dataset; `terminations` (not truncations) become `terminated`."""
        if len(data) == 0:
            raise ValueError(f"dataset '{data.dataset_id}' has no transitions")
        buffer = cls(data.obs_dim, data.act_dim, capacity or len(data))
        buffer.add({"obs": data.observations, "actions": data.actions, "rewards": data.rewards,
                    "next_obs": data.next_observations, "terminated": data.terminations})
        return buffer

    def __len__(self) -> int:
        return self._size

    def add(self, transitions: Mapping) -> None:
        """Append rows (dict of arrays or tensors with `TRANSITION_KEYS`); the oldest rows go when full."""
        n = check_transitions(transitions, self.obs_dim, self.act_dim)
        if n == 0:
            return
        rows = {k: _as_numpy(transitions[k]).reshape(n, *self._arrays[k].shape[1:]) for k in TRANSITION_KEYS}
        if n > self.capacity:  # only the newest `capacity` rows would survive anyway
            rows = {k: v[-self.capacity:] for k, v in rows.items()}
            self.total_added += n - self.capacity
            n = self.capacity
        positions = (self._next + np.arange(n)) % self.capacity
        for key, values in rows.items():
            self._arrays[key][positions] = values
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        self.total_added += n

    def sample(self, n: int, generator: np.random.Generator,
               device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """`n` rows drawn uniformly with replacement, as float32 torch tensors on `device`."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        index = generator.integers(0, self._size, size=n)
        return {k: torch.as_tensor(self._arrays[k][index], device=device) for k in TRANSITION_KEYS}

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored rows, oldest first (copies)."""
        order = (np.arange(self._size) + (self._next if self._size == self.capacity else 0)) % self.capacity
        return {k: v[order] for k, v in self._arrays.items()}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "total_added": self.total_added, "rows": self.arrays()}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"buffer capacity mismatch: checkpoint {state['capacity']}, buffer {self.capacity}")
        self._next, self._size = 0, 0
        self.add(state["rows"])
        self.total_added = int(state["total_added"])


def sample_mixed(real: ReplayBuffer, model: ReplayBuffer | None, batch_size: int, real_fraction: float,
                 rng: np.random.Generator, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """A batch of exactly round(real_fraction * batch_size) real rows and the rest model rows.

    With no model buffer, or an empty one, the whole batch is real. Real rows come first."""
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model is None or len(model) == 0:
        return real.sample(batch_size, rng, device)
    n_real = int(round(real_fraction * batch_size))
    parts = []
    if n_real > 0:
        parts.append(real.sample(n_real, rng, device))
    if batch_size - n_real > 0:
        parts.append(model.sample(batch_size - n_real, rng, device))
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in TRANSITION_KEYS}


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
