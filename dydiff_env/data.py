"""Offline datasets: Minari in, flat transitions and trajectory windows out; and the collector that writes them.

- `load_dataset(id)` reads any local Minari dataset (the public `mujoco/hopper/medium-v0` or one made by
  `collect_dataset`) into an `OfflineData` of flat transitions with episode boundaries.
- `TrajectoryWindows` serves windows of H consecutive (state, action) rows inside episodes, with a mask that
  is False on padding, for the diffusion model.
- `Normalizer` holds per-dimension statistics: z-scores for the MLP models, min-max to [-1, 1] for diffusion.
  Un-normalising never clips (the reference clipped whole arrays, hiding model errors).
- `collect_dataset` runs a behaviour policy in the real simulator and writes a Minari dataset with the
  simulator's qpos/qvel of every step in the infos, so any state can be replayed exactly.
- `write_minari_dataset` records `software_versions()` (the packages that can change the data) under
  `VERSIONS_METADATA_KEY` in the dataset's metadata.json; `load_dataset` reads them back.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .tasks import get_task
from .writers import WriterLock


# The dataset `dydiff-env collect hopper-medium` writes and the shipped bundle was trained on
# (dydiff/hopper/medium-v1: the version was bumped when the shipped medium actor changed).
DEFAULT_DATASET_ID = get_task("hopper").dataset_id("medium")


# The key of the software versions in a dataset's metadata.json (next to Minari's own keys).
VERSIONS_METADATA_KEY = "dydiff_env_software_versions"
# The distributions whose versions can change collected or generated data (and trained models).
VERSIONED_PACKAGES = ("mujoco", "gymnasium", "torch", "numpy", "minari", "dydiff-env")


class DatasetNotFoundError(FileNotFoundError):
    pass


def software_versions() -> dict[str, str]:
    """The versions that can change the data: the packages of `VERSIONED_PACKAGES` (from importlib.metadata,
    "not installed" for a missing one) and python. Importing nothing heavy, so any command can call it."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    if versions["dydiff-env"] == "not installed":  # running from a source tree that is not installed
        from . import __version__

        versions["dydiff-env"] = f"{__version__} (source tree)"
    versions["python"] = platform.python_version()
    return versions


