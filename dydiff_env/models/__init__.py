"""The learned models of a bundle: trajectory diffusion, single-step dynamics ensemble, reward, behaviour cloning."""

from .bc import BCPolicy
from .diffusion import (TemporalUNet, TrajectoryDiffusion, edm_sample, edm_sigma_steps, grid_sigmas, student_sample,
                        window_multiple)
from .dynamics import DynamicsEnsemble
from .precision import native_bfloat16, resolve_precision
from .reward import RewardModel

__all__ = ["BCPolicy", "DynamicsEnsemble", "RewardModel", "TemporalUNet", "TrajectoryDiffusion", "edm_sample", "edm_sigma_steps",
           "grid_sigmas", "native_bfloat16", "resolve_precision", "student_sample", "window_multiple"]
