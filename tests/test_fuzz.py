"""Property-based tests (hypothesis) of the public API under odd and hostile inputs.

(a) The envs, single (`gymnasium.make`) and vector (`DydiffEnv`), get random action arrays (any shape and
dtype: huge finite floats, ints, bools, NaN/inf, torch tensors that require grad, lists, junk), seeds,
`reset` options and policy handles (callables that return wrong shapes, NaN, junk). Invariants: nothing
they return holds NaN or inf; every refusal is a documented exception type with a message; what must be
accepted is (a finite real action of the right shape, a bool reset mask of the right shape).
(b) A copy of the tiny bundle gets random damage to config.json (keys deleted, values replaced by null,
numbers, huge ints, NaN, strings, lists, objects, lists made shorter or longer, unknown file names) and to
its tensor files (dtypes, shapes, values, truncation). Invariants: it either loads and the env steps
finitely, or loading raises `BundleError` with a message; loading opens no file outside the bundle
directory.

Bounded: few examples each, derandomized (CI sees the same examples every run), no example database. The
tests take about 12 s on one core, besides the session's tiny bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file

from dydiff_env import BundleError, DydiffEnv, PolicyError, load_bundle
from dydiff_env.bundle import MODEL_FILES, START_STATES_FILE

ENV_ID = "Dydiff-hopper-v0"
DOCUMENTED = (ValueError, TypeError, RuntimeError, PolicyError, BundleError)
SEED_ERRORS = (*DOCUMENTED, gym.error.Error)  # Gymnasium's own error for a seed that is not an int >= 0
FAST = dict(pool_size=4, sampler={"num_steps": 2})  # a pool generation: ceil(4 / 0.6) = 7 short trajectories
TRAINED_FILES = tuple(MODEL_FILES[kind] for kind in ("dynamics", "reward", "bc", "diffusion"))  # the tiny bundle's
BUNDLE_FILES = ("config.json", *TRAINED_FILES, START_STATES_FILE)


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow casts of huge inputs, Gymnasium's checker notes
        yield


def assert_documented(err: BaseException, allowed=DOCUMENTED) -> None:
    assert isinstance(err, allowed), f"undocumented {type(err).__name__}: {err}"
    assert str(err).strip(), f"{type(err).__name__} without a message"


def assert_finite(*arrays) -> None:
    for array in arrays:
        assert np.isfinite(np.asarray(array, dtype=np.float64)).all(), array


# --------------------------------------------------------------------------------------------------- actions


def finite_real_of_shape(actions, shape: tuple[int, ...]) -> bool:
    """What the env must accept: an array-like of finite real numbers (ints or floats) of the right shape."""
    if isinstance(actions, torch.Tensor):
        actions = actions.detach().numpy()
    try:
        arr = np.asarray(actions)
    except ValueError:  # ragged nested lists
        return False
    real = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    return arr.shape == shape and real and bool(np.isfinite(arr.astype(np.float64)).all())


NUMPY_DTYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool", "complex64"]
JUNK = st.sampled_from([None, "abc", {}, object(), [[1.0, "x", 0.0]], [[0.0], [0.0, 0.0]]])


@st.composite
def actions(draw, shape: tuple[int, ...]):
    """An action batch for an env whose actions have `shape`: mostly of that shape, with any dtype and
    values (huge finite floats, NaN, inf included); as numpy, a torch tensor (maybe requiring grad), a
    list, or junk."""
    wrong_shape = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    array_shape = draw(st.one_of(st.just(shape), st.just(shape), wrong_shape))
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    if dtype.kind == "f" and draw(st.booleans()):  # values near the action bounds, then anything
        elements = st.floats(-2, 2, width=dtype.itemsize * 8)
    else:
        elements = None
    arr = draw(hnp.arrays(dtype, array_shape, elements=elements))
    form = draw(st.sampled_from(["numpy", "numpy", "torch", "list", "junk"]))
    if form == "torch" and dtype.kind == "f":
        return torch.tensor(arr, requires_grad=draw(st.booleans()))
    if form == "torch" and dtype.kind in "iub":
        return torch.tensor(arr)
    if form == "list":
        return arr.tolist()
    if form == "junk":
        return draw(JUNK)
    return arr


def step_checked(env, action, shape: tuple[int, ...]):
    """One step under the invariants; returns the step's result, or None when it was refused."""
    try:
        result = env.step(action)
    except Exception as err:
        assert_documented(err)
        assert not finite_real_of_shape(action, shape), f"refused a finite real action: {err}"
        return None
    assert finite_real_of_shape(action, shape), f"accepted {action!r}"
    obs, reward, *_ = result
    assert_finite(obs, reward)
    return result