def versions_of(value) -> dict[str, str]:
    """The str -> str entries of a recorded versions dict (anything else, e.g. from a hand-edited file, is
    dropped); {} for a value that is not a dict."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


@dataclass
class OfflineData:
    """Flat transitions; row i is (observations[i], actions[i], rewards[i], next_observations[i], ...)."""

    observations: np.ndarray  # (N, obs_dim) float32
    actions: np.ndarray  # (N, act_dim) float32
    rewards: np.ndarray  # (N,) float32
    next_observations: np.ndarray  # (N, obs_dim) float32
    terminations: np.ndarray  # (N,) bool
    truncations: np.ndarray  # (N,) bool
    episode_starts: np.ndarray  # (E,) index of each episode's first transition
    episode_lengths: np.ndarray  # (E,)
    dataset_id: str = ""
    env_id: str = ""
    qpos: np.ndarray | None = None  # (N, nq) simulator state at observations[i], when recorded
    qvel: np.ndarray | None = None
    content_hash: str = field(default="")
    software_versions: dict[str, str] = field(default_factory=dict)  # recorded when written; {} if not recorded

    def __post_init__(self):
        if not self.content_hash:
            self.content_hash = content_hash(self)

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts) if len(self) else np.zeros(0)

    @property
    def dones(self) -> np.ndarray:
        return self.terminations | self.truncations

    def split_episodes(self, holdout_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Transition indices of a train / holdout split by whole episodes (no leakage between windows)."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.episode_starts))
        n_hold = int(round(holdout_fraction * len(order)))
        if holdout_fraction > 0 and len(order) > 1:
            n_hold = min(max(n_hold, 1), len(order) - 1)
        hold_eps = np.zeros(len(order), bool)
        hold_eps[order[:n_hold]] = True
        episode_of_row = np.repeat(np.arange(len(self.episode_starts)), self.episode_lengths)
        mask = hold_eps[episode_of_row]
        return np.flatnonzero(~mask), np.flatnonzero(mask)


def content_hash(data: OfflineData) -> str:
    h = hashlib.sha256()
    for arr in (data.observations, data.actions, data.rewards, data.terminations, data.truncations, data.episode_lengths):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def datasets_path() -> str:
    return os.environ.get("MINARI_DATASETS_PATH", os.path.join(os.path.expanduser("~"), ".minari", "datasets"))


def load_dataset(dataset_id: str) -> OfflineData:
    """Read a local Minari dataset into flat transitions.

    Raises `DatasetNotFoundError` with instructions when the dataset is not under $MINARI_DATASETS_PATH.
    """
    import minari

    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as err:
        raise DatasetNotFoundError(
            f"Minari dataset '{dataset_id}' is not in {datasets_path()} ({err}). Create one in the real simulator "
            f"with `dydiff-env collect hopper-medium` (id {DEFAULT_DATASET_ID}), or download a public one with "
            f"`pip install 'minari[hf]' && minari download {dataset_id}` on a machine with network access."
        ) from err
    obs, acts, rews, next_obs, terms, truncs, lengths, qpos, qvel = [], [], [], [], [], [], [], [], []
    has_state = True
    for ep in dataset.iterate_episodes():
        o = np.asarray(ep.observations, dtype=np.float32)
        if o.ndim != 2:
            raise ValueError(f"{dataset_id}: only flat Box observations are supported, got shape {o.shape}")
        n = len(ep.actions)
        obs.append(o[:-1])
        next_obs.append(o[1:])
        acts.append(np.asarray(ep.actions, dtype=np.float32).reshape(n, -1))
        rews.append(np.asarray(ep.rewards, dtype=np.float32))
        terms.append(np.asarray(ep.terminations, dtype=bool))
        truncs.append(np.asarray(ep.truncations, dtype=bool))
        lengths.append(n)
        infos = ep.infos or {}
        if has_state and "qpos" in infos and "qvel" in infos:
            qpos.append(np.asarray(infos["qpos"], dtype=np.float64)[:n])
            qvel.append(np.asarray(infos["qvel"], dtype=np.float64)[:n])
        else:
            has_state = False
    if not lengths:
        raise ValueError(f"Minari dataset '{dataset_id}' has no episodes")
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    env_spec = dataset.spec.env_spec
    return OfflineData(
        observations=np.concatenate(obs),
        actions=np.concatenate(acts),
        rewards=np.concatenate(rews),
        next_observations=np.concatenate(next_obs),
        terminations=np.concatenate(terms),
        truncations=np.concatenate(truncs),
        episode_starts=np.concatenate([[0], np.cumsum(lengths_arr)[:-1]]).astype(np.int64),
        episode_lengths=lengths_arr,
        dataset_id=dataset_id,
        env_id=env_spec.id if env_spec is not None else "",
        qpos=np.concatenate(qpos) if has_state else None,
        qvel=np.concatenate(qvel) if has_state else None,
        software_versions=versions_of(dataset.storage.metadata.get(VERSIONS_METADATA_KEY)),
    )


@dataclass
class Normalizer:
    """Per-dimension statistics of a block of features (states, actions, or both concatenated)."""

    mean: np.ndarray
    std: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, eps: float = 1e-6) -> "Normalizer":
        x = np.asarray(x, dtype=np.float64)
        low, high = x.min(0), x.max(0)
        # constant dimensions get a unit range centred on their value, so they map to 0 (no division by zero)
        constant = high - low < eps
        low, high = np.where(constant, low - 0.5, low), np.where(constant, high + 0.5, high)
        return cls(x.mean(0).astype(np.float32), np.maximum(x.std(0), eps).astype(np.float32),
                   low.astype(np.float32), high.astype(np.float32))

    def to_dict(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("mean", "std", "low", "high")}

    @classmethod
    def from_dict(cls, d: dict, prefix: str) -> "Normalizer":
        return cls(*(np.asarray(d[f"{prefix}.{k}"], dtype=np.float32) for k in ("mean", "std", "low", "high")))

    # Works on numpy arrays and torch tensors alike (the statistics are converted to the input's type).
    def _cast(self, x, arr):
        if isinstance(x, np.ndarray):
            return arr
        import torch

        return torch.as_tensor(arr, dtype=x.dtype, device=x.device)

    def zscore(self, x):
        return (x - self._cast(x, self.mean)) / self._cast(x, self.std)

    def unzscore(self, z):
        return z * self._cast(z, self.std) + self._cast(z, self.mean)

    def to_unit(self, x):
        """Min-max to [-1, 1] over the dataset range."""
        low, high = self._cast(x, self.low), self._cast(x, self.high)
        return 2.0 * (x - low) / (high - low) - 1.0

    def from_unit(self, u):
        """Inverse of `to_unit`; values outside [-1, 1] stay outside (no clipping hides model errors)."""
        low, high = self._cast(u, self.low), self._cast(u, self.high)
        return (u + 1.0) * 0.5 * (high - low) + low


class TrajectoryWindows:
    """Stride-1 windows of `horizon` consecutive (state, action) rows inside episodes.

    A window starts at every step that leaves at least `min_valid_rows` real rows before its episode ends;
    the rest of the window is padding (the last real row repeated) with mask False. Episodes shorter than
    `min_valid_rows` give one padded window from their start. Windows are gathered on demand, so memory
    stays O(N) whatever the horizon.
    """

    def __init__(self, data: OfflineData, horizon: int, min_valid_rows: int | None = None,
                 rows: np.ndarray | None = None):
        if horizon < 2:
            raise ValueError(f"horizon must be >= 2, got {horizon}")
        self.horizon = horizon
        self.min_valid_rows = horizon if min_valid_rows is None else int(min_valid_rows)
        if not 1 <= self.min_valid_rows <= horizon:
            raise ValueError(f"min_valid_rows must be in [1, horizon={horizon}], got {min_valid_rows}")
        self.features = np.concatenate([data.observations, data.actions], axis=1).astype(np.float32)
        episode_of_row = np.repeat(np.arange(len(data.episode_starts)), data.episode_lengths)
        episode_end = (data.episode_starts + data.episode_lengths)[episode_of_row]  # exclusive end of each row's episode
        episode_start = data.episode_starts[episode_of_row]
        remaining = episode_end - np.arange(len(data))
        ok = (remaining >= self.min_valid_rows) | (np.arange(len(data)) == episode_start)
        if rows is not None:  # restrict to a subset of rows (e.g. a train/holdout split of whole episodes)
            keep = np.zeros(len(data), bool)
            keep[rows] = True
            ok &= keep
        self.starts = np.flatnonzero(ok)
        self.ends = episode_end[self.starts]

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows `index` as features (B, H, obs+act) and mask (B, H), True on real rows."""
        starts, ends = self.starts[index], self.ends[index]
        rows = starts[:, None] + np.arange(self.horizon)[None, :]
        mask = rows < ends[:, None]
        rows = np.minimum(rows, ends[:, None] - 1)
        return self.features[rows], mask


