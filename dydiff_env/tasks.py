"""Task facts, one place per task: the real env, termination rule (from the Gymnasium v5 sources), D4RL
reference scores, and the collect presets built from the shipped behaviour actors. A fourth task is one
termination rule, one `Task` entry and its actors under `assets/behaviour/`.

Each termination rule works on batched observations, numpy or torch, and returns a boolean array
`terminated[...]`. A non-finite observation always counts as terminated (the real env's `is_healthy`
compares NaN as unhealthy too).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np


def _lib(x):
    # torch is not imported here: importing the package (and `dydiff-env --help`) must not pay for it. A tensor
    # can only exist once torch is imported, so sys.modules tells whether x may be one.
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else np


def hopper_terminated(obs):
    """Hopper-v5: healthy iff every entry of obs[1:] (qpos[2:] and clipped qvel) lies in (-100, 100),
    height obs[0] > 0.7 and torso angle obs[1] in (-0.2, 0.2). The reference checks `abs(x < 100)`,
    which never fails; here every bound is checked."""
    lib = _lib(obs)
    finite = lib.isfinite(obs).all(-1)
    state_ok = (lib.abs(obs[..., 1:]) < 100.0).all(-1)
    healthy = finite & state_ok & (obs[..., 0] > 0.7) & (obs[..., 1] > -0.2) & (obs[..., 1] < 0.2)
    return ~healthy


def walker2d_terminated(obs):
    """Walker2d-v5: healthy iff height obs[0] in (0.8, 2.0) and torso angle obs[1] in (-1, 1)."""
    lib = _lib(obs)
    finite = lib.isfinite(obs).all(-1)
    healthy = finite & (obs[..., 0] > 0.8) & (obs[..., 0] < 2.0) & (obs[..., 1] > -1.0) & (obs[..., 1] < 1.0)
    return ~healthy


def halfcheetah_terminated(obs):
    """HalfCheetah-v5 never terminates; only non-finite states end an episode here."""
    return ~_lib(obs).isfinite(obs).all(-1)


@dataclass(frozen=True)
class Task:
    name: str  # short name used in ids: "hopper"
    env_id: str  # the real Gymnasium env
    obs_dim: int
    act_dim: int
    terminated: Callable
    max_episode_steps: int
    # D4RL reference returns (set on the -v2 envs; we label scores "D4RL-normalised on <env_id>")
    ref_min_score: float
    ref_max_score: float
    # Where the MuJoCo state sits in an observation, for drawing a model's state (`dydiff_env.render`). The v5
    # locomotion envs observe [qpos[hidden_qpos:], qvel]: the root's x position qpos[0] is left out, and its
    # velocity qvel[0] is observed at `x_velocity_index`, so the x position integrates it over `dt`.
    dt: float  # seconds per env step (frame_skip x the MuJoCo timestep)
    x_velocity_index: int
    hidden_qpos: int = 1
    # version of each collect level's Minari dataset (`dydiff/<task>/<level>-v<N>`), bumped when its actors change
    dataset_versions: tuple[tuple[str, int], ...] = ()  # (level, N) pairs; a tuple keeps Task hashable

    def dataset_id(self, level: str = "medium") -> str:
        """The Minari id the `<task>-<level>` collect preset writes: `dydiff/hopper/medium-v1`."""
        if level not in LEVELS:
            raise ValueError(f"unknown dataset level '{level}'; known levels: {sorted(LEVELS)}")
        return f"dydiff/{self.name}/{level}-v{dict(self.dataset_versions).get(level, 0)}"

    @property
    def render_fps(self) -> int:
        """Frames per second of real time, as the real env's metadata reports it."""
        return int(round(1.0 / self.dt))

    def normalized_score(self, returns):
        """D4RL-normalised score x100."""
        return 100.0 * (np.asarray(returns, dtype=np.float64) - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


TASKS: dict[str, Task] = {
    # obs: hopper qpos[1:] (5) + qvel (6); walker2d and halfcheetah qpos[1:] (8) + qvel (9). The shipped actors
    # of each task are snapshots of one SAC run (assets/behaviour/<task>-sac-snapshots.csv; which step each is:
    # docs/datasets.md).
    "hopper": Task("hopper", "Hopper-v5", 11, 3, hopper_terminated, 1000, -20.272305, 3234.3,
                   dt=0.008, x_velocity_index=5, dataset_versions=(("medium", 1), ("medium-replay", 1))),
    "walker2d": Task("walker2d", "Walker2d-v5", 17, 6, walker2d_terminated, 1000, 1.629008, 4592.3,
                     dt=0.008, x_velocity_index=8),
    "halfcheetah": Task("halfcheetah", "HalfCheetah-v5", 17, 6, halfcheetah_terminated, 1000, -280.178953, 12135.0,
                        dt=0.05, x_velocity_index=8, dataset_versions=(("medium", 1), ("medium-replay", 1))),
}


@dataclass(frozen=True)
class CollectPreset:
    """What `dydiff-env collect <task>-<level>` runs in the real simulator."""

    task: str
    dataset_id: str
    actors: tuple[str, ...]  # shipped actor names ("random": uniform actions), each run for an equal share of the steps
    num_steps: int
    description: str


# The D4RL recipes, the same for every task: (actors, steps, what the dataset is)
LEVELS: dict[str, tuple[tuple[str, ...], int, str]] = {
    "medium": (("medium",), 200_000,
               "the stochastic medium SAC snapshot, whole episodes (D4RL 'medium' recipe)"),
    "medium-replay": (("replay-1", "replay-2", "replay-3", "medium"), 200_000,
                      "equal shares of SAC snapshots from early training up to the medium snapshot (a reproducible "
                      "stand-in for D4RL 'medium-replay', which is the replay buffer itself)"),
    "expert": (("expert",), 200_000, "the stochastic expert SAC snapshot"),
    # the medium half is the same episodes as <task>-medium (same actor, seed and share), as in D4RL
    "medium-expert": (("medium", "expert"), 400_000,
                      "the <task>-medium episodes plus as many steps of the expert snapshot (D4RL 'medium-expert')"),
    "random": (("random",), 100_000, "uniform random actions"),
}

COLLECT_PRESETS: dict[str, CollectPreset] = {
    f"{task.name}-{level}": CollectPreset(task.name, task.dataset_id(level), actors, steps,
                                          f"{task.env_id}, {what.replace('<task>', task.name)}.")
    for task in TASKS.values() for level, (actors, steps, what) in LEVELS.items()
}


def preset_for_dataset(dataset_id: str) -> str | None:
    """The collect preset that writes `dataset_id`, or None when no preset does."""
    return next((name for name, preset in COLLECT_PRESETS.items() if preset.dataset_id == dataset_id), None)


def get_task(name_or_env_id: str) -> Task:
    """Look a task up by short name ("hopper"), env id ("Hopper-v5") or Minari id ("mujoco/hopper/medium-v0")."""
    key = name_or_env_id.lower()
    for task in TASKS.values():
        if key in (task.name, task.env_id.lower()) or f"/{task.name}/" in f"/{key}/":
            return task
        # "hopper-medium" style names, but not another version of the env ("hopper-v4" is not Hopper-v5)
        if key.startswith(f"{task.name}-") and not re.fullmatch(rf"{task.name}-v\d+", key):
            return task
    raise ValueError(f"unknown task '{name_or_env_id}'; known tasks: {sorted(TASKS)} ({[t.env_id for t in TASKS.values()]})")
