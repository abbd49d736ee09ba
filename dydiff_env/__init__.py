"""dydiff-env: an offline RL dataset as a learned, vectorised Gymnasium simulator (DyDiff rollouts).

    import gymnasium, dydiff_env
    env = gymnasium.make("Dydiff-hopper-v0")                      # single env (gymnasium.Env)
    venv = gymnasium.make_vec("Dydiff-hopper-v0", num_envs=64, vectorization_mode="vector_entry_point")

Importing the package registers the ids; `gymnasium.make("dydiff_env:Dydiff-hopper-v0")` imports it for you.
"""

from __future__ import annotations

import gymnasium

from .bundle import Bundle, BundleError, load_bundle
from .config import DiffusionConfig, DynamicsConfig, EnvConfig, FilterConfig, SamplerConfig, TrainConfig, preset
from .data import DatasetNotFoundError, OfflineData, load_dataset
from .env import DydiffEnv, DydiffSingleEnv, shipped_bundle_path
from .policies import as_policy
from .render import choose_gl_backend
from .rollout import PolicyError, RolloutResult, behaviour_policy, dydiff_rollout
from .tasks import TASKS, get_task

__version__ = "0.1.0"

ENV_IDS = {"hopper": "Dydiff-hopper-v0", "walker2d": "Dydiff-walker2d-v0", "halfcheetah": "Dydiff-halfcheetah-v0"}


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

__all__ = [
    "Bundle", "BundleError", "DatasetNotFoundError", "DiffusionConfig", "DydiffEnv", "DydiffSingleEnv",
    "DynamicsConfig", "ENV_IDS", "EnvConfig", "FilterConfig", "OfflineData", "PolicyError", "RolloutResult", "SamplerConfig",
    "TASKS", "TrainConfig", "as_policy", "behaviour_policy", "dydiff_rollout", "get_task", "load_bundle",
    "load_dataset", "preset", "shipped_bundle_path",
]
