"""Typed configurations. Defaults are the reference implementation's values (../notes: reference-method);
`PRESETS` scale them down for CPUs (`cpu`) and for tests (`tiny`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DiffusionConfig:
    horizon: int = 100  # rows of (state, action) per window
    channels: tuple[int, ...] = (128, 512, 1024)  # U-Net widths per resolution; len-1 downsamplings by 2
    kernel_size: int = 5
    sigma_data: float = 0.5
    p_mean: float = -1.2  # ln(sigma) ~ N(p_mean, p_std^2) during training
    p_std: float = 1.2
    lr: float = 1e-3
    warmup_steps: int = 1000
    batch_size: int = 8
    train_steps: int = 400_000
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    min_valid_rows: int = 50  # windows keep at least this many real rows; the rest is masked padding
    holdout_fraction: float = 0.05  # whole episodes held out for the validation loss
    eval_every: int = 2_000


@dataclass
class SamplerConfig:
    """EDM stochastic Heun sampler (Karras et al. 2022, Algorithm 2)."""

    num_steps: int = 34
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 60.0
    s_min: float = 0.37
    s_max: float = 52.24
    s_noise: float = 1.002


@dataclass
class DynamicsConfig:
    ensemble_size: int = 7
    num_elites: int = 5
    hidden: tuple[int, ...] = (200, 200, 200, 200)
    weight_decay: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # per layer, input to output
    lr: float = 1e-4
    batch_size: int = 256
    holdout_fraction: float = 0.2
    max_holdout: int = 5000
    patience: int = 7  # epochs without improvement of any member before stopping
    max_epochs: int = 200
    steps_per_epoch: int | None = None  # None: one pass over the training split


@dataclass
class MLPConfig:
    """Training of a plain MLP model (the reward model and the behaviour-cloning policy)."""

    hidden: tuple[int, ...] = (256, 256)
    lr: float = 1e-3
    batch_size: int = 256
    holdout_fraction: float = 0.1
    max_holdout: int = 5000
    patience: int = 5
    max_epochs: int = 100
    steps_per_epoch: int | None = None


@dataclass
class TrainConfig:
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    reward: MLPConfig = field(default_factory=MLPConfig)
    bc: MLPConfig = field(default_factory=MLPConfig)
    seed: int = 0
    checkpoint_every_s: float = 60.0  # an interrupted run loses at most this much work

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        def build(klass, values):
            hints = {f.name: f for f in dataclasses.fields(klass)}
            kwargs = {}
            for key, value in values.items():
                if key not in hints:
                    raise ValueError(f"unknown {klass.__name__} field '{key}'")
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            return klass(**kwargs)

        sub = {"diffusion": DiffusionConfig, "sampler": SamplerConfig, "dynamics": DynamicsConfig,
               "reward": MLPConfig, "bc": MLPConfig}
        kwargs = {k: build(sub[k], v) if k in sub else v for k, v in d.items()}
        return cls(**kwargs)


def _preset_paper() -> TrainConfig:
    return TrainConfig()


def _preset_cpu() -> TrainConfig:
    # Budget on 2 CPU cores, about 45 minutes in all (measured figures in README "Training budget"):
    # the diffusion model gets most of it because its error decides whether DyDiff helps; the MLPs
    # converge in minutes with lr 1e-3 and a fixed number of minibatches per epoch.
    return TrainConfig(
        diffusion=DiffusionConfig(horizon=64, channels=(32, 64, 128), batch_size=64, lr=4e-4, warmup_steps=500,
                                  train_steps=10_000, min_valid_rows=32, eval_every=500),
        sampler=SamplerConfig(),
        dynamics=DynamicsConfig(lr=1e-3, max_epochs=30, patience=5, steps_per_epoch=250),
        reward=MLPConfig(max_epochs=20, patience=4, steps_per_epoch=300),
        bc=MLPConfig(max_epochs=20, patience=4, steps_per_epoch=300),
    )


def _preset_tiny() -> TrainConfig:
    # For tests: every model trains in about a second on a few thousand transitions.
    return TrainConfig(
        diffusion=DiffusionConfig(horizon=16, channels=(16, 32), batch_size=16, lr=1e-3, warmup_steps=10,
                                  train_steps=40, min_valid_rows=8, eval_every=20),
        sampler=SamplerConfig(num_steps=6),
        dynamics=DynamicsConfig(ensemble_size=3, num_elites=2, hidden=(32, 32), weight_decay=(2.5e-5, 5e-5, 1e-4),
                                lr=1e-3, max_epochs=4, patience=2, steps_per_epoch=10, batch_size=64),
        reward=MLPConfig(hidden=(32, 32), max_epochs=4, patience=2, steps_per_epoch=10, batch_size=64),
        bc=MLPConfig(hidden=(32, 32), max_epochs=4, patience=2, steps_per_epoch=10, batch_size=64),
        checkpoint_every_s=0.0,
    )


PRESETS = {"paper": _preset_paper, "cpu": _preset_cpu, "tiny": _preset_tiny}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
