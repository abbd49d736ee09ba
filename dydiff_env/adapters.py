"""DydiffEnv behind the vector-env interfaces of Stable-Baselines3 and Tianshou.

Neither library accepts a `gymnasium.vector.VectorEnv`: SB3 takes only its own `VecEnv`, Tianshou's
`Collector` wants a `BaseVectorEnv` (or an envpool-like object). Both adapters wrap one `DydiffEnv`, whose
sub-envs share one model bundle, one plan pool and one policy handle: attributes and methods reached
through the adapters (`get_attr`, `env_method`, `get_env_attr`...) are those of that single `DydiffEnv`.

`SB3VecEnv(venv)` (a `stable_baselines3.common.vec_env.VecEnv`), over a DydiffEnv with
`autoreset_mode="SAME_STEP"` (`make_sb3_vec_env(num_envs, **kwargs)` builds one):
- `reset()` returns the observations only; the seeds from `seed(s)` (s, s+1, ...) and the options from
  `set_options` are used once, at the next reset; per-env reset infos are in `reset_infos`.
- `step_async(actions)` / `step_wait()` (or `step`) return obs, rewards (float32), dones (bool) and a list of
  one info dict per sub-env: the step's DydiffEnv info keys (mode, disagreement, ...). A finished sub-env
  is reset in the same step: `obs[i]` is the first observation of its next episode (its reset info goes to
  `reset_infos[i]`), `infos[i]["terminal_observation"]` the last one of the finished episode, and
  `infos[i]["TimeLimit.truncated"]` is True when the episode was truncated and not terminated (SB3
  bootstraps through those), as in SB3's DummyVecEnv.
- `get_attr(name)` returns the DydiffEnv's attribute once per sub-env; `set_attr` and `env_method` act once on
  the DydiffEnv and accept only `indices=None` or all sub-envs (they are shared). `env_method("set_policy",
  model)` is how a callback refreshes the policy handle, also through wrappers such as `VecMonitor`.
- `env_is_wrapped` is False for every sub-env (there are no per-env Gymnasium wrappers).
Episode statistics for SB3's logger: wrap it in `VecMonitor`.

`TianshouVectorEnv(venv)` (envpool-like, duck-typed `tianshou.env.BaseVectorEnv`; needs no Tianshou import),
over a DydiffEnv with `autoreset_mode="DISABLED"` (`make_tianshou_vec_env(num_envs, **kwargs)` builds one):
- `len(env)` / `env_num`, `is_async=False`, `observation_space` / `action_space` (lists of the per-env
  spaces, as `BaseVectorEnv` returns them; `single_*_space` for the spaces themselves).
- `reset(env_id=None, seed=None, options=None)` -> (obs, infos) of the sub-envs `env_id` (all when None);
  infos is an object array of dicts. The first reset covers every sub-env whatever `env_id` says.
- `step(action, id=None)` -> obs, rew, terminated, truncated, infos for the sub-envs `id` (all when None),
  `action` holding one row per id; each info carries `env_id`. Finished sub-envs stay finished until
  `reset(env_id=...)`: stepping one raises. The DydiffEnv steps all sub-envs at once, so sub-envs left out
  of a step keep running in the background on their plan's actions (on plan: exact and cheap); the
  adapter marks them stale and refuses to step them again before `reset(env_id=...)`. Tianshou's
  `Collector` does exactly that (it steps subsets only in `n_episode` mode, and resets every env after it).
- `seed(s)` applies at the next reset; `get_env_attr` / `set_env_attr` as `get_attr` / `set_attr` above.
- Info dicts of resets and steps have the same keys (reset fills the step-only ones with 0 / False), so
  Tianshou's `Batch` sees a single schema.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv

from .env import INFO_DEFAULTS, DydiffEnv


def _check_mode(venv: Any, mode: AutoresetMode, adapter: str, maker: str) -> None:
    if not isinstance(venv, DydiffEnv):
        raise TypeError(f"{adapter} wraps a dydiff_env.DydiffEnv, got {type(venv).__name__}; "
                        f"build one with dydiff_env.adapters.{maker}(num_envs, ...)")
    if venv.autoreset_mode != mode:
        raise ValueError(f"{adapter} needs a DydiffEnv with autoreset_mode={mode.name}, got "
                         f"{venv.autoreset_mode.name}: create it with DydiffEnv(..., autoreset_mode='{mode.name}') "
                         f"or use dydiff_env.adapters.{maker}(num_envs, ...)")


def _per_env_infos(infos: dict, ids: Sequence[int]) -> list[dict]:
    """Gymnasium's dict of arrays (with `_key` masks) -> one plain dict per sub-env in `ids` (Python scalars:
    SB3 and Tianshou store and copy these per step)."""
    out = []
    for i in ids:
        row = {}
        for key, values in infos.items():
            if key.startswith("_") or key in ("final_obs", "final_info"):
                continue
            mask = infos.get(f"_{key}")
            if mask is not None and not mask[i]:
                continue
            value = values[i]
            row[key] = value.item() if isinstance(value, np.generic) else value
        out.append(row)
    return out


def _as_ids(ids: Any, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n)
    arr = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    if arr.ndim != 1 or (len(arr) and (arr.min() < 0 or arr.max() >= n)) or len(np.unique(arr)) != len(arr):
        raise ValueError(f"env ids must be distinct integers in [0, {n}), got {ids!r}")
    return arr


def _require_all(indices: Any, n: int, what: str) -> None:
    """Attributes and methods belong to the one DydiffEnv shared by all sub-envs: a subset cannot be honoured."""
    if indices is not None and sorted(_as_ids(indices, n).tolist()) != list(range(n)):
        raise ValueError(f"{what} acts on the single DydiffEnv shared by all {n} sub-envs; pass indices=None")


# ------------------------------------------------------------------------------------------ Stable-Baselines3


def make_sb3_vec_env(num_envs: int = 1, **kwargs) -> "SB3VecEnv":
    """A DydiffEnv with `autoreset_mode="SAME_STEP"` (the mode SB3 expects) wrapped as an SB3 `VecEnv`."""
    kwargs["autoreset_mode"] = AutoresetMode.SAME_STEP
    return SB3VecEnv(DydiffEnv(num_envs=num_envs, **kwargs))


class SB3VecEnv(VecEnv):
    """Stable-Baselines3 `VecEnv` over a SAME_STEP `DydiffEnv` (module docstring)."""

    def __init__(self, venv: DydiffEnv):
        _check_mode(venv, AutoresetMode.SAME_STEP, "SB3VecEnv", "make_sb3_vec_env")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def set_policy(self, policy: Any = None, input: str = "auto") -> None:
        """The DydiffEnv's policy handle (an SB3 model works as is)."""
        self.venv.set_policy(policy, input)

    def reset(self):
        seeds = [s for s in self._seeds if s is not None]
        options = self._options[0] or None
        obs, infos = self.venv.reset(seed=seeds or None, options=options)
        self.reset_infos = _per_env_infos(infos, range(self.num_envs))
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("call step_async(actions) before step_wait()")
        actions, self._actions = self._actions, None
        obs, rewards, terminated, truncated, infos = self.venv.step(actions)
        dones = terminated | truncated
        per_env = _per_env_infos(infos, range(self.num_envs))
        if dones.any():
            # DydiffEnv (like SyncVectorEnv) puts a finished step's info in final_info and the new episode's
            # reset info on top; SB3 (like DummyVecEnv) wants the step's info and keeps the reset's aside
            final = _per_env_infos(infos["final_info"], range(self.num_envs))
            for i in np.flatnonzero(dones):
                self.reset_infos[i] = per_env[i]
                per_env[i] = {**final[i], "terminal_observation": infos["final_obs"][i]}
        for i, info in enumerate(per_env):
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, rewards.astype(np.float32), dones, per_env

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        _require_all(indices, self.num_envs, "set_attr")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        _require_all(indices, self.num_envs, "env_method")
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in range(self.num_envs)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> list[np.ndarray | None]:
        """One frame per sub-env (DydiffEnv's `render_mode="rgb_array"`; SB3's `render()` tiles them)."""
        frames = self.venv.render() if self.venv.render_mode == "rgb_array" else None
        return list(frames) if frames is not None else [None] * self.num_envs


