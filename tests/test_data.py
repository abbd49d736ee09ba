"""Offline data: Minari round trip, trajectory windows, normalisation, episode splits, exact state replay."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from dydiff_env.data import (DatasetNotFoundError, Normalizer, OfflineData, TrajectoryWindows, collect_episodes,
                             load_dataset)

from conftest import TINY_DATASET_ID, TINY_DATASET_STEPS, TINY_ENV_ID


def synthetic_data(lengths, obs_dim=3, act_dim=2) -> OfflineData:
    """Episodes whose rows encode (episode id, time step) in obs[:, 0] and obs[:, 1]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    ep = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    t = np.arange(n) - starts[ep]
    obs = np.zeros((n, obs_dim), np.float32)
    obs[:, 0], obs[:, 1] = ep, t
    obs[:, 2:] = np.random.default_rng(0).normal(size=(n, obs_dim - 2))
    nxt = obs.copy()
    nxt[:, 1] += 1
    acts = np.random.default_rng(1).uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
    terms = np.zeros(n, bool)
    terms[starts + lengths - 1] = True
    return OfflineData(obs, acts, np.ones(n, np.float32), nxt, terms, np.zeros(n, bool), starts, lengths,
                       dataset_id="synthetic/hopper/x-v0", env_id="Hopper-v5")


# --------------------------------------------------------------------------------------------- Minari round trip


def test_load_dataset_round_trip(tiny_dataset):
    d = tiny_dataset
    assert d.dataset_id == TINY_DATASET_ID and d.env_id == TINY_ENV_ID
    assert len(d) >= TINY_DATASET_STEPS
    assert (d.obs_dim, d.act_dim) == (11, 3)
    n = len(d)
    for name in ("observations", "actions", "rewards", "next_observations", "terminations", "truncations"):
        assert len(getattr(d, name)) == n, name
    assert d.observations.dtype == np.float32 and d.actions.dtype == np.float32
    assert np.isfinite(d.observations).all() and np.isfinite(d.next_observations).all()
    assert (np.abs(d.actions) <= 1).all()
    # episode boundaries
    assert d.episode_starts[0] == 0
    assert d.episode_lengths.sum() == n
    np.testing.assert_array_equal(d.episode_starts[1:], np.cumsum(d.episode_lengths)[:-1])
    ends = d.episode_starts + d.episode_lengths - 1
    done_rows = np.flatnonzero(d.dones)
    np.testing.assert_array_equal(done_rows, ends)  # exactly one done per episode, at its last step
    assert d.terminations.sum() >= len(ends) - 1  # a random Hopper falls in every episode
    assert len(d.episode_returns) == len(d.episode_starts)
    np.testing.assert_allclose(d.episode_returns.sum(), d.rewards.astype(np.float64).sum(), rtol=1e-9)
    # next_obs of a step is the obs of the next step within an episode
    within = np.setdiff1d(np.arange(n - 1), ends)
    np.testing.assert_array_equal(d.next_observations[within], d.observations[within + 1])
    # simulator state recorded for every observation, and consistent with it
    assert d.qpos is not None and d.qvel is not None
    assert d.qpos.shape == (n, 6) and d.qvel.shape == (n, 6)
    expected_obs = np.concatenate([d.qpos[:, 1:], np.clip(d.qvel, -10, 10)], 1).astype(np.float32)
    np.testing.assert_array_equal(expected_obs, d.observations)
    # deterministic content hash
    assert d.content_hash == load_dataset(TINY_DATASET_ID).content_hash


def test_missing_dataset_error_names_collect_command():
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("nonexistent/hopper/missing-v0")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "dydiff-env collect" in message
    assert "nonexistent/hopper/missing-v0" in message


def test_collect_episodes_whole_episodes_and_state():
    rng = np.random.default_rng(3)
    buffers = collect_episodes(TINY_ENV_ID, lambda o: rng.uniform(-1, 1, (o.shape[0], 3)), 50, seed=7, progress=False)
    total = sum(len(b.actions) for b in buffers)
    assert total >= 50
    for b in buffers:
        assert len(b.observations) == len(b.actions) + 1
        assert b.terminations[-1] or b.truncations[-1]
        assert not any(b.terminations[:-1]) and not any(b.truncations[:-1])
        assert b.infos["qpos"].shape == (len(b.observations), 6)


