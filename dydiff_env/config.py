"""Typed configurations. Training defaults are the reference implementation's values (../notes:
reference-method); `PRESETS` scale them down for CPUs (`cpu`) and for tests (`tiny`). `FilterConfig` and
`EnvConfig` configure the rollout's filter and `DydiffEnv`.
"""

from __future__ import annotations

import dataclasses
import math
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
    # std of Gaussian noise on the conditioned actions in training (unit scale; the states stay the recorded
    # ones): the model learns states given actions near the recorded ones. 0: off (docs/fidelity.md, lever 3)
    action_noise: float = 0.0


SAMPLER_KINDS = ("heun", "dpmpp_2m", "euler", "student")
# the precision the simulator's networks are served in (`models.precision`); training is always float32
PRECISIONS = ("float32", "bfloat16", "auto")
# the divergence guard of the env and the rollout: a state this many dataset stds from the mean has run away
MAX_STATE_STD = 100.0


@dataclass
class SamplerConfig:
    """The diffusion sampler, on EDM's Karras noise levels (sigma_max -> sigma_min, rho spacing, then 0).

    kind: "heun" - EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2), the reference's, 2N - 1
        denoiser calls for N steps; with s_churn=0 it is the deterministic Heun sampler (Algorithm 1).
        "dpmpp_2m" - DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), a deterministic second-order multistep
        solver of the data-prediction ODE, N calls. "euler" - the deterministic Euler ODE step, N calls (DIAMOND's
        world model samples with 3). "student" - the bundle's distilled few-step student (`DistillConfig`,
        `dydiff-env train distill`), N calls for N in [1, its max_steps], on the student's own noise levels (the
        sigma fields here do not apply). The churn settings (s_*) apply to "heun" only.
    """

    num_steps: int = 34
    kind: str = "heun"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 60.0
    s_min: float = 0.37
    s_max: float = 52.24
    s_noise: float = 1.002

    def __post_init__(self):
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"sampler kind must be one of {list(SAMPLER_KINDS)}, got {self.kind!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"sampler num_steps must be a positive integer, got {self.num_steps!r}")

    @property
    def calls_per_sample(self) -> int:
        """Denoiser calls per sample (per DyDiff iteration)."""
        return 2 * self.num_steps - 1 if self.kind == "heun" else self.num_steps


TEACHER_KINDS = ("euler", "dpmpp_2m", "heun")  # deterministic ODE solvers ("heun" without churn)


@dataclass
class DistillConfig:
    """Distillation of the bundle's diffusion model into a few-step student (`training.distill_student`).

    The teacher is the diffusion model sampled with the deterministic ODE solver `teacher_kind` in
    `teacher_steps` steps on the Karras noise levels (sigma_min, sigma_max, rho); the student samples in K
    calls, 1 <= K <= max_steps, at the teacher's noise levels `student_sigma_indices(K)`. num_windows dataset
    windows (conditions as in diffusion training) are sampled by the teacher in chunks of teacher_batch;
    then train_steps of batch_size regress the student onto the teacher's final samples.
    """

    teacher_kind: str = "euler"
    teacher_steps: int = 12
    max_steps: int = 4
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_windows: int = 16_384
    teacher_batch: int = 256
    train_steps: int = 20_000
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    eval_every: int = 500
    holdout_windows: int = 64  # teacher samples of holdout windows on which the student's gap is measured
    seed: int = 0

    def teacher_sampler(self) -> "SamplerConfig":
        return SamplerConfig(num_steps=self.teacher_steps, kind=self.teacher_kind, sigma_min=self.sigma_min,
                             sigma_max=self.sigma_max, rho=self.rho, s_churn=0.0)

    def student_sigma_indices(self, num_steps: int) -> list[int]:
        """The teacher grid indices at which a K-step student is called: round(i * N / K), i = 0..K-1, so the
        calls spread over the teacher's trajectory as evenly as its grid allows (index 0 is sigma_max)."""
        if not 1 <= num_steps <= self.max_steps:
            raise ValueError(f"a student distilled with max_steps={self.max_steps} samples in 1 to {self.max_steps} "
                             f"steps, got num_steps={num_steps}; choose one in that range or distil again with a "
                             "larger max_steps")
        return [math.floor(i * self.teacher_steps / num_steps + 0.5) for i in range(num_steps)]

    def training_indices(self) -> list[int]:
        """The teacher grid indices the student learns from: those of every K = 1..max_steps."""
        return sorted({i for k in range(1, self.max_steps + 1) for i in self.student_sigma_indices(k)})


