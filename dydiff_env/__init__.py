"""dydiff-env: an offline RL dataset as a learned, vectorised Gymnasium simulator (DyDiff rollouts).

    import gymnasium, dydiff_env
    env = gymnasium.make("Dydiff-hopper-v0")                      # single env (gymnasium.Env)
    venv = gymnasium.make_vec("Dydiff-hopper-v0", num_envs=64, vectorization_mode="vector_entry_point")

Importing the package registers the ids; `gymnasium.make("dydiff_env:Dydiff-hopper-v0")` imports it for you.
The public names below are imported on first use (module `__getattr__`), so importing the package, and the
`dydiff-env` command line, does not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib

import gymnasium

from .render import choose_gl_backend
from .tasks import TASKS, get_task

__version__ = "0.1.0"

ENV_IDS = {"hopper": "Dydiff-hopper-v0", "walker2d": "Dydiff-walker2d-v0", "halfcheetah": "Dydiff-halfcheetah-v0"}

# public name -> the module that defines it
_LAZY = {
    "Bundle": "bundle", "BundleError": "bundle", "DatasetMismatchWarning": "bundle", "check_dataset_matches": "bundle",
    "load_bundle": "bundle",
    "DiffusionConfig": "config", "DynamicsConfig": "config", "EnvConfig": "config", "FilterConfig": "config", "RefineConfig": "config",
    "SamplerConfig": "config", "TrainConfig": "config", "preset": "config",
    "DatasetNotFoundError": "data", "OfflineData": "data", "load_dataset": "data",
    "DydiffEnv": "env", "DydiffSingleEnv": "env", "shipped_bundle_path": "env",
    "as_policy": "policies",
    "PolicyError": "rollout", "RolloutResult": "rollout", "behaviour_policy": "rollout", "dydiff_rollout": "rollout",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register() -> None:
    for task, env_id in ENV_IDS.items():
        if env_id in gymnasium.registry:
            continue
        # every id is registered; one whose bundle does not ship explains at make() how to train one
        gymnasium.register(
            id=env_id, entry_point="dydiff_env.env:make_env", vector_entry_point="dydiff_env.env:make_vector_env",
            max_episode_steps=TASKS[task].max_episode_steps, kwargs={"task": task}, nondeterministic=False,
        )


_register()
# a headless machine renders through EGL: set before any MuJoCo renderer is made, the user's own included
choose_gl_backend()

__all__ = sorted(["ENV_IDS", "TASKS", "get_task", *_LAZY])