# ------------------------------------------------------------------------------------------ trajectory windows


def test_windows_shapes_and_starts():
    data = synthetic_data([5, 20, 12])
    w = TrajectoryWindows(data, horizon=8, min_valid_rows=4)
    # ep0 (rows 0-4): starts 0, 1; ep1 (rows 5-24): 5..21; ep2 (rows 25-36): 25..33
    expected = np.concatenate([np.arange(0, 2), np.arange(5, 22), np.arange(25, 34)])
    np.testing.assert_array_equal(w.starts, expected)
    x, mask = w.get(np.arange(len(w)))
    assert x.shape == (len(w), 8, 5) and x.dtype == np.float32
    assert mask.shape == (len(w), 8) and mask.dtype == bool


@pytest.mark.parametrize("horizon,min_valid", [(8, 4), (8, 8), (6, 1), (16, 3)])
def test_windows_mask_padding_and_episode_boundaries(horizon, min_valid):
    lengths = [5, 20, 12, 2, 9]
    data = synthetic_data(lengths)
    w = TrajectoryWindows(data, horizon=horizon, min_valid_rows=min_valid)
    x, mask = w.get(np.arange(len(w)))
    ep_end = np.cumsum(lengths)
    for i, start in enumerate(w.starts):
        ep = int(data.observations[start, 0])
        end = ep_end[ep]
        n_real = min(horizon, end - start)
        # mask: True exactly on real rows, False exactly past the episode end
        np.testing.assert_array_equal(mask[i], np.arange(horizon) < n_real)
        # real rows are the dataset rows, consecutive in time
        np.testing.assert_array_equal(x[i, :n_real], w.features[start:start + n_real])
        np.testing.assert_array_equal(x[i, :n_real, 1], data.observations[start, 1] + np.arange(n_real))
        # padded rows repeat the last real row
        if n_real < horizon:
            np.testing.assert_array_equal(x[i, n_real:], np.repeat(x[i, n_real - 1:n_real], horizon - n_real, 0))
        # never crosses an episode
        assert (x[i, :, 0] == ep).all()
        # min_valid_rows respected, except the single window of a too-short episode
        if mask[i].sum() < min_valid:
            assert start == data.episode_starts[ep] and lengths[ep] < min_valid
    # every episode has at least one window; each too-short episode exactly one, from its start
    window_eps = data.observations[w.starts, 0].astype(int)
    for ep, length in enumerate(lengths):
        if length < min_valid:
            np.testing.assert_array_equal(w.starts[window_eps == ep], [data.episode_starts[ep]])
        else:
            assert (window_eps == ep).sum() == length - min_valid + 1


def test_short_episode_gives_one_padded_window():
    data = synthetic_data([3, 30])
    w = TrajectoryWindows(data, horizon=8, min_valid_rows=6)
    first = w.starts[w.starts < 3]
    np.testing.assert_array_equal(first, [0])
    x, mask = w.get(np.array([0]))
    np.testing.assert_array_equal(mask[0], [True] * 3 + [False] * 5)
    np.testing.assert_array_equal(x[0, 3:], np.repeat(x[0, 2:3], 5, 0))


def test_windows_default_min_valid_and_row_subset():
    data = synthetic_data([10, 20])
    w = TrajectoryWindows(data, horizon=8)
    assert w.min_valid_rows == 8
    _, mask = w.get(np.arange(len(w)))
    assert mask.all()
    rows = np.arange(10, 30)  # only episode 1
    w1 = TrajectoryWindows(data, horizon=8, rows=rows)
    assert (data.observations[w1.starts, 0] == 1).all() and len(w1) == 13


def test_windows_argument_errors():
    data = synthetic_data([10])
    with pytest.raises(ValueError, match="horizon"):
        TrajectoryWindows(data, horizon=1)
    with pytest.raises(ValueError, match="min_valid_rows"):
        TrajectoryWindows(data, horizon=8, min_valid_rows=9)
    with pytest.raises(ValueError, match="min_valid_rows"):
        TrajectoryWindows(data, horizon=8, min_valid_rows=0)


# ------------------------------------------------------------------------------------------------ normalizer


def _normalizer():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 4)).astype(np.float32)
    x[:, 3] = 1.5  # a constant dimension
    return Normalizer.fit(x), x


