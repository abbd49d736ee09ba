"""What a bundle may contain: the fields of its config.json and the tensors of its files.

Bundles are files that users download and share, so `load_bundle` treats them as untrusted input. Before
it builds any model it checks the whole config.json with `validate_config`: types, lengths, ranges, known
keys, consistency between fields, and limits on what the config may ask to build. It checks every model's
size with `check_model_size` before it allocates the weights, and every tensor with `check_weights`,
`check_elites` and `check_start_states` before it loads them. Each problem raises a `BundleError` that
names the field (a dotted path such as `train_config.dynamics.hidden`) and the fix.

The checks are written by hand. The format is small, and most of its rules are ranges and rules between
fields, which a JSON-schema library would also need custom code for.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NoReturn

import numpy as np
import torch

from .config import (SAMPLER_KINDS, TEACHER_KINDS, DiffusionConfig, DistillConfig, DynamicsConfig, MLPConfig,
                     SamplerConfig, TrainConfig)
from .models import window_multiple
from .tasks import get_task

FORMAT_VERSION = 1
MODEL_FILES = {"diffusion": "diffusion.safetensors", "dynamics": "dynamics.safetensors",
               "reward": "reward.safetensors", "bc": "bc.safetensors",
               # optional: the distilled few-step student of the diffusion model (`dydiff-env train distill`)
               "student": "student.safetensors"}
START_STATES_FILE = "start_states.safetensors"
# New weights never overwrite a file that config.json references (the previous state must stay loadable until
# config.json is replaced), so a file can also carry the first 8 hex digits of its sha256: dynamics.1a2b3c4d.safetensors
FILE_KINDS = {**{kind: name.removesuffix(".safetensors") for kind, name in MODEL_FILES.items()},
              "start_states": START_STATES_FILE.removesuffix(".safetensors")}
BUNDLE_FILE_NAME = re.compile(rf"({'|'.join(FILE_KINDS.values())})(?:\.([0-9a-f]{{8}}))?\.safetensors")

# Limits on what a config may ask to build. They are far above every preset (the paper's U-Net has 61 M
# parameters) and far below the gigabytes that a few hostile numbers in config.json could otherwise allocate.
MAX_MODEL_PARAMETERS = 200_000_000  # weights and buffers of one model: 800 MB as float32
MAX_WIDTH = 65_536  # units of a hidden layer, channels of a U-Net level
MAX_HIDDEN_LAYERS = 16
MAX_UNET_LEVELS = 8
MAX_ENSEMBLE_SIZE = 100
MAX_KERNEL_SIZE = 63
MAX_DIFFUSION_HORIZON = 4096
MAX_SAMPLER_STEPS = 1000
MAX_VERSION_ENTRIES = 100  # software_versions: package -> version
MAX_SIGMA = 1e4  # EDM noise levels; squared in Python floats by the sampler, so they must stay far from overflow

FLOAT32_MAX = float(np.finfo(np.float32).max)
WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                 "float64": torch.float64}
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
NORMALIZATION_STATS = ("mean", "std", "low", "high")
REQUIRED_KEYS = ("format_version", "env_id", "obs_dim", "act_dim", "normalization", "train_config", "models", "files")
START_STATE_KEYS = {"observations": True, "is_episode_start": True, "qpos": False, "qvel": False}  # name: required
SHA256 = re.compile(r"[0-9a-f]{64}")
FIX = "the bundle is corrupt or was edited by hand; re-copy it or re-train it"


class BundleError(ValueError):
    pass


def fail(where: Any, field: str, problem: str, fix: str = FIX) -> NoReturn:
    raise BundleError(f"{where}: {field} {problem}; {fix}")


def show(value: Any, limit: int = 60) -> str:
    """A short repr for messages (a hostile value can be a list of a million numbers)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def is_number(value: Any) -> bool:
    """A JSON number (not a bool) that float32 holds: a larger one (or NaN, or Infinity, which Python's json
    accepts) would become inf or NaN inside the models."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -FLOAT32_MAX <= value <= FLOAT32_MAX


# ------------------------------------------------------------------------------ field checks of train_config
# A check takes a value and returns what is wrong with it ("must be ..., got ...") or None.

Check = Callable[[Any], "str | None"]


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def in_range(value: float, low: float | None, high: float | None, low_open: bool = False,
             high_open: bool = False) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def integer(low: int | None = None, high: int | None = None, optional: bool = False, odd: bool = False) -> Check:
    wanted = f"{'an odd' if odd else 'an'} integer{describe_range(low, high)}{' or null' if optional else ''}"

    def check(value):
        if value is None and optional:
            return None
        if not (is_int(value) and in_range(value, low, high) and (value % 2 == 1 or not odd)):
            return f"must be {wanted}, got {show(value)}"
        return None

    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Check:
    wanted = f"a finite number{describe_range(low, high, low_open, high_open)}"

    def check(value):
        if not (is_number(value) and in_range(value, low, high, low_open, high_open)):
            return f"must be {wanted}, got {show(value)}"
        return None

    return check


def integer_list(min_length: int, max_length: int, low: int, high: int, multiple_of: int = 1) -> Check:
    unit = f"multiples of {multiple_of} " if multiple_of > 1 else ""
    wanted = f"a list of {min_length} to {max_length} integers, {unit}in [{low}, {high}]"

    def check(value):
        if not (isinstance(value, list) and min_length <= len(value) <= max_length
                and all(is_int(v) and low <= v <= high and v % multiple_of == 0 for v in value)):
            return f"must be {wanted}, got {show(value)}"
        return None

    return check


def number_list(low: float) -> Check:
    def check(value):
        if not (isinstance(value, list) and len(value) <= MAX_HIDDEN_LAYERS + 1
                and all(is_number(v) and v >= low for v in value)):
            return f"must be a list of finite numbers >= {low} (one per layer), got {show(value)}"
        return None

    return check


def one_of(choices: tuple[str, ...]) -> Check:
    def check(value):
        if value not in choices:
            return f"must be one of {list(choices)}, got {show(value)}"
        return None

    return check


FRACTION = number(0, 1, high_open=True)
POSITIVE = number(0, low_open=True)
HIDDEN = integer_list(0, MAX_HIDDEN_LAYERS, 1, MAX_WIDTH)
MLP_FIELDS: dict[str, Check] = {
    "hidden": HIDDEN, "lr": POSITIVE, "batch_size": integer(1), "holdout_fraction": FRACTION,
    "max_holdout": integer(0), "patience": integer(1), "max_epochs": integer(0),
    "steps_per_epoch": integer(1, optional=True),
}
# one check per field of each config dataclass (tests/test_bundle_validation.py keeps them in step)
TRAIN_CONFIG_FIELDS: dict[str, tuple[type, dict[str, Check]]] = {
    "diffusion": (DiffusionConfig, {
        "horizon": integer(2, MAX_DIFFUSION_HORIZON),  # a window holds at least one transition
        "channels": integer_list(1, MAX_UNET_LEVELS, 8, MAX_WIDTH, multiple_of=8),  # GroupNorm(8)
        "kernel_size": integer(1, MAX_KERNEL_SIZE, odd=True),  # odd: the convolutions keep the length
        "sigma_data": POSITIVE, "p_mean": number(), "p_std": POSITIVE, "lr": POSITIVE, "warmup_steps": integer(0),
        "batch_size": integer(1), "train_steps": integer(0), "ema_decay": number(0, 1), "grad_clip": POSITIVE,
        "min_valid_rows": integer(1), "holdout_fraction": FRACTION, "eval_every": integer(1),
        "action_noise": number(0),
    }),
    "sampler": (SamplerConfig, {
        "num_steps": integer(1, MAX_SAMPLER_STEPS), "kind": one_of(SAMPLER_KINDS),
        "sigma_min": number(0, MAX_SIGMA, low_open=True),
        "sigma_max": number(0, MAX_SIGMA, low_open=True), "rho": number(0, 100, low_open=True),
        "s_churn": number(0), "s_min": number(0), "s_max": number(0), "s_noise": number(0),
    }),
    "dynamics": (DynamicsConfig, {
        "ensemble_size": integer(1, MAX_ENSEMBLE_SIZE), "num_elites": integer(1), "hidden": HIDDEN,
        "weight_decay": number_list(0), **{k: v for k, v in MLP_FIELDS.items() if k != "hidden"},
    }),
    "reward": (MLPConfig, MLP_FIELDS),
    "bc": (MLPConfig, MLP_FIELDS),
    "student": (DistillConfig, {
        "teacher_kind": one_of(TEACHER_KINDS), "teacher_steps": integer(1, MAX_SAMPLER_STEPS),
        "max_steps": integer(1, MAX_SAMPLER_STEPS), "sigma_min": number(0, MAX_SIGMA, low_open=True),
        "sigma_max": number(0, MAX_SIGMA, low_open=True), "rho": number(0, 100, low_open=True),
        "num_windows": integer(1), "teacher_batch": integer(1), "train_steps": integer(0), "batch_size": integer(1),
        "lr": POSITIVE, "warmup_steps": integer(0), "ema_decay": number(0, 1), "grad_clip": POSITIVE,
        "eval_every": integer(1), "holdout_windows": integer(1), "seed": integer(0),
    }),
}
TRAIN_CONFIG_SCALARS: dict[str, Check] = {"seed": integer(0), "checkpoint_every_s": number(0)}


def check_sub_config(name: str, values: Any, where: Any) -> dict:
    """The fields of one sub-config (`train_config.dynamics`, ...) merged over the dataclass defaults."""
    klass, checks = TRAIN_CONFIG_FIELDS[name]
    field = f"train_config.{name}"
    if not isinstance(values, dict):
        fail(where, field, f"must be a JSON object of {klass.__name__} fields, got {show(values)}")
    unknown = sorted(set(values) - set(checks))
    if unknown:
        fail(where, field, f"has unknown fields {show(unknown)}; {klass.__name__} fields are {sorted(checks)}")
    for key, value in values.items():
        problem = checks[key](value)
        if problem:
            fail(where, f"{field}.{key}", problem)
    return {**dataclasses.asdict(klass()), **values}


def check_train_config(train_config: Any, where: Any) -> None:
    if not isinstance(train_config, dict):
        fail(where, "train_config", f"must be a JSON object (the training hyper-parameters), got {show(train_config)}")
    known = set(TRAIN_CONFIG_FIELDS) | set(TRAIN_CONFIG_SCALARS)
    unknown = sorted(set(train_config) - known)
    if unknown:
        fail(where, "train_config", f"has unknown fields {show(unknown)}; TrainConfig fields are {sorted(known)}")
    merged = {name: check_sub_config(name, train_config[name], where)
              for name in TRAIN_CONFIG_FIELDS if name in train_config}
    for key, check in TRAIN_CONFIG_SCALARS.items():
        problem = check(train_config[key]) if key in train_config else None
        if problem:
            fail(where, f"train_config.{key}", problem)
    # rules between fields, on the values the models will be built with (the defaults fill in missing ones)
    diffusion = merged.get("diffusion", dataclasses.asdict(DiffusionConfig()))
    factor = window_multiple(diffusion["channels"])
    if diffusion["horizon"] % factor:
        fail(where, "train_config.diffusion.horizon", f"must be divisible by {factor} (the U-Net halves it once per "
             f"level after the first of channels {diffusion['channels']}), got {diffusion['horizon']}")
    dynamics = merged.get("dynamics", dataclasses.asdict(DynamicsConfig()))
    if dynamics["num_elites"] > dynamics["ensemble_size"]:
        fail(where, "train_config.dynamics.num_elites", f"must be at most ensemble_size "
             f"({dynamics['ensemble_size']}), got {dynamics['num_elites']}")
    if len(dynamics["weight_decay"]) != len(dynamics["hidden"]) + 1:
        fail(where, "train_config.dynamics.weight_decay", f"must have one entry per layer ({len(dynamics['hidden']) + 1} "
             f"for hidden {list(dynamics['hidden'])}), got {len(dynamics['weight_decay'])}")
    for name in ("sampler", "student"):
        section = merged.get(name, dataclasses.asdict(TRAIN_CONFIG_FIELDS[name][0]()))
        if section["sigma_max"] < section["sigma_min"]:
            fail(where, f"train_config.{name}.sigma_max", f"must be >= sigma_min ({section['sigma_min']}), "
                 f"got {section['sigma_max']}")
    student = merged.get("student", dataclasses.asdict(DistillConfig()))
    if student["max_steps"] > student["teacher_steps"]:
        fail(where, "train_config.student.max_steps", f"must be at most teacher_steps ({student['teacher_steps']}): "
             f"the student's noise levels are points of the teacher's grid, got {student['max_steps']}")


# ------------------------------------------------------------------------------------- the rest of config.json


def check_format_version(meta: dict, where: Any) -> None:
    if "format_version" not in meta:
        raise BundleError(f"{where} lacks 'format_version'; it is corrupt or not a dydiff-env bundle")
    version = meta["format_version"]
    if not (is_int(version) and version >= 1):
        fail(where, "format_version", f"must be a positive integer, got {show(version)}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where}: the bundle has format version {version}, newer than this dydiff-env reads "
                          f"({FORMAT_VERSION}); upgrade with `pip install -U dydiff-env`")


def check_env_and_dims(meta: dict, where: Any) -> None:
    env_id = meta["env_id"]
    if not isinstance(env_id, str):
        fail(where, "env_id", f"must be a Gymnasium env id such as 'Hopper-v5', got {show(env_id)}")
    try:
        task = get_task(env_id)
    except ValueError as err:
        fail(where, "env_id", f"names no known env ({err})")
    for key, dim in (("obs_dim", task.obs_dim), ("act_dim", task.act_dim)):
        if meta[key] != dim or not is_int(meta[key]):
            fail(where, key, f"must be {dim} for {task.env_id}, got {show(meta[key])}")
    if "task" in meta and meta["task"] != task.name:
        fail(where, "task", f"must be '{task.name}' for {task.env_id}, got {show(meta['task'])}")


def versions_problem(versions: Any) -> str | None:
    """What is wrong with a `software_versions` value (None when it is a dict of package names to versions)."""
    if (isinstance(versions, dict) and len(versions) <= MAX_VERSION_ENTRIES
            and all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items())):
        return None
    return f"must be a JSON object of at most {MAX_VERSION_ENTRIES} package names to version strings, got {show(versions)}"


# descriptive fields that config.json may hold; other unknown top-level keys are allowed (notes added by hand)
OPTIONAL_FIELDS: dict[str, Check] = {
    "package_version": lambda v: None if isinstance(v, str) else f"must be a string, got {show(v)}",
    "dataset_id": lambda v: None if isinstance(v, str) else f"must be a string, got {show(v)}",
    "dataset_hash": lambda v: None if isinstance(v, str) else f"must be a string, got {show(v)}",
    "dataset_transitions": integer(0),
    "dataset_episodes": integer(0),
    "dataset_mean_return": number(),
    "weights_dtype": lambda v: None if v in WEIGHT_DTYPES else f"must be one of {sorted(WEIGHT_DTYPES)}, got {show(v)}",
    # the versions of the packages that trained the bundle (`data.software_versions()`); older bundles have none
    "software_versions": versions_problem,
    # models that a training run started and has not yet written into the bundle (`train --resume` goes on)
    "in_training": lambda v: None if isinstance(v, list) and all(k in MODEL_FILES for k in v) and len(set(v)) == len(v)
    else f"must be a list of distinct model kinds {list(MODEL_FILES)}, got {show(v)}",
}


def check_optional_fields(meta: dict, where: Any) -> None:
    for key, check in OPTIONAL_FIELDS.items():
        problem = check(meta[key]) if key in meta else None
        if problem:
            fail(where, key, problem)
    episodes, transitions = meta.get("dataset_episodes"), meta.get("dataset_transitions")
    if episodes is not None and transitions is not None and episodes > transitions:
        fail(where, "dataset_episodes", f"must be at most dataset_transitions ({transitions}), got {episodes}")


def check_normalization(norm: Any, obs_dim: int, act_dim: int, where: Any) -> None:
    """Per-dimension statistics of observations, actions and both: the right lengths, float32-finite, std > 0
    and high > low (the models divide by both)."""
    dims = {"obs": obs_dim, "act": act_dim, "transition": obs_dim + act_dim}
    expected = [f"{prefix}.{stat}" for prefix in dims for stat in NORMALIZATION_STATS]
    if not isinstance(norm, dict):
        fail(where, "normalization", f"must be a JSON object with the keys {expected}, got {show(norm)}")
    missing, unknown = [k for k in expected if k not in norm], sorted(set(norm) - set(expected))
    if missing or unknown:
        fail(where, "normalization", f"must have exactly the keys {expected} (missing {missing}, unknown {show(unknown)})")
    stats = {}
    for key in expected:
        dim, value = dims[key.split(".")[0]], norm[key]
        if not (isinstance(value, list) and len(value) == dim and all(is_number(v) for v in value)):
            fail(where, f"normalization['{key}']", f"must be a list of {dim} finite numbers (one per "
                 f"{key.split('.')[0]} dimension), got {show(value)}")
        stats[key] = np.asarray(value, dtype=np.float32)
    with np.errstate(over="ignore"):
        for prefix in dims:
            std, low, high = (stats[f"{prefix}.{stat}"] for stat in ("std", "low", "high"))
            if not (std > 0).all():
                fail(where, f"normalization['{prefix}.std']", f"must be positive (float32), got {show(norm[f'{prefix}.std'])}")
            if not ((high > low) & np.isfinite(high - low)).all():
                fail(where, f"normalization['{prefix}.high']", f"must exceed {prefix}.low in every dimension by a "
                     f"finite float32 margin, got {show(norm[f'{prefix}.high'])}")


def file_kind(name: str) -> str | None:
    """The kind of bundle file a name holds ('dynamics', ..., 'start_states'), or None for any other name."""
    match = BUNDLE_FILE_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    return next(kind for kind, stem in FILE_KINDS.items() if stem == match.group(1))


def plain_file_name(kind: str) -> str:
    return f"{FILE_KINDS[kind]}.safetensors"


def tagged_file_name(kind: str, sha256: str) -> str:
    """The name of a file of `kind` tagged with its content (see FILE_KINDS)."""
    return f"{FILE_KINDS[kind]}.{sha256[:8]}.safetensors"


def files_by_kind(files: dict) -> dict[str, str]:
    """Kind -> file name of a checked `files` entry (check_files allows one file per kind)."""
    return {file_kind(name): name for name in files if file_kind(name) is not None}


def check_files(files: Any, where: Any) -> None:
    """`files` maps the bundle's own file names to their sha256. Only these names are ever opened (inside the
    bundle directory), so a name with a path in it is refused rather than ignored."""
    known = [*MODEL_FILES.values(), START_STATES_FILE]
    if not isinstance(files, dict):
        fail(where, "files", f"must be a JSON object mapping file names to sha256 digests, got {show(files)}")
    unknown = sorted(name for name in files if file_kind(name) is None)
    if unknown:
        fail(where, "files", f"names unknown files {show(unknown)}; a bundle holds only {known} (or these names "
             "with 8 hex digits of the file's sha256 before .safetensors)")
    for name, digest in files.items():
        if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            fail(where, f"files['{name}']", f"must be a sha256 digest (64 lowercase hex digits), got {show(digest)}")
        tag = BUNDLE_FILE_NAME.fullmatch(name).group(2)
        if tag is not None and not digest.startswith(tag):
            fail(where, f"files['{name}']", f"must start with the file name's tag {tag}, got {show(digest)}")
    for kind in FILE_KINDS:
        names = sorted(name for name in files if file_kind(name) == kind)
        if len(names) > 1:
            fail(where, "files", f"names {len(names)} files for {kind} ({show(names)}); a bundle holds one")


def check_models(models: Any, files: dict, config: TrainConfig, where: Any) -> None:
    """`models` maps each trained model kind to its training summary; every listed model needs its file's
    sha256, the dynamics summary's elites must be distinct members of the ensemble, and a student needs the
    diffusion model and the sha256 of the teacher it was distilled from (which `load_bundle` compares)."""
    dynamics = config.dynamics
    if not isinstance(models, dict):
        fail(where, "models", f"must be a JSON object mapping model kinds to training summaries, got {show(models)}")
    unknown = sorted(set(models) - set(MODEL_FILES))
    if unknown:
        fail(where, "models", f"has unknown model kinds {show(unknown)}; kinds are {list(MODEL_FILES)}")
    for kind, summary in models.items():
        if not isinstance(summary, dict):
            fail(where, f"models.{kind}", f"must be a JSON object (the model's training summary), got {show(summary)}")
        if kind not in files_by_kind(files):
            fail(where, "files", f"has no sha256 for {MODEL_FILES[kind]}, which models.{kind} needs")
    elites = models.get("dynamics", {}).get("elites")
    if elites is not None and not (isinstance(elites, list) and len(elites) == dynamics.num_elites
                                   and all(is_int(e) and 0 <= e < dynamics.ensemble_size for e in elites)
                                   and len(set(elites)) == len(elites)):
        fail(where, "models.dynamics.elites", f"must list {dynamics.num_elites} distinct members in "
             f"[0, {dynamics.ensemble_size}) (train_config.dynamics num_elites and ensemble_size), got {show(elites)}")
    if "student" in models:
        if "diffusion" not in models:
            fail(where, "models.student", "needs the diffusion model it was distilled from, which the bundle lacks")
        teacher = models["student"].get("teacher_sha256")
        if not (isinstance(teacher, str) and SHA256.fullmatch(teacher)):
            fail(where, "models.student.teacher_sha256", f"must be the sha256 of the teacher's weight file (64 "
                 f"lowercase hex digits), got {show(teacher)}")
    if config.sampler.kind == "student" and "student" not in models:
        fail(where, "train_config.sampler.kind", "is 'student' but the bundle has no student",
             "distil one with `dydiff-env train distill --bundle DIR` or choose another sampler kind")


def validate_config(meta: Any, where: Any) -> None:
    """Check a parsed config.json whole (see the module docstring); `where` (its path) starts every message."""
    if not isinstance(meta, dict):
        fail(where, "the top level", f"must be a JSON object, got {show(meta)}")
    check_format_version(meta, where)  # first: a newer format may differ in every other field
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise BundleError(f"{where} lacks '{key}'; it is corrupt or not a dydiff-env bundle")
    check_env_and_dims(meta, where)
    check_optional_fields(meta, where)
    check_normalization(meta["normalization"], meta["obs_dim"], meta["act_dim"], where)
    check_train_config(meta["train_config"], where)
    check_files(meta["files"], where)
    check_models(meta["models"], meta["files"], TrainConfig.from_dict(meta["train_config"]), where)


# ------------------------------------------------------------------------------------------------- tensors


def check_model_size(kind: str, expected: dict[str, torch.Tensor], where: Any) -> None:
    """`expected`: the state dict of the model as config.json describes it, built on the meta device."""
    count = sum(t.numel() for t in expected.values())
    if count > MAX_MODEL_PARAMETERS:
        fail(where, f"train_config.{kind}", f"describes a {kind} model of {count:,} parameters, more than the "
             f"{MAX_MODEL_PARAMETERS:,} a bundle may hold", "the bundle is corrupt or hostile; re-copy it or re-train it")


def dtype_problem(name: str, tensor: torch.Tensor, expected: torch.Tensor) -> str | None:
    if expected.is_floating_point() and tensor.dtype not in WEIGHT_DTYPES.values():
        return f"{name}: dtype {tensor.dtype} is not float16, bfloat16, float32 or float64"
    if not expected.is_floating_point() and tensor.dtype not in INDEX_DTYPES:
        return f"{name}: dtype {tensor.dtype} is not a signed integer (or uint8)"
    return None


def check_weights(kind: str, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Any) -> None:
    """A weight file against the model config.json describes: the same names and shapes, float weights of a
    float dtype, integer buffers of an integer dtype, no NaN or inf."""
    problems = [f"{k}: missing" for k in expected if k not in tensors]
    problems += [f"{k}: unexpected" for k in tensors if k not in expected]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    problems += [p for k, v in expected.items() if k in tensors for p in [dtype_problem(k, tensors[k], v)] if p]
    if problems:
        raise BundleError(f"bundle file {path} does not match the {kind} model described in config.json "
                          f"({'; '.join(problems[:4])}); the bundle is inconsistent, re-train it")
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        raise BundleError(f"bundle file {path} has NaN or inf in {nonfinite[:4]}; re-copy the bundle or re-train it")


def check_elites(elites: torch.Tensor, ensemble_size: int, recorded: list | None, path: Any) -> None:
    """The dynamics file's elite indices: distinct members of the ensemble, the ones config.json records."""
    values = elites.tolist()
    if not all(0 <= e < ensemble_size for e in values) or len(set(values)) != len(values):
        raise BundleError(f"bundle file {path}: elites {show(values)} must be distinct members in [0, {ensemble_size}); "
                          "the bundle is inconsistent, re-train it")
    if recorded is not None and sorted(recorded) != sorted(values):
        raise BundleError(f"bundle file {path}: elites {show(values)} differ from models.dynamics.elites "
                          f"{show(recorded)} in config.json; the bundle is inconsistent, re-train it")