@dataclass
class FilterConfig:
    """Which trajectories a rollout keeps. mode: "hardmax" (the top `keep_fraction` by predicted return),
    "softmax" (that many drawn without replacement with p ~ exp(z / temperature), z the standardised
    return), or "none"."""

    mode: str = "hardmax"
    keep_fraction: float = 0.6
    temperature: float = 0.05

    def __post_init__(self):
        if self.mode not in ("hardmax", "softmax", "none"):
            raise ValueError(f"filter mode must be 'hardmax', 'softmax' or 'none', got '{self.mode}'")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class RefineConfig:
    """How a DyDiff refinement round combines the diffusion sample with the current states.

    The defaults are what the fidelity benchmark measured best against MuJoCo on the shipped bundle, for a
    near-data and a far-from-data learning policy alike (docs/fidelity.md): never worse than the single-step
    ensemble within the CIs. `RefineConfig(blend="average")` is the paper's rule.

    anchor_steps: the first k states come from the single-step ensemble and stay fixed: they are inpainted
    as conditions, so the diffusion model fills only steps k+1.. (0: only s_0 is given, the reference rule).
    blend: "average" - the reference's fixed 50/50 average; "uncertainty" - per trajectory and step, weight
    w = v / (v + e^2) on the sample (inverse-variance rule). v is the ensemble's own variance estimate of its
    state at that step: the elites' spread, summed along the trajectory, mean over dimensions, dataset-std
    units. e^2 is the diffusion model's error estimate for this trajectory: the larger of diffusion_error^2
    and the mean square distance between its first sample and the single-step states over the first
    probe_steps free steps (after the anchored ones), where the single-step model is accurate. Conditioned
    on actions the data never shows, the diffusion model is off from the first step; that distance then puts
    the weight on the ensemble.
    diffusion_error: the diffusion model's state error given true actions (RMS, dataset-std units; the cpu
    bundle's recorded teacher-forced error is 0.066-0.072 at h = 8-32, metrics.csv). probe_steps: 0 uses
    diffusion_error alone. max_probe_ratio: a trajectory whose probe distance exceeds this many times
    diffusion_error^2 keeps its single-step states (weight 0): off where the ensemble is accurate, the
    diffusion model's error keeps growing with the horizon, faster than the ensemble's (None: no gate).
    num_samples: diffusion samples drawn per trajectory and round, averaged before the blend. The mean
    removes the sampler's own noise (not the model's bias): K times the denoiser calls.
    """

    anchor_steps: int = 0
    blend: str = "uncertainty"
    diffusion_error: float = 0.07
    probe_steps: int = 4
    max_probe_ratio: float | None = 4.0
    num_samples: int = 1

    def __post_init__(self):
        if self.anchor_steps < 0:
            raise ValueError(f"anchor_steps must be >= 0, got {self.anchor_steps}")
        if self.blend not in ("average", "uncertainty"):
            raise ValueError(f"blend must be 'average' or 'uncertainty', got '{self.blend}'")
        if self.probe_steps < 0:
            raise ValueError(f"probe_steps must be >= 0, got {self.probe_steps}")
        if not self.diffusion_error > 0:
            raise ValueError(f"diffusion_error must be > 0, got {self.diffusion_error}")
        if self.max_probe_ratio is not None and not self.max_probe_ratio > 0:
            raise ValueError(f"max_probe_ratio must be > 0 or None, got {self.max_probe_ratio}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    def check_horizon(self, horizon: int) -> None:
        """Refuse anchoring every transition of a `horizon`-step rollout (there is nothing left to refine)."""
        if self.anchor_steps >= horizon:
            raise ValueError(f"refine.anchor_steps ({self.anchor_steps}) must be below the rollout horizon "
                             f"({horizon}); anchoring every step is the single-step rollout: use num_iterations=0")


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
    student: DistillConfig = field(default_factory=DistillConfig)  # `dydiff-env train distill`
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
               "reward": MLPConfig, "bc": MLPConfig, "student": DistillConfig}
        kwargs = {k: build(sub[k], v) if k in sub else v for k, v in d.items()}
        return cls(**kwargs)