# --------------------------------------------------------------------------------------------------- Tianshou


def make_tianshou_vec_env(num_envs: int = 1, **kwargs) -> "TianshouVectorEnv":
    """A DydiffEnv with `autoreset_mode="DISABLED"` (Tianshou resets finished envs itself) for a Collector."""
    kwargs["autoreset_mode"] = AutoresetMode.DISABLED
    return TianshouVectorEnv(DydiffEnv(num_envs=num_envs, **kwargs))


class TianshouVectorEnv:
    """Envpool-like vector env for Tianshou's `Collector` over a DISABLED-autoreset `DydiffEnv` (module
    docstring)."""

    is_async = False

    def __init__(self, venv: DydiffEnv):
        _check_mode(venv, AutoresetMode.DISABLED, "TianshouVectorEnv", "make_tianshou_vec_env")
        self.venv = venv
        self.env_num = venv.num_envs
        self.single_observation_space = venv.single_observation_space
        self.single_action_space = venv.single_action_space
        self.observation_space = [venv.single_observation_space] * self.env_num
        self.action_space = [venv.single_action_space] * self.env_num
        self.waiting_id: list[int] = []
        self.ready_id = list(range(self.env_num))
        self.is_closed = False
        self._done = np.zeros(self.env_num, dtype=bool)  # finished, waiting for reset(env_id=...)
        self._stale = np.zeros(self.env_num, dtype=bool)  # advanced in the background, see the docstring
        self._pending_seed: int | None = None

    def __len__(self) -> int:
        return self.env_num

    def set_policy(self, policy: Any = None, input: str = "auto") -> None:
        """The DydiffEnv's policy handle (a Tianshou `Algorithm` or `Policy` works as is)."""
        self.venv.set_policy(policy, input)

    def get_env_attr(self, key: str, id=None) -> list[Any]:
        value = getattr(self.venv, key)
        return [value for _ in _as_ids(id, self.env_num)]

    def set_env_attr(self, key: str, value: Any, id=None) -> None:
        _require_all(id, self.env_num, "set_env_attr")
        setattr(self.venv, key, value)

    def seed(self, seed: int | list[int] | None = None) -> list[int | None]:
        """Seeds the DydiffEnv's single RNG at the next reset (a list is combined into one seed)."""
        seeds = [seed + i for i in range(self.env_num)] if isinstance(seed, int) else (seed or [None] * self.env_num)
        self._pending_seed = seed if isinstance(seed, int) else (list(seed) if seed else None)
        return list(seeds)

    def reset(self, env_id=None, seed: int | list[int] | None = None, options: dict | None = None, **kwargs):
        self._check_open()
        ids = _as_ids(env_id, self.env_num)
        seed = seed if seed is not None else self._pending_seed
        self._pending_seed = None
        if not self.venv.started or len(ids) == self.env_num:
            obs, infos = self.venv.reset(seed=seed, options=options)
            self._done[:], self._stale[:] = False, False
        else:
            mask = np.zeros(self.env_num, dtype=bool)
            mask[ids] = True
            obs, infos = self.venv.reset(seed=seed, options={**(options or {}), "reset_mask": mask})
            self._done[ids], self._stale[ids] = False, False
        return obs[ids], self._infos(infos, ids)

    def step(self, action, id=None):
        self._check_open()
        if action is None:
            raise ValueError("action must not be None (TianshouVectorEnv is synchronous)")
        ids = _as_ids(id, self.env_num)
        action = action.detach().cpu().numpy() if isinstance(action, torch.Tensor) else np.asarray(action)
        if len(action) != len(ids):
            raise ValueError(f"got {len(action)} actions for {len(ids)} env ids")
        self._check_steppable(ids)
        idle = np.setdiff1d(np.arange(self.env_num), ids)
        self._restart_in_background(idle[self._done[idle]])  # DISABLED mode refuses to step finished sub-envs
        full = self._background_actions()
        full[ids] = action
        obs, rew, terminated, truncated, infos = self.venv.step(full)
        done = terminated | truncated
        self._done[ids] = done[ids]
        self._stale[idle] = True
        self._restart_in_background(idle[done[idle]])
        return obs[ids], rew[ids], terminated[ids], truncated[ids], self._infos(infos, ids)

    def render(self, **kwargs) -> list[np.ndarray | None]:
        """One frame per sub-env (DydiffEnv's `render_mode="rgb_array"`), else Nones."""
        frames = self.venv.render() if self.venv.render_mode == "rgb_array" else None
        return list(frames) if frames is not None else [None] * self.env_num

    def close(self) -> None:
        if not self.is_closed:
            self.venv.close()
            self.is_closed = True

    def _check_open(self) -> None:
        if self.is_closed:
            raise RuntimeError("TianshouVectorEnv is closed")

    def _check_steppable(self, ids: np.ndarray) -> None:
        if not self.venv.started:
            raise RuntimeError("call reset() before step()")
        for flags, why in ((self._done, "finished"), (self._stale, "advanced in the background while left out of "
                                                                   "a step")):
            bad = ids[flags[ids]]
            if len(bad):
                raise RuntimeError(f"sub-envs {bad.tolist()} are {why}; call reset(env_id={bad.tolist()}) first")

    def _restart_in_background(self, env_ids: np.ndarray) -> None:
        """Reset finished sub-envs the caller left out, so the next step can advance them; they stay stale."""
        if len(env_ids):
            mask = np.zeros(self.env_num, dtype=bool)
            mask[env_ids] = True
            self.venv.reset(options={"reset_mask": mask})
            self._done[env_ids], self._stale[env_ids] = False, True

    def _background_actions(self) -> np.ndarray:
        """Each sub-env's current plan action: a sub-env left out of a step follows its plan if it has one (the
        env serves the stored transition); one in model mode is stepped with zeros."""
        return self.venv.planned_actions()

    def _infos(self, infos: dict, ids: np.ndarray) -> np.ndarray:
        """Object array of one dict per id, with one key set for resets and steps (module docstring)."""
        rows = _per_env_infos(infos, ids)
        out = np.empty(len(ids), dtype=object)
        for k, (i, row) in enumerate(zip(ids, rows)):
            full = dict(INFO_DEFAULTS)
            full.update(row)
            full["env_id"] = int(i)
            out[k] = full
        return out
