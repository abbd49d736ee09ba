"""Untrusted bundles: every class of bad config.json or tensor file is refused by `load_bundle` with a
`BundleError` that names the field, before any model is built; and the CLI reports bad bundles and bad
arguments in one line, without a traceback. Each test damages a private copy of the session's tiny bundle."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dydiff_env import cli
from dydiff_env.bundle import MODEL_FILES, START_STATES_FILE, BundleError, load_bundle
from dydiff_env.bundle_schema import (MAX_MODEL_PARAMETERS, REQUIRED_KEYS, TRAIN_CONFIG_FIELDS, TRAIN_CONFIG_SCALARS,
                                      validate_config)
from dydiff_env.config import PRESETS, TrainConfig, preset


def read_config(bundle: Path) -> dict:
    return json.loads((bundle / "config.json").read_text())


def write_config(bundle: Path, meta) -> None:
    (bundle / "config.json").write_text(json.dumps(meta))


def edit_config(bundle: Path, edit) -> None:
    """Apply `edit(meta)` to config.json."""
    meta = read_config(bundle)
    edit(meta)
    write_config(bundle, meta)


def rewrite_file(bundle: Path, filename: str, edit) -> None:
    """Apply `edit(tensors)` to a safetensors file and record its new sha256, so that the checks behind the
    checksum are what is tested."""
    path = bundle / filename
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    edit_config(bundle, lambda meta: meta["files"].__setitem__(filename, hashlib.sha256(path.read_bytes()).hexdigest()))


def refused(bundle: Path, *fragments: str) -> str:
    """load_bundle raises a BundleError whose message holds every fragment; returns the message."""
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ------------------------------------------------------------------------------------------------ the schema


def test_schema_has_one_check_per_config_field():
    for name, (klass, checks) in TRAIN_CONFIG_FIELDS.items():
        assert set(checks) == {f.name for f in dataclasses.fields(klass)}, name
        assert {f.name for f in dataclasses.fields(TrainConfig)} == set(TRAIN_CONFIG_FIELDS) | set(TRAIN_CONFIG_SCALARS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_train_config(tiny_bundle, name):
    meta = read_config(tiny_bundle)
    meta["train_config"] = json.loads(json.dumps(preset(name).to_dict()))
    meta["models"] = {}  # the tiny bundle's summaries (its elites) belong to the tiny preset
    validate_config(meta, "config.json")


def test_valid_copy_loads(tiny_bundle_copy):
    b = load_bundle(tiny_bundle_copy)
    assert b.dynamics is not None and b.start_states["observations"].dtype.name == "float32"


# ------------------------------------------------------------------------------------------------ top level


@pytest.mark.parametrize("content", ["null", "42", "[]", '"bundle"'])
def test_config_that_is_not_an_object(tiny_bundle_copy, content):
    (tiny_bundle_copy / "config.json").write_text(content)
    refused(tiny_bundle_copy, "config.json", "the top level must be a JSON object")


@pytest.mark.parametrize("version", ["1", None, 0, -1, 1.0, True, [1]])
def test_format_version_of_the_wrong_type(tiny_bundle_copy, version):
    edit_config(tiny_bundle_copy, lambda meta: meta.__setitem__("format_version", version))
    refused(tiny_bundle_copy, "format_version must be a positive integer")


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key(tiny_bundle_copy, key):
    edit_config(tiny_bundle_copy, lambda meta: meta.pop(key))
    refused(tiny_bundle_copy, f"lacks '{key}'")


@pytest.mark.parametrize("key, value, fragment", [
    ("env_id", None, "env_id must be a Gymnasium env id"),
    ("env_id", "Pong-v5", "env_id names no known env"),
    ("obs_dim", "11", "obs_dim must be 11 for Hopper-v5"),
    ("obs_dim", 12, "obs_dim must be 11"),
    ("act_dim", 3.0, "act_dim must be 3"),
    ("task", "walker2d", "task must be 'hopper'"),
    ("dataset_transitions", "many", "dataset_transitions must be an integer >= 0"),
    ("dataset_episodes", 10**9, "dataset_episodes must be at most dataset_transitions"),
    ("dataset_mean_return", float("nan"), "dataset_mean_return must be a finite number"),
    ("weights_dtype", "int8", "weights_dtype must be one of"),
    ("package_version", 1, "package_version must be a string"),
])
def test_top_level_field_of_the_wrong_type(tiny_bundle_copy, key, value, fragment):
    edit_config(tiny_bundle_copy, lambda meta: meta.__setitem__(key, value))
    refused(tiny_bundle_copy, fragment)


# ------------------------------------------------------------------------------------------- normalization


def set_stat(key, value):
    return lambda meta: meta["normalization"].__setitem__(key, value)


@pytest.mark.parametrize("edit, fragment", [
    (lambda meta: meta.__setitem__("normalization", [1, 2]), "normalization must be a JSON object"),
    (lambda meta: meta["normalization"].pop("act.std"), "missing ['act.std']"),
    (set_stat("obs.extra", [0.0]), "unknown ['obs.extra']"),
    (set_stat("obs.mean", [0.0] * 10), "normalization['obs.mean'] must be a list of 11 finite numbers"),
    (set_stat("transition.low", [0.0] * 15), "normalization['transition.low'] must be a list of 14"),
    (set_stat("act.mean", "zeros"), "normalization['act.mean'] must be a list of 3"),
    (set_stat("act.mean", [0.0, None, 0.0]), "normalization['act.mean']"),
    (set_stat("act.mean", [0.0, float("inf"), 0.0]), "normalization['act.mean']"),
    (set_stat("act.mean", [0.0, 1e39, 0.0]), "normalization['act.mean']"),  # inf as float32
    (set_stat("act.std", [1.0, 0.0, 1.0]), "normalization['act.std'] must be positive"),
    (set_stat("act.std", [1.0, 1e-50, 1.0]), "normalization['act.std'] must be positive"),  # 0 as float32
    (set_stat("obs.high", [-5.0] * 11), "normalization['obs.high'] must exceed obs.low"),
])
def test_bad_normalization_statistics(tiny_bundle_copy, edit, fragment):
    edit_config(tiny_bundle_copy, edit)
    refused(tiny_bundle_copy, fragment)


# -------------------------------------------------------------------------------------------- train_config


def set_field(path: str, value):
    """An edit that sets train_config.<path> (dotted) to `value`."""
    *parents, last = path.split(".")

    def edit(meta):
        node = meta["train_config"]
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


@pytest.mark.parametrize("edit, fragment", [
    (lambda meta: meta.__setitem__("train_config", None), "train_config must be a JSON object"),
    (lambda meta: meta.__setitem__("train_config", [1]), "train_config must be a JSON object"),
    (set_field("dynamics", None), "train_config.dynamics must be a JSON object of DynamicsConfig fields"),
    (set_field("policy", {}), "train_config has unknown fields ['policy']"),
    (set_field("dynamics.hidden", "abc"), "train_config.dynamics.hidden must be a list of"),
    (set_field("dynamics.hidden", [32, 32.5]), "train_config.dynamics.hidden"),
    (set_field("reward.hidden", [32, -1]), "train_config.reward.hidden"),
    (set_field("bc.lr", "fast"), "train_config.bc.lr must be a finite number > 0"),
    (set_field("bc.batch_size", 2.5), "train_config.bc.batch_size must be an integer >= 1"),
    (set_field("bc.steps_per_epoch", 0), "train_config.bc.steps_per_epoch must be an integer >= 1 or null"),
    (set_field("dynamics.ensemble_size", True), "train_config.dynamics.ensemble_size must be an integer"),
    (set_field("dynamics.num_elites", 4), "train_config.dynamics.num_elites must be at most ensemble_size (3)"),
    (set_field("dynamics.weight_decay", [0.1]), "train_config.dynamics.weight_decay must have one entry per layer"),
    (set_field("diffusion.horizon", 15), "train_config.diffusion.horizon must be divisible by 2"),
    (set_field("diffusion.horizon", 1), "train_config.diffusion.horizon must be an integer in [2, 4096]"),
    (set_field("diffusion.channels", [16, 30]), "train_config.diffusion.channels must be a list of 1 to 8 integers, "
                                                "multiples of 8"),
    (set_field("diffusion.kernel_size", 4), "train_config.diffusion.kernel_size must be an odd integer"),
    (set_field("diffusion.sigma_data", float("nan")), "train_config.diffusion.sigma_data must be a finite number > 0"),
    (set_field("diffusion.holdout_fraction", 1.0), "train_config.diffusion.holdout_fraction must be a finite number in [0, 1)"),
    (set_field("sampler.num_steps", 10**9), "train_config.sampler.num_steps must be an integer in [1, 1000]"),
    (set_field("sampler.rho", 0), "train_config.sampler.rho"),
    (set_field("sampler.sigma_max", 0.001), "train_config.sampler.sigma_max must be >= sigma_min"),
    (set_field("seed", -1), "train_config.seed must be an integer >= 0"),
])
def test_bad_train_config(tiny_bundle_copy, edit, fragment):
    edit_config(tiny_bundle_copy, edit)
    refused(tiny_bundle_copy, fragment)


def test_missing_train_config_fields_take_their_defaults(tiny_bundle_copy):
    edit_config(tiny_bundle_copy, lambda meta: meta["train_config"]["bc"].pop("lr"))
    assert load_bundle(tiny_bundle_copy).config.bc.lr == preset("paper").bc.lr


@pytest.mark.parametrize("model, path, value", [
    ("dynamics", "dynamics.hidden", [60_000, 60_000]),
    ("reward", "reward.hidden", [60_000, 60_000]),
    ("diffusion", "diffusion.channels", [16, 60_000]),
])
def test_huge_network_is_refused_before_it_is_allocated(tiny_bundle_copy, model, path, value):
    """A few numbers in config.json would otherwise ask for gigabytes (the dynamics one for ~100 GB)."""
    edit_config(tiny_bundle_copy, set_field(path, value))
    start = time.perf_counter()
    message = refused(tiny_bundle_copy, f"train_config.{model}", f"more than the {MAX_MODEL_PARAMETERS:,}")
    assert time.perf_counter() - start < 5.0, message


# -------------------------------------------------------------------------------------------- models, files


@pytest.mark.parametrize("edit, fragment", [
    (lambda meta: meta.__setitem__("models", ["dynamics", "reward"]), "models must be a JSON object"),
    (lambda meta: meta["models"].__setitem__("policy", {}), "models has unknown model kinds ['policy']"),
    (lambda meta: meta["models"].__setitem__("reward", 3), "models.reward must be a JSON object"),
    (lambda meta: meta["files"].pop(MODEL_FILES["bc"]), "files has no sha256 for bc.safetensors"),
    (lambda meta: meta.__setitem__("files", [1]), "files must be a JSON object"),
    (lambda meta: meta["files"].__setitem__("../../etc/passwd", "0" * 64), "files names unknown files"),
    (lambda meta: meta["files"].__setitem__(MODEL_FILES["bc"], "not-a-digest"), "files['bc.safetensors'] must be a sha256"),
    (lambda meta: meta["models"]["dynamics"].__setitem__("elites", [0, 7]), "models.dynamics.elites must list 2 distinct"),
    (lambda meta: meta["models"]["dynamics"].__setitem__("elites", [1, 1]), "models.dynamics.elites"),
    (lambda meta: meta["models"]["dynamics"].__setitem__("elites", [0]), "models.dynamics.elites"),
])
def test_bad_models_and_files(tiny_bundle_copy, edit, fragment):
    edit_config(tiny_bundle_copy, edit)
    refused(tiny_bundle_copy, fragment)


# ------------------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.float8_e4m3fn])
def test_weights_that_are_not_floating_point(tiny_bundle_copy, dtype):
    rewrite_file(tiny_bundle_copy, MODEL_FILES["reward"], lambda t: t.__setitem__("net.layers.0.weight",
                                                                                    t["net.layers.0.weight"].to(dtype)))
    refused(tiny_bundle_copy, "reward.safetensors", "net.layers.0.weight: dtype", "is not float16, bfloat16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_of_every_float_dtype_load(tiny_bundle_copy, dtype):
    rewrite_file(tiny_bundle_copy, MODEL_FILES["bc"], lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    b = load_bundle(tiny_bundle_copy)
    assert all(p.dtype == torch.float32 for p in b.bc.parameters())


def test_weights_with_nan(tiny_bundle_copy):
    def poison(tensors):
        tensors["net.layers.1.bias"][0, 0, 0] = float("nan")

    rewrite_file(tiny_bundle_copy, MODEL_FILES["dynamics"], poison)
    refused(tiny_bundle_copy, "dynamics.safetensors", "NaN or inf", "net.layers.1.bias")


@pytest.mark.parametrize("elites, fragment", [
    (torch.tensor([0, 3]), "elites [0, 3] must be distinct members in [0, 3)"),
    (torch.tensor([-1, 0]), "must be distinct members"),
    (torch.tensor([2, 2]), "must be distinct members"),
    (torch.tensor([0.0, 1.0]), "elites: dtype torch.float32 is not a signed integer"),
])
def test_dynamics_elites_out_of_range(tiny_bundle_copy, elites, fragment):
    edit_config(tiny_bundle_copy, lambda meta: meta["models"]["dynamics"].pop("elites"))
    rewrite_file(tiny_bundle_copy, MODEL_FILES["dynamics"], lambda t: t.__setitem__("elites", elites))
    refused(tiny_bundle_copy, "dynamics.safetensors", fragment)


def test_dynamics_elites_disagree_with_config(tiny_bundle_copy):
    recorded = read_config(tiny_bundle_copy)["models"]["dynamics"]["elites"]
    other = sorted(set(range(3)) - set(recorded))[:1] + recorded[:1]
    rewrite_file(tiny_bundle_copy, MODEL_FILES["dynamics"], lambda t: t.__setitem__("elites", torch.tensor(other)))
    refused(tiny_bundle_copy, "differ from models.dynamics.elites")


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.pop("is_episode_start"), "lacks ['is_episode_start']"),
    (lambda t: t.pop("observations"), "lacks ['observations']"),
    (lambda t: t.__setitem__("secret", torch.zeros(1)), "unknown ['secret']"),
    (lambda t: t.__setitem__("is_episode_start", t["is_episode_start"][:-1]), "is_episode_start must be a bool array"),
    (lambda t: t.__setitem__("is_episode_start", t["is_episode_start"].int()), "is_episode_start must be a bool array"),
    (lambda t: t.__setitem__("observations", t["observations"][:, :10].contiguous()), "observations must be a float array"),
    (lambda t: t.update(observations=t["observations"][:0], is_episode_start=t["is_episode_start"][:0]),
     "observations must be a float array of shape (N >= 1, 11)"),
    (lambda t: t["observations"].__setitem__((0, 0), float("nan")), "observations hold NaN or inf"),
    (lambda t: t.__setitem__("observations", t["observations"].double() * 1e300), "observations hold NaN or inf"),
    (lambda t: t.__setitem__("qpos", t["qpos"][:5]), "qpos must be a float array"),
])
def test_bad_start_states(tiny_bundle_copy, edit, fragment):
    rewrite_file(tiny_bundle_copy, START_STATES_FILE, edit)
    refused(tiny_bundle_copy, "start_states.safetensors", fragment)


# ----------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("content", ["null", "42", '{"format_version": "1"}'])
def test_cli_reports_a_bad_bundle_in_one_line(tiny_bundle_copy, capsys, content):
    (tiny_bundle_copy / "config.json").write_text(content)
    assert cli.main(["info", str(tiny_bundle_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["train", "bc", "--out", "x", "--threads", "-1"],
    ["train", "bc", "--out", "x", "--device", "no-such-device"],
    ["train", "bc", "--out", "x", "--checkpoint-every", "nan"],
    ["behaviour", "eval", "actor.safetensors", "--env", "NoSuchEnv-v0"],
    ["collect", "--steps", "0"],
])
def test_cli_refuses_bad_arguments_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_cli_refuses_arguments_checked_later_in_one_line(tmp_path, capsys):
    not_an_actor = tmp_path / "actor.safetensors"
    not_an_actor.write_bytes(b"\x00" * 64)
    for argv in (["collect", "--actor", str(not_an_actor), "--env", "NoSuchEnv-v0"],
                 ["behaviour", "eval", str(not_an_actor)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