@fuzz_settings(40)
@given(num_envs=st.integers(1, 3), plans=st.sampled_from(["auto", "always"]), seed=st.integers(0, 2**32),
       data=st.data())
def test_vector_env_takes_any_actions(bundle, num_envs, plans, seed, data):
    env = DydiffEnv(num_envs, bundle=bundle, plans=plans, **FAST)
    obs, _ = env.reset(seed=seed)
    assert_finite(obs)
    for _ in range(3):
        step_checked(env, data.draw(actions((num_envs, 3))), (num_envs, 3))
    obs, *_ = env.step(np.zeros((num_envs, 3)))  # a refused step left the env as it was
    assert_finite(obs)


@fuzz_settings(30)
@given(seed=st.integers(0, 2**32), data=st.data())
def test_single_env_takes_any_actions(bundle, seed, data):
    env = gym.make(ENV_ID, bundle=bundle, **FAST)
    obs, _ = env.reset(seed=seed)
    assert_finite(obs)
    for _ in range(4):
        result = step_checked(env, data.draw(actions((3,))), (3,))
        if result is not None and (result[2] or result[3]):
            obs, _ = env.reset()
            assert_finite(obs)


def test_bfloat16_actions_are_accepted(bundle):
    env = DydiffEnv(1, bundle=bundle, **FAST)
    env.reset(seed=0)
    obs, *_ = env.step(torch.full((1, 3), 0.5, dtype=torch.bfloat16))
    assert np.isfinite(obs).all()


# ----------------------------------------------------------------------------------------- seeds and options

SEEDS = st.one_of(st.none(), st.integers(0, 2**64), st.integers(-3, -1),
                  st.lists(st.one_of(st.none(), st.integers(-1, 100)), max_size=3))


@st.composite
def reset_options(draw, num_envs: int):
    """None, {}, an unknown option, or a reset_mask of any dtype and shape (often a valid bool mask)."""
    kind = draw(st.sampled_from(["none", "empty", "unknown", "mask", "mask", "mask"]))
    if kind == "none":
        return None
    if kind == "empty":
        return {}
    if kind == "unknown":
        return {"start_obs": draw(st.integers())}
    dtype = draw(st.sampled_from(["bool", "bool", "int64", "float32", "uint8"]))
    shape = draw(st.one_of(st.just((num_envs,)), hnp.array_shapes(min_dims=0, max_dims=2, max_side=4)))
    mask = draw(hnp.arrays(np.dtype(dtype), shape))
    return {"reset_mask": mask.tolist() if draw(st.booleans()) else mask}


def valid_mask(options, num_envs: int, first: bool) -> bool:
    """Whether a reset with `options` must succeed (seed aside)."""
    if options is None or "reset_mask" not in options:
        return True
    mask = np.asarray(options["reset_mask"])
    return mask.dtype == np.bool_ and mask.shape == (num_envs,) and (mask.all() or not first)


def valid_seed(seed) -> bool:
    if isinstance(seed, list):
        return all(s is None or s >= 0 for s in seed)
    return seed is None or seed >= 0


@fuzz_settings(25)
@given(num_envs=st.integers(1, 3), data=st.data())
def test_vector_env_reset_with_any_seed_and_options(bundle, num_envs, data):
    env = DydiffEnv(num_envs, bundle=bundle, **FAST)
    started = False
    for _ in range(3):
        seed, options = data.draw(SEEDS), data.draw(reset_options(num_envs))
        try:
            obs, info = env.reset(seed=seed, options=options)
        except Exception as err:
            assert_documented(err, SEED_ERRORS)
            assert not (valid_seed(seed) and valid_mask(options, num_envs, first=not started)), err
            continue
        assert valid_mask(options, num_envs, first=not started) and valid_seed(seed)
        assert obs.shape == (num_envs, 11)
        assert_finite(obs, *(v for k, v in info.items() if not k.startswith("_")))
        started = True
        obs, *_ = env.step(np.zeros((num_envs, 3)))
        assert_finite(obs)


