"""Offline RL agents for dydiff-env: TD3+BC and Diffusion-QL, a trainer that mixes real and model-generated
transitions, and evaluation in the real Gymnasium simulator."""

from .buffers import ReplayBuffer, sample_mixed
from dydiff_env.checkpoint import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from .diffusion_ql import DiffusionQL, DiffusionQLConfig
from .evaluation import EvalResult, evaluate
from .td3bc import TD3BC, TD3BCConfig
from .trainer import OfflineTrainer, TrainerConfig

__all__ = [
    "TD3BC", "TD3BCConfig", "DiffusionQL", "DiffusionQLConfig", "OfflineTrainer", "TrainerConfig", "evaluate",
    "EvalResult", "ReplayBuffer", "sample_mixed", "flatten_state", "unflatten_state", "save_checkpoint",
    "load_checkpoint",
]
