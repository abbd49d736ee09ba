"""Serving precision (`models.precision`, `Bundle.set_precision`, `EnvConfig.precision`): which networks it
reaches, what stays exact and float32, seeding, and bad values. On the session's `tiny_bundle`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dydiff_env import DydiffEnv, EnvConfig, behaviour_policy, dydiff_rollout, load_bundle
from dydiff_env.models import native_bfloat16, resolve_precision

SIMULATOR = ("diffusion", "dynamics", "reward")


def starts(bundle, count=6):
    s = bundle.start_states
    return torch.as_tensor(s["observations"][:count], dtype=torch.float32)


def rollout(bundle, s0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dydiff_rollout(bundle, s0, behaviour_policy(bundle, gen), horizon=8, generator=gen)


def test_resolve_precision():
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native_bfloat16("cpu") else "float32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", "cpu")


def test_load_default_is_float32_and_set_precision_reaches_simulator_networks_only(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert bundle.precision == "float32"
    assert all(getattr(bundle, kind).precision == "float32" for kind in SIMULATOR)
    bundle = load_bundle(tiny_bundle, precision="bfloat16")
    assert bundle.precision == "bfloat16"
    assert all(getattr(bundle, kind).precision == "bfloat16" for kind in SIMULATOR)
    assert not hasattr(bundle.bc, "precision")  # the BC policy is an agent: never served in bf16
    assert bundle.set_precision("auto").precision in ("float32", "bfloat16")


def test_bfloat16_rollout_is_float32_exact_where_given_seeded_and_close(tiny_bundle):
    fp32 = load_bundle(tiny_bundle)
    bf16 = load_bundle(tiny_bundle, precision="bfloat16")
    s0 = starts(fp32)
    a, b, c = rollout(fp32, s0), rollout(bf16, s0), rollout(bf16, s0)
    for field in ("obs", "actions", "rewards", "next_obs"):
        assert getattr(b, field).dtype == torch.float32
        assert torch.equal(getattr(b, field), getattr(c, field))  # deterministic under a seeded generator
    assert torch.equal(b.obs[:, 0], s0)  # the given first state stays bit-exact
    assert not torch.equal(a.next_obs, b.next_obs)  # bf16 did run
    std = torch.as_tensor(fp32.normalizer("obs").std, dtype=torch.float32)
    first = ((a.next_obs[:, 0] - b.next_obs[:, 0]).abs() / std).mean()
    assert first < 0.05, f"one bf16 step moved the state by {first:.3f} dataset stds"


def test_env_precision(tiny_bundle):
    with pytest.raises(ValueError, match="precision must be one of"):
        EnvConfig(precision="half")
    bundle = load_bundle(tiny_bundle)
    assert DydiffEnv(2, bundle=bundle).config.precision == "auto"  # the default
    env = DydiffEnv(2, bundle=bundle, precision="bfloat16", plans="always", pool_size=2)
    seen = []
    original = bundle.set_precision
    bundle.set_precision = lambda p: seen.append(p) or original(p)
    obs, _ = env.reset(seed=0)  # the pool's plans: in bf16 for the call, float32 after it
    assert "bfloat16" in seen and bundle.precision == "float32" and bundle.dynamics.precision == "float32"
    obs, reward, *_ = env.step(np.zeros((2, bundle.act_dim), dtype=np.float32))
    assert obs.dtype == env.single_observation_space.dtype and np.isfinite(obs).all() and np.isfinite(reward).all()
    env.close()


def test_rollout_precision_is_for_the_call(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    s0 = starts(bundle)
    gen = torch.Generator().manual_seed(0)
    b = dydiff_rollout(bundle, s0, behaviour_policy(bundle, gen), horizon=8, generator=gen, precision="bfloat16")
    assert bundle.precision == "float32"
    assert torch.equal(b.next_obs, rollout(load_bundle(tiny_bundle, precision="bfloat16"), s0).next_obs)


def test_auto_is_float32_on_a_cpu_without_native_bf16(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert not native_bfloat16("cpu") and resolve_precision("auto", "cpu") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto", "cpu") == "bfloat16"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert resolve_precision("auto", "cpu") == "float32"  # a torch without the checks counts as no