@fuzz_settings(15)
@given(data=st.data())
def test_single_env_reset_with_any_seed_and_options(bundle, data):
    # without Gymnasium's passive checker: after a refused first reset it fails the first step itself
    # (TypeError unpacking the reset data it never got)
    env = gym.make(ENV_ID, bundle=bundle, disable_env_checker=True, **FAST)
    started = False
    for _ in range(3):
        seed = data.draw(st.one_of(st.none(), st.integers(0, 2**64), st.integers(-3, -1)))
        options = data.draw(reset_options(1))
        try:
            obs, _ = env.reset(seed=seed, options=options)
        except Exception as err:
            assert_documented(err, SEED_ERRORS)
            assert not (valid_seed(seed) and valid_mask(options, 1, first=not started)), err
            continue
        started = True
        assert_finite(obs)
        step_checked(env, np.zeros(3), (3,))


# ---------------------------------------------------------------------------------------------- policy handles

POLICY_OUTPUTS = ["good", "good", "wrong_rows", "wrong_dim", "nan", "inf", "huge", "ints", "list", "torch_grad",
                  "float64", "scalar", "none", "string"]


def make_policy(kind: str, good_calls: int):
    """A numpy policy that acts sensibly for `good_calls` calls and then returns output of `kind`."""
    calls = []

    def policy(obs: np.ndarray):
        calls.append(1)
        batch = obs.shape[0]
        act = np.tanh(obs[:, :3]).astype(np.float32)
        if len(calls) <= good_calls or kind == "good":
            return act
        bad = {
            "wrong_rows": lambda: act[:-1] if batch > 1 else np.zeros((2, 3)),
            "wrong_dim": lambda: np.zeros((batch, 2)),
            "nan": lambda: np.where(np.arange(3) == 1, np.nan, act),
            "inf": lambda: np.full((batch, 3), -np.inf),
            "huge": lambda: np.full((batch, 3), 1e30),  # finite, clipped to [-1, 1]
            "ints": lambda: np.ones((batch, 3), dtype=np.int64),
            "list": lambda: act.tolist(),
            "torch_grad": lambda: torch.tensor(act, requires_grad=True),
            "float64": lambda: act.astype(np.float64),
            "scalar": lambda: 0.5,
            "none": lambda: None,
            "string": lambda: "left",
        }
        return bad[kind]()

    return policy


ACCEPTED_OUTPUTS = {"good", "huge", "ints", "list", "torch_grad", "float64"}


@fuzz_settings(30)
@given(kind=st.sampled_from(POLICY_OUTPUTS), good_calls=st.integers(0, 3), num_envs=st.integers(1, 3),
       plans=st.sampled_from(["auto", "always"]), single=st.booleans(), data=st.data())
def test_env_with_any_policy_handle(bundle, kind, good_calls, num_envs, plans, single, data):
    """A handle's bad output is refused (PolicyError, or ValueError for output that is not numbers) by the
    reset or step that calls it; a good one never is; nothing returned is NaN or inf."""
    policy = make_policy(kind, good_calls)
    if single:
        env, shape = gym.make(ENV_ID, bundle=bundle, policy=policy, plans=plans, **FAST), (3,)
    else:
        env, shape = DydiffEnv(num_envs, bundle=bundle, policy=policy, plans=plans, **FAST), (num_envs, 3)

    def refused_by_handle(err: Exception) -> None:
        assert_documented(err)
        assert kind not in ACCEPTED_OUTPUTS, f"a handle returning {kind} output was refused: {err}"

    try:
        obs, _ = env.reset(seed=data.draw(st.integers(0, 1000)))
    except Exception as err:
        refused_by_handle(err)
        return
    assert_finite(obs)
    for _ in range(4):
        follow = data.draw(st.booleans())  # act as the handle does, so that auto mode serves its plans
        action = np.tanh(np.asarray(obs, dtype=np.float32)[..., :3]) if follow else data.draw(actions(shape))
        try:
            obs, reward, terminated, truncated, _ = env.step(action)
        except Exception as err:
            if finite_real_of_shape(action, shape):
                refused_by_handle(err)
                return
            assert_documented(err)
            continue
        assert_finite(obs, reward)
        if single and (terminated or truncated):
            obs, _ = env.reset()