# ----------------------------------------------------------------------------------------------------------------
# Collection in the real simulator


def _sim_state(env) -> tuple[np.ndarray, np.ndarray]:
    data = env.unwrapped.data
    return data.qpos.copy(), data.qvel.copy()


def collect_episodes(env_id: str, policy: Callable[[np.ndarray], np.ndarray], num_steps: int, seed: int = 0,
                     progress: bool = True) -> list:
    """Run `policy` (batch of obs -> batch of actions) in the real env for at least `num_steps` transitions,
    whole episodes only. Returns Minari `EpisodeBuffer`s whose infos hold qpos/qvel at every observation."""
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer
    from tqdm.auto import tqdm

    env = gym.make(env_id)
    buffers, steps, episode = [], 0, 0
    bar = tqdm(total=num_steps, desc=f"collect {env_id}", unit="step", disable=not progress)
    while steps < num_steps:
        obs, _ = env.reset(seed=seed + episode)
        qp, qv = _sim_state(env)
        observations, actions, rewards, terms, truncs, qpos, qvel = [obs], [], [], [], [], [qp], [qv]
        done = False
        while not done:
            action = np.clip(np.asarray(policy(obs[None].astype(np.float32)), dtype=np.float32)[0], -1.0, 1.0)
            obs, reward, terminated, truncated, _ = env.step(action)
            qp, qv = _sim_state(env)
            observations.append(obs), actions.append(action), rewards.append(float(reward))
            terms.append(bool(terminated)), truncs.append(bool(truncated)), qpos.append(qp), qvel.append(qv)
            done = terminated or truncated
        buffers.append(EpisodeBuffer(
            id=episode, seed=seed + episode, observations=np.asarray(observations), actions=np.asarray(actions),
            rewards=rewards, terminations=terms, truncations=truncs,
            infos={"qpos": np.asarray(qpos), "qvel": np.asarray(qvel)},
        ))
        steps += len(actions)
        episode += 1
        bar.update(len(actions))
    bar.close()
    env.close()
    return buffers


