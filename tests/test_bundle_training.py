"""Training into a bundle, loading and validating bundles, checkpoints and resume, and the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dydiff_env import cli
from dydiff_env.bundle import FORMAT_VERSION, MODEL_FILES, START_STATES_FILE, BundleError, load_bundle
from dydiff_env.checkpoint import (checkpoint_exists, flatten_state, load_checkpoint, rng_state, save_checkpoint,
                                   set_rng_state, unflatten_state)
from dydiff_env.config import TrainConfig, preset
from dydiff_env.data import OfflineData, TrajectoryWindows
from dydiff_env.models import edm_sample
from dydiff_env.training import MODEL_KINDS, RunContext, train_models

from conftest import TINY_DATASET_ID


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def write_config(path: Path, meta: dict) -> None:
    (Path(path) / "config.json").write_text(json.dumps(meta, indent=2))


# --------------------------------------------------------------------------------------- end to end, contents


def test_tiny_bundle_loads_and_models_work(tiny_bundle, tiny_dataset):
    b = load_bundle(tiny_bundle, env_id="Hopper-v5", require=MODEL_KINDS)
    d = tiny_dataset
    assert b.task.env_id == "Hopper-v5" and (b.obs_dim, b.act_dim) == (11, 3)
    assert b.config == preset("tiny")
    for kind in MODEL_KINDS:
        model = getattr(b, kind)
        assert model is not None and not model.training
        assert all(not p.requires_grad for p in model.parameters())
    obs, act = torch.as_tensor(d.observations[:64]), torch.as_tensor(d.actions[:64])
    nxt, disagreement = b.dynamics.predict(obs, act, mode="mean")
    assert nxt.shape == (64, 11) and torch.isfinite(nxt).all() and torch.isfinite(disagreement).all()
    assert sorted(b.dynamics.elites.tolist()) == sorted(b.meta["models"]["dynamics"]["elites"])
    reward = b.reward(obs, act)
    assert reward.shape == (64,) and torch.isfinite(reward).all()
    a = b.bc.act(obs, generator=torch.Generator().manual_seed(0))
    assert a.shape == (64, 3) and (a.abs() <= 1).all()
    # diffusion: sample a few windows conditioned on their own first state and actions
    horizon = b.config.diffusion.horizon
    windows = TrajectoryWindows(d, horizon, b.config.diffusion.min_valid_rows)
    x, _ = windows.get(np.arange(4))
    norm = b.normalizer("transition")
    x_unit = torch.as_tensor(norm.to_unit(x))
    mask = b.diffusion.condition_mask()
    sample = edm_sample(b.diffusion.denoise, x_unit, mask, b.config.sampler, torch.Generator().manual_seed(0))
    assert sample.shape == (4, horizon, 14) and torch.isfinite(sample).all()
    assert torch.equal(sample[:, mask], x_unit[:, mask])
    # start states for resets without the dataset
    starts = b.start_states
    assert starts["observations"].shape == (len(d), 11)  # fewer transitions than MAX_START_STATES: all of them
    assert starts["is_episode_start"].sum() == len(d.episode_starts)
    assert starts["qpos"].shape == (len(d), 6) and starts["qvel"].shape == (len(d), 6)


def test_metrics_csv_has_rows_for_every_model(tiny_bundle):
    with open(tiny_bundle / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["time", "model", "step", "metric", "value"]
    assert {r["model"] for r in rows} == set(MODEL_KINDS)
    for r in rows:
        float(r["value"]), int(r["step"])
    metrics = {(r["model"], r["metric"]) for r in rows}
    for kind in ("dynamics", "reward", "bc"):
        assert {(kind, "train_loss"), (kind, "holdout_loss"), (kind, "best_holdout_loss")} <= metrics
    assert {("diffusion", "train_loss"), ("diffusion", "holdout_loss"), ("diffusion", "lr")} <= metrics
    assert any(m.startswith("teacher_forced_error_h") for k, m in metrics if k == "diffusion")
    last_diffusion_step = max(int(r["step"]) for r in rows if r["model"] == "diffusion")
    assert last_diffusion_step == preset("tiny").diffusion.train_steps


def test_config_json_fields(tiny_bundle, tiny_dataset):
    meta = read_config(tiny_bundle)
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["env_id"] == "Hopper-v5" and meta["task"] == "hopper"
    assert (meta["obs_dim"], meta["act_dim"]) == (11, 3)
    assert meta["dataset_id"] == TINY_DATASET_ID
    assert meta["dataset_hash"] == tiny_dataset.content_hash
    assert meta["dataset_transitions"] == len(tiny_dataset)
    assert meta["dataset_episodes"] == len(tiny_dataset.episode_starts)
    assert meta["package_version"]
    norm = meta["normalization"]
    for prefix, dim in (("obs", 11), ("act", 3), ("transition", 14)):
        for stat in ("mean", "std", "low", "high"):
            assert len(norm[f"{prefix}.{stat}"]) == dim, (prefix, stat)
    np.testing.assert_allclose(norm["obs.mean"], tiny_dataset.observations.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm["act.low"], tiny_dataset.actions.min(0))
    assert TrainConfig.from_dict(meta["train_config"]) == preset("tiny")
    assert set(meta["models"]) == set(MODEL_KINDS)
    assert meta["models"]["diffusion"]["steps"] == preset("tiny").diffusion.train_steps
    assert set(meta["files"]) == {MODEL_FILES[kind] for kind in MODEL_KINDS} | {START_STATES_FILE}
    for name, digest in meta["files"].items():
        assert digest == sha256(tiny_bundle / name), name


# ------------------------------------------------------------------------------------------------ load errors


def test_load_bundle_missing_dir(tmp_path):
    with pytest.raises(BundleError, match="no bundle directory") as info:
        load_bundle(tmp_path / "nope")
    assert "dydiff-env train" in str(info.value)


def test_load_bundle_missing_config(tiny_bundle_copy):
    (tiny_bundle_copy / "config.json").unlink()
    with pytest.raises(BundleError, match="no config.json") as info:
        load_bundle(tiny_bundle_copy)
    assert "dydiff-env train" in str(info.value)


@pytest.mark.parametrize("content", ["{not json", "", "\xff\xfe garbage"])
def test_load_bundle_corrupt_config(tiny_bundle_copy, content):
    (tiny_bundle_copy / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(tiny_bundle_copy)


def test_load_bundle_config_missing_key(tiny_bundle_copy):
    meta = read_config(tiny_bundle_copy)
    del meta["normalization"]
    write_config(tiny_bundle_copy, meta)
    with pytest.raises(BundleError, match="lacks 'normalization'"):
        load_bundle(tiny_bundle_copy)


def test_load_bundle_truncated_weight_file(tiny_bundle_copy):
    path = tiny_bundle_copy / MODEL_FILES["dynamics"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt") as info:
        load_bundle(tiny_bundle_copy)
    assert str(path) in str(info.value) and "sha256" in str(info.value)


@pytest.mark.parametrize("garble", ["truncate", "noise"])
def test_load_bundle_unreadable_weight_file_with_matching_sha(tiny_bundle_copy, garble):
    """With the sha256 updated too (a bundle written by a broken tool), the file itself fails to parse."""
    path = tiny_bundle_copy / MODEL_FILES["reward"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if garble == "truncate" else b"\x13\x00garbage" * 50)
    meta = read_config(tiny_bundle_copy)
    meta["files"][MODEL_FILES["reward"]] = sha256(path)
    write_config(tiny_bundle_copy, meta)
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(tiny_bundle_copy)


def test_load_bundle_missing_weight_file(tiny_bundle_copy):
    (tiny_bundle_copy / MODEL_FILES["bc"]).unlink()
    with pytest.raises(BundleError, match="missing") as info:
        load_bundle(tiny_bundle_copy)
    assert "bc.safetensors" in str(info.value)


def test_load_bundle_wrong_tensor_shape(tiny_bundle_copy):
    path = tiny_bundle_copy / MODEL_FILES["reward"]
    tensors = load_file(str(path))
    key = "net.layers.0.weight"
    old_shape = tuple(tensors[key].shape)
    tensors[key] = torch.zeros(old_shape[0], old_shape[1] + 1, old_shape[2])
    save_file(tensors, str(path))
    meta = read_config(tiny_bundle_copy)
    meta["files"][MODEL_FILES["reward"]] = sha256(path)  # so that the shape check is what fails
    write_config(tiny_bundle_copy, meta)
    with pytest.raises(BundleError, match="does not match the reward model") as info:
        load_bundle(tiny_bundle_copy)
    assert key in str(info.value) and "shape" in str(info.value)


def test_load_bundle_env_mismatch(tiny_bundle):
    with pytest.raises(BundleError, match="models Hopper-v5, not Walker2d-v5"):
        load_bundle(tiny_bundle, env_id="Walker2d-v5")
    assert load_bundle(tiny_bundle, env_id="hopper").task.env_id == "Hopper-v5"


def test_load_bundle_newer_format_version(tiny_bundle_copy):
    meta = read_config(tiny_bundle_copy)
    meta["format_version"] = FORMAT_VERSION + 1
    write_config(tiny_bundle_copy, meta)
    with pytest.raises(BundleError, match="newer") as info:
        load_bundle(tiny_bundle_copy)
    assert "pip install -U dydiff-env" in str(info.value)


def test_load_bundle_invalid_train_config(tiny_bundle_copy):
    meta = read_config(tiny_bundle_copy)
    meta["train_config"]["diffusion"]["no_such_field"] = 1
    write_config(tiny_bundle_copy, meta)
    with pytest.raises(BundleError, match=r"train_config\.diffusion has unknown fields \['no_such_field'\]"):
        load_bundle(tiny_bundle_copy)


def test_load_bundle_require_missing_model(tiny_bundle_copy):
    meta = read_config(tiny_bundle_copy)
    del meta["models"]["diffusion"]
    write_config(tiny_bundle_copy, meta)
    b = load_bundle(tiny_bundle_copy)
    assert b.diffusion is None and b.dynamics is not None
    with pytest.raises(BundleError, match="no diffusion model") as info:
        load_bundle(tiny_bundle_copy, require=("dynamics", "diffusion"))
    assert "dydiff-env train diffusion" in str(info.value)


# ----------------------------------------------------------------------------------------------- checkpoints


def _assert_same(a, b, path="s"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, np.generic):  # numpy scalars come back as Python scalars
        _assert_same(a.item(), b, path)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert type(a) is type(b) and a == b, path


def _nested_state():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), None (foreach, ...), 0-d step tensors
        "arrays": {"i32": np.arange(6, dtype=np.int32).reshape(2, 3), "bool": np.array([True, False]),
                   "f64": np.linspace(0, 1, 5), "noncontig": np.arange(12.0).reshape(3, 4)[:, ::2]},
        "tuple": (1, 2.5, "x", None, (torch.ones(2, dtype=torch.float64), [np.float32(1.5)])),
        "none": None,
        "list": [1, {"a": torch.tensor(3)}, []],
        7: "int key",
        0.5: "float key",
        None: "None key",
        "floats": [float("nan"), float("inf"), -float("inf"), 1e-300],
        "scalars": {"i": np.int64(5), "f": np.float64(0.25), "b": np.bool_(True), "t": True},
        "empty": {},
        "tag_like": {"$tensor": "not a tensor", "$dict": [1, 2]},  # user keys that look like the encoding's tags
        "dotted": {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}},  # paths that collide once joined by "."
    }


def test_flatten_unflatten_round_trip():
    state = _nested_state()
    tensors, meta = flatten_state(state)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(meta, allow_nan=False)  # the structure is plain JSON
    _assert_same(state, unflatten_state(tensors, meta))


def test_save_load_checkpoint_round_trip_and_optimizer_resume(tmp_path):
    state = _nested_state()
    path = tmp_path / "ck" / "state.safetensors"
    save_checkpoint(path, state)
    assert checkpoint_exists(path)
    back = load_checkpoint(path)
    _assert_same(state, back)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["state.safetensors"]  # no temporaries left
    # an optimizer restored from the checkpoint takes the same next step
    torch.manual_seed(1)
    x = torch.randn(4, 3)
    nets = []
    for opt_state in (state["optimizer"], back["optimizer"]):
        net = torch.nn.Linear(3, 2)
        net.load_state_dict(state["model"])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        opt.load_state_dict(opt_state)
        net(x).pow(2).sum().backward()
        opt.step()
        nets.append(net)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
    assert not checkpoint_exists(tmp_path / "missing.safetensors")
    save_file({"w": torch.ones(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a dydiff-env checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(TypeError, match="unsupported type"):
        flatten_state({"bad": {1, 2}})
    with pytest.raises(TypeError, match="dict keys"):
        flatten_state({(1, 2): "tuple key"})


def test_rng_state_round_trip():
    g, rng = torch.Generator().manual_seed(3), np.random.default_rng(3)
    tensors, skeleton = flatten_state(rng_state(g, rng))
    state = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    expected = (torch.rand(3, generator=g), rng.random(3))
    g2, rng2 = torch.Generator().manual_seed(99), np.random.default_rng(99)
    set_rng_state(state, g2, rng2)
    assert torch.equal(torch.rand(3, generator=g2), expected[0])
    np.testing.assert_array_equal(rng2.random(3), expected[1])


# ---------------------------------------------------------------------------------------------------- resume


class Interrupt:
    """on_checkpoint callback that simulates a kill (KeyboardInterrupt) right after the first checkpoint."""

    def __init__(self):
        self.calls = []

    def __call__(self, name):
        self.calls.append(name)
        raise KeyboardInterrupt


def _small_resume_config() -> TrainConfig:
    cfg = preset("tiny")
    cfg.checkpoint_every_s = 0.0
    cfg.diffusion.train_steps = 12
    cfg.diffusion.eval_every = 5
    return cfg


def _weights(bundle_dir: Path, kind: str) -> dict:
    return load_file(str(bundle_dir / MODEL_FILES[kind]))


@pytest.mark.parametrize("kind", ["diffusion", "reward"])
def test_resume_after_interruption(tiny_dataset, tmp_path, kind):
    cfg = _small_resume_config()
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference = train_models([kind], tiny_dataset, reference_dir, cfg, progress=False)

    interrupt = Interrupt()
    with pytest.raises(KeyboardInterrupt):
        train_models([kind], tiny_dataset, resumed_dir, cfg, progress=False, on_checkpoint=interrupt)
    assert interrupt.calls == [kind]
    ckpt = RunContext(resumed_dir, torch.device("cpu")).checkpoint_path(kind)
    assert checkpoint_exists(ckpt)
    partial = load_checkpoint(ckpt)
    assert partial["step" if kind == "diffusion" else "epoch"] == 1
    # the interrupted bundle is valid, just without the model
    assert getattr(load_bundle(resumed_dir), kind) is None

    summaries = train_models([kind], tiny_dataset, resumed_dir, cfg, resume=True, progress=False)
    if kind == "diffusion":
        assert summaries["diffusion"]["steps"] == cfg.diffusion.train_steps
        assert load_checkpoint(ckpt)["step"] == cfg.diffusion.train_steps
    else:
        assert summaries[kind]["epochs"] == reference[kind]["epochs"]
    b = load_bundle(resumed_dir, require=(kind,))
    assert getattr(b, kind) is not None
    # resuming restores model, optimiser, schedule and RNG states: same weights as an uninterrupted run
    ref_w, res_w = _weights(reference_dir, kind), _weights(resumed_dir, kind)
    assert ref_w.keys() == res_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], res_w[k]), k


def test_resume_skips_models_already_in_bundle(tiny_bundle_copy, tiny_dataset, capsys):
    trained = [MODEL_FILES[kind] for kind in MODEL_KINDS]  # the student is distilled, not trained by `train`
    before = {name: sha256(tiny_bundle_copy / name) for name in trained}
    summaries = train_models(list(MODEL_KINDS), tiny_dataset, tiny_bundle_copy, preset("tiny"), resume=True,
                             progress=False)
    assert summaries == {}
    assert capsys.readouterr().out.count("skipped") == len(MODEL_KINDS)
    assert {name: sha256(tiny_bundle_copy / name) for name in trained} == before


def test_train_refuses_bundle_of_another_dataset(tiny_bundle_copy, tiny_dataset):
    d = tiny_dataset
    n_eps = 20
    n = int(d.episode_lengths[:n_eps].sum())
    other = OfflineData(d.observations[:n], d.actions[:n], d.rewards[:n], d.next_observations[:n],
                        d.terminations[:n], d.truncations[:n], d.episode_starts[:n_eps], d.episode_lengths[:n_eps],
                        dataset_id="other/hopper/subset-v0", env_id="Hopper-v5")
    with pytest.raises(BundleError, match="another dataset"):
        train_models(["reward"], other, tiny_bundle_copy, preset("tiny"), progress=False)


def test_train_unknown_kind(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="unknown model kinds"):
        train_models(["policy"], tiny_dataset, tmp_path / "b", preset("tiny"), progress=False)


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_info(tiny_bundle, capsys):
    assert cli.main(["info", str(tiny_bundle)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["env_id"] == "Hopper-v5" and out["dataset_id"] == TINY_DATASET_ID
    assert set(out["models"]) == set(MODEL_KINDS)
    assert out["start_states"] > 0


def test_cli_info_missing_bundle(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing")]) == 1
    assert "no bundle directory" in capsys.readouterr().err


def test_cli_train_unknown_dataset(tmp_path, capsys):
    code = cli.main(["train", "reward", "--dataset", "nonexistent/hopper/none-v0", "--out", str(tmp_path / "b"),
                     "--preset", "tiny"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "nonexistent/hopper/none-v0" in err and "dydiff-env collect" in err


def test_cli_train_tiny(tiny_dataset, tmp_path, capsys):
    out_dir = tmp_path / "cli-bundle"
    code = cli.main(["train", "bc", "--dataset", TINY_DATASET_ID, "--out", str(out_dir), "--preset", "tiny",
                     "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"bc"' in printed
    b = load_bundle(out_dir, require=("bc",))
    assert b.dynamics is None and b.meta["dataset_hash"] == tiny_dataset.content_hash


def test_cli_train_diffusion_overrides_are_recorded(tiny_dataset, tmp_path, capsys):
    out_dir = tmp_path / "overrides"
    assert cli.main(["train", "diffusion", "--dataset", TINY_DATASET_ID, "--out", str(out_dir), "--preset", "tiny",
                     "--threads", "1", "--diffusion-steps", "4", "--diffusion-action-noise", "0.2",
                     "--diffusion-channels", "8,24", "--diffusion-horizon", "20"]) == 0
    b = load_bundle(out_dir, require=("diffusion",))
    assert b.config.diffusion.action_noise == 0.2 and b.meta["train_config"]["diffusion"]["action_noise"] == 0.2
    assert tuple(b.config.diffusion.channels) == (8, 24) and b.diffusion.net.channels == (8, 24)
    assert b.config.diffusion.horizon == 20 and b.diffusion.horizon == 20
    capsys.readouterr()
    assert cli.main(["train", "diffusion", "--out", str(out_dir), "--diffusion-channels", "8,24",
                     "--diffusion-horizon", "21"]) == 2
    assert "divisible by 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "diffusion", "--out", str(out_dir), "--diffusion-channels", "8,20"])
    assert "multiples of 8" in capsys.readouterr().err