def test_normalizer_numpy_round_trips():
    norm, x = _normalizer()
    u = norm.to_unit(x)
    assert u.min() >= -1 - 1e-6 and u.max() <= 1 + 1e-6
    np.testing.assert_allclose(u[:, :3].min(0), -1, atol=1e-6)
    np.testing.assert_allclose(u[:, :3].max(0), 1, atol=1e-6)
    assert np.isfinite(u[:, 3]).all()  # constant dimension does not divide by zero
    np.testing.assert_allclose(norm.from_unit(u), x, atol=1e-5)
    z = norm.zscore(x)
    np.testing.assert_allclose(z[:, :3].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z[:, :3].std(0), 1, atol=1e-3)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(norm.unzscore(z), x, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalizer_torch_round_trips(dtype):
    norm, x = _normalizer()
    t = torch.as_tensor(x, dtype=dtype)
    u = norm.to_unit(t)
    assert isinstance(u, torch.Tensor) and u.dtype == dtype
    np.testing.assert_allclose(u.numpy(), norm.to_unit(x), atol=1e-5)
    torch.testing.assert_close(norm.from_unit(u), t, atol=1e-5, rtol=0)
    z = norm.zscore(t)
    assert z.dtype == dtype
    torch.testing.assert_close(norm.unzscore(z), t, atol=1e-5, rtol=0)


def test_from_unit_does_not_clip():
    norm, _ = _normalizer()
    u = np.array([[2.0, -3.0, 1.5, 0.0]], np.float32)
    x = norm.from_unit(u)
    assert x[0, 0] > norm.high[0] and x[0, 1] < norm.low[1] and x[0, 2] > norm.high[2]
    np.testing.assert_allclose(norm.to_unit(x), u, atol=1e-5)
    xt = norm.from_unit(torch.as_tensor(u))
    np.testing.assert_allclose(xt.numpy(), x, atol=1e-6)


def test_normalizer_dict_round_trip():
    norm, _ = _normalizer()
    back = Normalizer.from_dict(norm.to_dict("obs"), "obs")
    for k in ("mean", "std", "low", "high"):
        np.testing.assert_array_equal(getattr(back, k), getattr(norm, k))


# ---------------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_split_episodes_keeps_whole_episodes(tiny_dataset, fraction):
    d = tiny_dataset
    train, hold = d.split_episodes(fraction, seed=4)
    assert len(np.intersect1d(train, hold)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, hold])), np.arange(len(d)))
    episode_of_row = np.repeat(np.arange(len(d.episode_starts)), d.episode_lengths)
    assert len(np.intersect1d(episode_of_row[train], episode_of_row[hold])) == 0
    hold_eps = np.unique(episode_of_row[hold])
    assert len(hold_eps) == int(round(fraction * len(d.episode_starts)))
    if fraction:
        assert d.episode_lengths[hold_eps].sum() == len(hold)
    again = d.split_episodes(fraction, seed=4)
    np.testing.assert_array_equal(again[1], hold)


def test_split_episodes_keeps_one_of_each_with_two_episodes():
    data = synthetic_data([4, 6])
    train, hold = data.split_episodes(0.01)
    assert len(train) and len(hold)
    train, hold = data.split_episodes(0.99)
    assert len(train) and len(hold)


# -------------------------------------------------------------------------------------------- exact replay


def test_replay_recorded_state_reproduces_next_observation(tiny_dataset):
    d = tiny_dataset
    env = gym.make(TINY_ENV_ID)
    env.reset(seed=123)
    ends = d.episode_starts + d.episode_lengths - 1
    rows = np.unique(np.concatenate([np.random.default_rng(0).choice(len(d), 40, replace=False), ends[:10],
                                     d.episode_starts[:5]]))
    for i in rows:
        env.unwrapped.set_state(d.qpos[i], d.qvel[i])
        obs, reward, terminated, _, _ = env.step(d.actions[i])
        np.testing.assert_allclose(obs.astype(np.float32), d.next_observations[i], atol=1e-6, rtol=0,
                                   err_msg=f"row {i}")
        assert reward == pytest.approx(float(d.rewards[i]), abs=1e-5)
        assert terminated == bool(d.terminations[i])
    env.close()