# ------------------------------------------------------------------------------------------ damaged bundles

_opened: list[str] | None = None  # files opened while a test records (see `files_opened`)


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_open)  # audit hooks cannot be removed; this one only records while _opened is a list


def load_recording_opened_files(directory: Path):
    """`load_bundle(directory)` (or its exception) and the files it opened, Python imports aside. The
    safetensors reader opens files in Rust, unseen here, but load_bundle hashes every file first in Python."""
    global _opened
    _opened = []
    try:
        return load_bundle(directory), _opened
    except Exception as err:
        return err, _opened
    finally:
        _opened = None


def assert_reads_only_inside(opened: list[str], directory: Path) -> None:
    root = directory.resolve()
    for name in opened:
        path = Path(name).resolve()
        if path.suffix in (".py", ".pyc", ".so"):  # modules imported on first use
            continue
        assert path == root or root in path.parents, f"load_bundle opened {path}, outside {root}"


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in BUNDLE_FILES:
        shutil.copyfile(src / name, dst / name)
    return dst


def assert_loads_and_steps_or_refused(directory: Path) -> None:
    """The invariant of a damaged bundle: a BundleError with a message, or an env that steps finitely."""
    loaded, opened = load_recording_opened_files(directory)
    assert_reads_only_inside(opened, directory)
    if isinstance(loaded, Exception):
        assert isinstance(loaded, BundleError), f"{type(loaded).__name__}: {loaded}"
        assert str(loaded).strip()
        event("refused: " + str(loaded).replace(str(directory), "").split(" must")[0].split(" (")[0][:60])
        return
    event("loaded")
    sampler = {"num_steps": 2} if loaded.config.sampler.num_steps > 8 else None  # keep examples fast
    try:
        env = DydiffEnv(2, bundle=loaded, plans="always", pool_size=4, sampler=sampler)
        obs, _ = env.reset(seed=0)
    except BundleError as err:  # a bundle without a model that the env needs (a loaded Bundle: at reset)
        assert re.search(r"has no [a-z]+ model", str(err)), err
        event("loaded without a model the env needs")
        return
    assert_finite(obs)
    for i in range(3):
        actions_ = env.planned_actions() if i % 2 == 0 else np.full((2, 3), 0.5)
        obs, reward, *_ = env.step(actions_)
        assert_finite(obs, reward)


def test_open_recorder_sees_every_file_load_bundle_reads(tiny_bundle, tmp_path):
    """The recorder behind the 'nothing outside the bundle' invariant does see what load_bundle opens."""
    directory = copy_bundle(tiny_bundle, tmp_path / "bundle")
    loaded, opened = load_recording_opened_files(directory)
    assert loaded.dynamics is not None
    assert set(BUNDLE_FILES) <= {Path(name).name for name in opened}
    assert_reads_only_inside(opened, directory)