def check_start_states(tensors: dict[str, torch.Tensor], obs_dim: int, path: Any) -> None:
    """Stored dataset states: observations (N >= 1, obs_dim) float and finite as float32, is_episode_start (N,)
    bool, and optionally simulator states qpos / qvel with N rows."""
    unknown = sorted(set(tensors) - set(START_STATE_KEYS))
    missing = [k for k, required in START_STATE_KEYS.items() if required and k not in tensors]
    if unknown or missing:
        raise BundleError(f"bundle file {path} must hold observations and is_episode_start (qpos and qvel are "
                          f"optional); it lacks {missing} and has unknown {show(unknown)}; {FIX}")
    obs = tensors["observations"]
    if obs.dtype not in WEIGHT_DTYPES.values() or obs.dim() != 2 or obs.shape[0] < 1 or obs.shape[1] != obs_dim:
        raise BundleError(f"bundle file {path}: observations must be a float array of shape (N >= 1, {obs_dim}), "
                          f"got {obs.dtype} {tuple(obs.shape)}; {FIX}")
    if not torch.isfinite(obs.float()).all():
        raise BundleError(f"bundle file {path}: observations hold NaN or inf (as float32); {FIX}")
    rows = obs.shape[0]
    starts = tensors["is_episode_start"]
    if starts.dtype != torch.bool or tuple(starts.shape) != (rows,):
        raise BundleError(f"bundle file {path}: is_episode_start must be a bool array of shape ({rows},), "
                          f"got {starts.dtype} {tuple(starts.shape)}; {FIX}")
    for key in ("qpos", "qvel"):
        state = tensors.get(key)
        if state is not None and (state.dtype not in WEIGHT_DTYPES.values() or state.dim() != 2 or state.shape[0] != rows):
            raise BundleError(f"bundle file {path}: {key} must be a float array with {rows} rows, "
                              f"got {state.dtype} {tuple(state.shape)}; {FIX}")