# The fields that decide a model's weights' shapes and meaning: a model trained with other values is another
# model, which a bundle (one config.json section per model) must not take without --overwrite.
ARCHITECTURE_FIELDS = {
    "diffusion": ("horizon", "channels", "kernel_size", "sigma_data"),
    "dynamics": ("ensemble_size", "num_elites", "hidden"),
    "reward": ("hidden",),
    "bc": ("hidden",),
    # the student has the diffusion model's architecture; a new distillation simply replaces it
    "student": (),
}


def architecture(section, kind: str) -> dict:
    """The architecture fields of one model's configuration (`TrainConfig.dynamics`, ...); lists as tuples,
    so that a configuration read from JSON compares equal to the one it was written from."""
    values = {name: getattr(section, name) for name in ARCHITECTURE_FIELDS[kind]}
    return {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}


def architecture_changes(recorded: TrainConfig, requested: TrainConfig, kind: str) -> dict[str, tuple]:
    """Architecture field -> (recorded value, requested value) for the fields of `kind` that differ."""
    old, new = architecture(getattr(recorded, kind), kind), architecture(getattr(requested, kind), kind)
    return {name: (old[name], new[name]) for name in old if old[name] != new[name]}


def describe_architecture_changes(changes: dict[str, dict[str, tuple]]) -> str:
    """'diffusion (horizon 64 -> 16, channels (32, 64) -> (16, 32)), reward (...)' for messages."""
    return ", ".join(f"{kind} ({', '.join(f'{name} {old} -> {new}' for name, (old, new) in fields.items())})"
                     for kind, fields in changes.items())


def _preset_paper() -> TrainConfig:
    return TrainConfig()


def _preset_cpu() -> TrainConfig:
    # Budget on 2 CPU cores, about an hour in all (measured figures in README "Training budget"). The
    # dynamics ensemble is DyDiff's baseline and its initial trajectory, so it trains until its holdout error
    # stops falling: capped at 30 epochs it stopped at 16x the elite holdout MSE of 400 epochs (0.0353 against
    # 0.00217 on hopper-medium, 37 min on one core), and DyDiff's measured advantage was mostly that gap. The
    # reward model labels every generated transition, so it too trains to its holdout plateau (whole passes
    # over the data, patience 10): stopped by 20 short epochs it had 3.1x the holdout MSE (0.00206 against
    # 0.000656 on hopper-medium, docs/fidelity.md), for under a minute more. The BC MLP converges with a fixed
    # number of minibatches per epoch.
    return TrainConfig(
        diffusion=DiffusionConfig(horizon=64, channels=(32, 64, 128), batch_size=64, lr=4e-4, warmup_steps=500,
                                  train_steps=10_000, min_valid_rows=32, eval_every=500),
        sampler=SamplerConfig(),
        dynamics=DynamicsConfig(lr=1e-3, max_epochs=400, patience=8, steps_per_epoch=250),
        reward=MLPConfig(max_epochs=200, patience=10),
        bc=MLPConfig(max_epochs=20, patience=4, steps_per_epoch=300),
        # within 30 minutes on 2 cores for the shipped bundle (docs/samplers.md): teacher samples of 8192
        # windows, then student steps
        student=DistillConfig(num_windows=8192, train_steps=6_000, batch_size=64, lr=1e-4, eval_every=500),
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
        student=DistillConfig(teacher_steps=4, max_steps=2, num_windows=48, teacher_batch=16, train_steps=6,
                              batch_size=8, lr=1e-3, warmup_steps=2, eval_every=3, holdout_windows=8),
        checkpoint_every_s=0.0,
    )


PRESETS = {"paper": _preset_paper, "cpu": _preset_cpu, "tiny": _preset_tiny}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------------------------------------ environment

PLAN_MODES = ("auto", "always", "never")
DYNAMICS_MODES = ("mean", "elite_mean", "sample")
START_STATE_MODES = ("any", "episode_starts", "stored")
AUTORESET_NAMES = ("NextStep", "SameStep", "Disabled")