def json_paths(node, prefix=()):
    """Every (path, value) in a JSON tree, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key), value
        yield from json_paths(value, (*prefix, key))


JSON_VALUES = st.sampled_from([
    None, True, False, -1, 0, 1, 2, 3, 8, 17, 2.5, -0.0, 1e-50, 1e39, 1e300, math.nan, math.inf, -math.inf,
    10**6, 2**63, 2**70, "", "x", "float16", "../start_states.safetensors", [], [0], [1, 2, 3], [60_000, 60_000],
    [None], {}, {"a": 1},
])
HOSTILE_FILE_NAMES = st.sampled_from(["../outside.safetensors", "../config.json", "/etc/passwd", "..", "sub/dynamics.safetensors",
                                      "config.json", "checkpoints/dynamics.safetensors", "dynamics.safetensors "])


def perturbed(value, factor):
    """Numbers (also inside lists) scaled by `factor`; ints stay ints; anything else unchanged."""
    if isinstance(value, list):
        return [perturbed(v, factor) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return int(value * factor) if isinstance(value, int) else value * factor


@st.composite
def config_edits(draw, meta: dict):
    """One to three random edits of a config.json tree, applied to it in place."""
    paths = [path for path, _ in json_paths(meta)]
    shallow = [path for path in paths if len(path) <= 2]  # else list entries (statistics) would dominate
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "perturb", "perturb", "delete", "shorten", "extend",
                                   "add_key", "add_file"]))
        if op == "add_file":
            meta["files"] = meta["files"] if isinstance(meta.get("files"), dict) else {}
            meta["files"][draw(HOSTILE_FILE_NAMES)] = "0" * 64
            continue
        path = draw(st.sampled_from(shallow) | st.sampled_from(paths))
        parent = meta
        try:
            for key in path[:-1]:
                parent = parent[key]
            value = parent[path[-1]]
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced it
            continue
        if op == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif op == "perturb":  # a plausible value of the same type, which often still loads
            parent[path[-1]] = perturbed(value, draw(st.sampled_from([0.5, 2, -1, 3])))
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "shorten" and isinstance(value, list) and value:
            parent[path[-1]] = value[:-1]
        elif op == "extend" and isinstance(value, list):
            parent[path[-1]] = value + value[-1:] if value else [0]
        elif op == "add_key" and isinstance(value, dict):
            value["unexpected"] = draw(JSON_VALUES)
    return meta


@fuzz_settings(60)
@given(data=st.data())
def test_damaged_config_loads_or_is_refused(tiny_bundle, data):
    with tempfile.TemporaryDirectory() as tmp:
        directory = copy_bundle(tiny_bundle, Path(tmp) / "bundle")
        meta = data.draw(config_edits(json.loads((directory / "config.json").read_text())))
        (directory / "config.json").write_text(json.dumps(meta))
        (Path(tmp) / "outside.safetensors").write_bytes(b"not to be read")
        assert_loads_and_steps_or_refused(directory)


TENSOR_EDITS = ["int8", "int32", "int64", "uint8", "bool", "float16", "bfloat16", "float64", "flatten", "unsqueeze",
                "drop_row", "nan", "inf", "huge", "negate", "delete", "add_key", "truncate", "garbage", "empty"]


def edit_tensor_file(path: Path, op: str, key_index: int, cut: float) -> None:
    """Damage one tensor (the `key_index`-th, wrapping) of a safetensors file, or the file's bytes."""
    if op in ("truncate", "garbage", "empty"):
        data = path.read_bytes()
        damaged = {"truncate": data[: int(len(data) * cut)], "garbage": data[:16] + b"\x13garbage" * 8, "empty": b""}[op]
        path.write_bytes(damaged)
        return
    tensors = load_file(str(path))
    key = sorted(tensors)[key_index % len(tensors)]
    t = tensors[key]
    dtypes = {"int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
              "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if op in dtypes:
        tensors[key] = t.to(dtypes[op])
    elif op == "flatten":
        tensors[key] = t.flatten()
    elif op == "unsqueeze":
        tensors[key] = t.unsqueeze(0)
    elif op == "drop_row":
        tensors[key] = t[:-1].contiguous() if t.dim() else t
    elif op in ("nan", "inf", "huge") and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[0] = {"nan": math.nan, "inf": math.inf, "huge": 1e30}[op]
        tensors[key] = t
    elif op == "negate" and t.dtype != torch.bool:
        tensors[key] = -t - 1  # integer indices out of range, float weights merely different
    elif op == "delete":
        del tensors[key]
    elif op == "add_key":
        tensors["unexpected"] = torch.zeros(2)
    save_file(tensors, str(path))


@fuzz_settings(40)
@given(filename=st.sampled_from([*TRAINED_FILES, START_STATES_FILE]), op=st.sampled_from(TENSOR_EDITS),
       key_index=st.integers(0, 50), cut=st.floats(0, 0.99), record_sha=st.sampled_from([True, True, False]))
def test_damaged_tensors_load_or_are_refused(tiny_bundle, filename, op, key_index, cut, record_sha):
    with tempfile.TemporaryDirectory() as tmp:
        directory = copy_bundle(tiny_bundle, Path(tmp) / "bundle")
        edit_tensor_file(directory / filename, op, key_index, cut)
        if record_sha:  # as a broken tool would, so that the checks behind the checksum are reached
            meta = json.loads((directory / "config.json").read_text())
            meta["files"][filename] = hashlib.sha256((directory / filename).read_bytes()).hexdigest()
            (directory / "config.json").write_text(json.dumps(meta))
        assert_loads_and_steps_or_refused(directory)
