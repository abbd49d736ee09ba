"""Behaviour-policy training (`train_sac`) and the pickle-free actor copy (`GaussianActor.from_sb3`)."""

from __future__ import annotations

import csv

import numpy as np
import torch

from dydiff_env.behaviour import GaussianActor, SACTrainConfig, train_sac


def _sac(seed: int = 0):
    import gymnasium as gym
    from stable_baselines3 import SAC

    return SAC("MlpPolicy", gym.make("Hopper-v5"), seed=seed, device="cpu", policy_kwargs={"net_arch": [16, 16]})


def test_from_sb3_copies_the_actor_without_touching_the_global_rng():
    model = _sac()
    obs = np.random.default_rng(0).standard_normal((5, 11)).astype(np.float32)
    state = torch.random.get_rng_state()
    actor = GaussianActor.from_sb3(model.actor)
    assert torch.equal(torch.random.get_rng_state(), state), "copying an actor must not draw from SB3's RNG"
    expected, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(actor.act(obs, deterministic=True), expected, atol=1e-6)
    assert actor.hidden == (16, 16)


def test_snapshot_cadence_does_not_change_training(tmp_path):
    tiny = dict(total_steps=240, learning_starts=80, eval_episodes=1, seed=3)
    often = train_sac(tmp_path / "often", SACTrainConfig(snapshot_every=60, **tiny))
    rarely = train_sac(tmp_path / "rarely", SACTrainConfig(snapshot_every=120, **tiny))
    assert [r["step"] for r in often] == [60, 120, 180, 240] and [r["step"] for r in rarely] == [120, 240]
    for step in (120, 240):
        a = GaussianActor.load(tmp_path / "often" / f"step_{step}.safetensors").state_dict()
        b = GaussianActor.load(tmp_path / "rarely" / f"step_{step}.safetensors").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"snapshot at step {step} depends on the snapshot cadence"
    with open(tmp_path / "often" / "snapshots.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [60, 120, 180, 240]
    assert all(np.isfinite(float(r["return_mean"])) for r in rows)