# keywords of the first DydiffEnv that no longer exist, with what replaced them
REMOVED_ENV_KEYWORDS = {
    "deviation_threshold": "off-plan steps are single-step model steps (Markov); to end uncertain episodes use "
                           "max_disagreement, to penalise them uncertainty_penalty",
    "on_deviation": "a sub-env that leaves its plan is stepped by the single-step model until its episode ends",
    "on_plan_end": "an on-plan sub-env continues on a plan generated ahead of its plan's end; for short "
                   "MBPO-style episodes set max_episode_steps",
    "dynamics_mode": "use rollout_dynamics (inside DyDiff plans) and model_dynamics (off-plan steps)",
}


@dataclass
class EnvConfig:
    """Settings of `DydiffEnv` (see its module docstring for what each mode does). Every field can also be
    passed as a keyword to `DydiffEnv`, `gymnasium.make` and `gymnasium.make_vec`; `filter` accepts a
    mode name with `keep_fraction` / `temperature` keywords, `sampler` a dict of `SamplerConfig` fields.

    plans: "auto" - serve DyDiff plans of the policy handle to sub-envs whose agent follows them (an agent
        that does not is never made to wait for one); "always" - start every episode from a pool plan (the
        bundle's behaviour-cloning policy plans when no handle is set); "never" - single-step model only.
    horizon: transitions per plan (default: the diffusion window minus one, `env.default_plan_horizon`; with the
        paper's refinement rule, `refine=RefineConfig(blend="average")`, three quarters of the window are more
        faithful: `rollout.default_horizon`).
    num_iterations: DyDiff refinement rounds M of every plan (0: plans of the single-step ensemble).
    sampler: EDM sampler of the plans (default: the bundle's).
    filter: which pool plans are kept, by predicted return. It chooses among start states, so it applies to
        pool plans only: a plan that must start where the agent is (a continuation, a first plan) is kept.
    refine: how each refinement round combines the diffusion sample with the current states (`RefineConfig`;
        also a dict of its fields).
    pool_size: kept plans the pool holds; every rollout call for plans tops it up to this (default:
        max(num_envs, 16)).
    refresh_every: drop the pool and begin a new one once this many steps were served since it was begun
        (top-ups do not restart the count), so no pool plan is older than that (None: never; plans are served
        oldest first, so none is older than about pool_size episodes).
    action_tolerance: an action within this max-abs distance of the plan's action is on plan.
    rollout_dynamics: ensemble prediction inside plans ("elite_mean": one random elite's mean, the reference).
    model_dynamics: ensemble prediction of off-plan steps ("mean" of the elites is deterministic, so equal
        (state, action) pairs give equal next states; "elite_mean" and "sample" draw an elite, and a
        Gaussian sample of it, MBPO-style).
    uncertainty_penalty: MOPO's lambda: off-plan rewards are r(s, a) - lambda * disagreement.
    max_disagreement: truncate an off-plan step whose ensemble disagreement exceeds this (None: never).
    max_state_std: a divergence guard, not an uncertainty rule: a next state more than this many dataset stds
        from the dataset mean in any dimension truncates the episode like a non-finite one (the last
        observation again, reward 0, `info["diverged"]`). Single-step rollouts can run away: from 1 of 96
        HalfCheetah dataset states the ensemble's state grew from under 4 to 3e5 stds in 20 steps, where the
        real env stays under 4. Random actions, which throw the model furthest from the data, stayed under
        34 stds on all three shipped bundles (docs/env-design.md). None: never.
    max_episode_steps: truncation limit (the real Hopper-v5 uses 1000; None: no limit).
    start_states: "any" - reset to dataset states drawn uniformly from the dataset (the bundle's stored
        sample is reweighted); "episode_starts" - to the dataset's episode starts only; "stored" - uniformly
        over the bundle's stored sample (episode starts about 10x over-represented; the first env's rule).
    autoreset_mode: "NextStep" (Gymnasium's default), "SameStep" or "Disabled" (or `AutoresetMode` members
        or their names).
    device: torch device of the models.
    precision: how plans are generated (`dydiff_rollout(precision=...)`: its diffusion or student, ensemble and
        reward networks): "auto" (default: bfloat16 where the device computes it natively, else float32),
        "float32" or "bfloat16" (autocast; about 1.5x faster plans on a CPU with native bf16, much slower on one
        without; the fidelity benchmark measured no loss, docs/samplers.md). Off-plan model steps are served as
        the bundle is (float32 unless it was loaded otherwise): at their batch sizes bf16 measured slower.
    """

    plans: str = "auto"
    horizon: int | None = None
    num_iterations: int = 2
    sampler: SamplerConfig | None = None
    filter: FilterConfig = field(default_factory=FilterConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    pool_size: int | None = None
    refresh_every: int | None = None
    action_tolerance: float = 1e-5
    rollout_dynamics: str = "elite_mean"
    model_dynamics: str = "elite_mean"
    uncertainty_penalty: float = 0.0
    max_disagreement: float | None = None
    max_state_std: float | None = MAX_STATE_STD
    max_episode_steps: int | None = 1000
    start_states: str = "any"
    autoreset_mode: str = "NextStep"
    device: str = "cpu"
    precision: str = "auto"

    def __post_init__(self):
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

        one_of("plans", PLAN_MODES)
        one_of("rollout_dynamics", DYNAMICS_MODES)
        one_of("model_dynamics", DYNAMICS_MODES)
        one_of("start_states", START_STATE_MODES)
        one_of("precision", PRECISIONS)
        autoreset = getattr(self.autoreset_mode, "value", self.autoreset_mode)  # an AutoresetMode member
        names = {n.lower(): n for n in AUTORESET_NAMES} | {"next_step": "NextStep", "same_step": "SameStep"}
        if not isinstance(autoreset, str) or autoreset.lower() not in names:
            raise ValueError(f"autoreset_mode must be one of {list(AUTORESET_NAMES)} (or a gymnasium AutoresetMode), "
                             f"got {self.autoreset_mode!r}")
        self.autoreset_mode = names[autoreset.lower()]
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig(**self.sampler)
        if isinstance(self.filter, str):
            self.filter = FilterConfig(self.filter)
        elif isinstance(self.filter, dict):
            self.filter = FilterConfig(**self.filter)
        if isinstance(self.refine, dict):
            self.refine = RefineConfig(**self.refine)
        if not isinstance(self.refine, RefineConfig):
            raise ValueError(f"refine must be a RefineConfig or a dict of its fields, got {self.refine!r}")
        for name in ("horizon", "pool_size", "refresh_every", "max_episode_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.num_iterations, int) or self.num_iterations < 0:
            raise ValueError(f"num_iterations must be an integer >= 0, got {self.num_iterations!r}")
        if not self.action_tolerance >= 0:
            raise ValueError(f"action_tolerance must be >= 0, got {self.action_tolerance!r}")
        if not self.uncertainty_penalty >= 0:
            raise ValueError(f"uncertainty_penalty must be >= 0, got {self.uncertainty_penalty!r}")
        if self.max_disagreement is not None and not self.max_disagreement > 0:
            raise ValueError(f"max_disagreement must be > 0 or None, got {self.max_disagreement!r}")
        if self.max_state_std is not None and not self.max_state_std > 0:
            raise ValueError(f"max_state_std must be > 0 or None, got {self.max_state_std!r}")

    @classmethod
    def from_kwargs(cls, config: "EnvConfig | None" = None, **kwargs) -> "EnvConfig":
        """`config` (or the defaults) with `kwargs` applied; `keep_fraction` / `temperature` update the filter.
        Unknown keywords raise TypeError naming the valid ones (and what replaced a removed one)."""
        base = dataclasses.asdict(config or cls())
        base["sampler"] = (config.sampler if config is not None else None)
        base["filter"] = dataclasses.replace(config.filter) if config is not None else FilterConfig()
        filter_overrides = {k: kwargs.pop(k) for k in ("keep_fraction", "temperature") if k in kwargs}
        for key in kwargs:
            if key in REMOVED_ENV_KEYWORDS:
                raise TypeError(f"DydiffEnv no longer takes '{key}': {REMOVED_ENV_KEYWORDS[key]}")
            if key not in base:
                raise TypeError(f"DydiffEnv got an unknown keyword '{key}'; EnvConfig fields are {sorted(base)} "
                                "(plus keep_fraction and temperature for the filter)")
        base.update(kwargs)
        merged = cls(**base)
        if filter_overrides:
            merged.filter = FilterConfig(**{**dataclasses.asdict(merged.filter), **filter_overrides})
        return merged