def dataset_lock(dataset_id: str) -> WriterLock:
    """The lock of one dataset id, held while it is collected and written (`dydiff-env collect`). It lives in a
    hidden directory of MINARI_DATASETS_PATH, which Minari does not read as a dataset namespace."""
    file = dataset_id.replace("/", "--") + ".lock"  # one flat file per id, always inside the lock directory
    return WriterLock(Path(datasets_path()) / ".dydiff-env-locks" / file, f"Minari dataset '{dataset_id}'")


def dataset_exists(dataset_id: str) -> bool:
    """Whether a local Minari dataset has this id."""
    import minari

    return dataset_id in minari.list_local_datasets()


def check_dataset_id(dataset_id: str) -> None:
    """Raise ValueError unless `dataset_id` is a Minari id, `(namespace/)name-v<version>` (checked before any work)."""
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # Minari raises TypeError for an id without a version
        raise ValueError(f"'{dataset_id}' is not a Minari dataset id; use the form namespace/name-v<version>, "
                         "e.g. dydiff/hopper/generated-v0") from None


def refuse_existing_dataset(dataset_id: str, overwrite: bool = False) -> None:
    """Raise FileExistsError if the dataset exists and may not be replaced (checked before collecting)."""
    if not overwrite and dataset_exists(dataset_id):
        raise FileExistsError(f"Minari dataset '{dataset_id}' already exists in {datasets_path()}; "
                              "pass --overwrite to replace it")


def write_minari_dataset(dataset_id: str, env_id: str, buffers: list, description: str = "",
                         algorithm_name: str = "", overwrite: bool = False, metadata: dict | None = None):
    """Write episode buffers as a Minari dataset with the task's reference scores; `metadata` (JSON values) is
    added to the dataset's metadata.json, and so are `software_versions()` (under `VERSIONS_METADATA_KEY`). A writer that may run beside another one on the same id holds
    `dataset_lock(dataset_id)` around this (the CLI does). Returns the `minari.MinariDataset`, to which
    further episodes can be appended with `update_dataset_from_buffer`."""
    import minari

    refuse_existing_dataset(dataset_id, overwrite)
    if dataset_exists(dataset_id):
        minari.delete_dataset(dataset_id)
    task = get_task(env_id)
    dataset = minari.create_dataset_from_buffers(
        dataset_id=dataset_id, buffer=buffers, env=env_id, algorithm_name=algorithm_name or "dydiff-env collect",
        author="dydiff-env", author_email="dydiff-env@users.noreply.github.com",
        code_permalink="https://github.com/dydiff-env/dydiff-env", description=description,
        ref_min_score=task.ref_min_score, ref_max_score=task.ref_max_score,
    )
    dataset.storage.update_metadata({VERSIONS_METADATA_KEY: software_versions(), **(metadata or {})})
    return dataset
