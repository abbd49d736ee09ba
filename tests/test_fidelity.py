"""benchmarks/fidelity.py: metric arithmetic on synthetic data, simulator replay of the tiny dataset, the
fixed-action rollout against `dydiff_rollout`, and a --quick smoke run on the tiny bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a folder of the repo, not installed

from benchmarks import fidelity  # noqa: E402
from benchmarks.fidelity_metrics import (alive_mask, crossover_horizon, mean_ci, normalized_state_error,  # noqa: E402
                                         return_error, state_error_curve, terminated_by, termination_agreement,
                                         trajectory_length)

from conftest import TINY_DATASET_ID  # noqa: E402

# ---------------------------------------------------------------------------------------------- metrics


def _states(n=20, h=8, d=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, h + 1, d))


def test_exact_model_has_zero_error():
    true = _states()
    term = np.zeros((20, 8), bool)
    curve = state_error_curve(true.copy(), true, term, np.ones(5))
    assert np.all(curve["mean"] == 0) and np.all(curve["low"] == 0) and np.all(curve["high"] == 0)
    assert np.all(curve["n"] == 20) and np.all(curve["missing"] == 0)


def test_constant_offset_gives_known_error():
    true = _states()
    std = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    curve = state_error_curve(true + 0.3 * std, true, np.zeros((20, 8), bool), std)
    np.testing.assert_allclose(curve["mean"], 0.3)
    np.testing.assert_allclose(curve["high"] - curve["low"], 0.0, atol=1e-12)
    # an offset of 2 std on one of 5 dimensions is 2 / 5 on average over dimensions, whatever the sign
    shifted = true.copy()
    shifted[..., 3] -= 2 * std[3]
    np.testing.assert_allclose(normalized_state_error(shifted, true, std), 0.4)


def test_ci_shrinks_with_more_samples_and_covers_the_mean():
    rng = np.random.default_rng(1)
    small, large = mean_ci(rng.normal(1.0, 1.0, size=(10, 1))), mean_ci(rng.normal(1.0, 1.0, size=(1000, 1)))
    assert (large["high"] - large["low"])[0] < (small["high"] - small["low"])[0] / 5
    assert large["low"][0] < 1.0 < large["high"][0]
    np.testing.assert_allclose(large["high"] - large["mean"], 1.96 * large["sem"])


def test_mean_ci_masks_and_degenerate_counts():
    values = np.array([[1.0, 5.0, np.nan], [3.0, 7.0, 2.0]])
    mask = np.array([[True, False, True], [True, True, True]])
    ci = mean_ci(values, mask)
    np.testing.assert_allclose(ci["mean"], [2.0, 7.0, 2.0])
    np.testing.assert_array_equal(ci["n"], [2, 1, 1])  # NaN values are left out like masked ones
    assert np.isnan(ci["sem"][1]) and np.isnan(ci["low"][2])  # one sample: no interval
    assert np.isnan(mean_ci(values, np.zeros_like(mask))["mean"]).all()


def test_only_alive_true_trajectories_are_compared():
    true = _states(n=3, h=5, d=2)
    term = np.zeros((3, 5), bool)
    term[0, 2] = True  # third transition is terminal: states s_1..s_3 exist
    term[1, 0] = True
    np.testing.assert_array_equal(trajectory_length(term), [3, 1, 5])
    np.testing.assert_array_equal(alive_mask(term).sum(0), [3, 2, 2, 1, 1])
    pred = true + 1.0
    pred[0, 4:] = 1e6  # after the true termination: never scored
    pred[2, 5] = np.nan  # a missing model state is left out and counted
    curve = state_error_curve(pred, true, term, np.ones(2))
    np.testing.assert_array_equal(curve["n"], [3, 2, 2, 1, 0])
    np.testing.assert_array_equal(curve["missing"], [0, 0, 0, 0, 1])
    np.testing.assert_allclose(curve["mean"][:4], 1.0)


def test_return_error_arithmetic():
    r = return_error(np.array([10.0, 20.0, 30.0]), np.array([12.0, 18.0, 30.0]))
    assert r["abs_mean"] == pytest.approx(4 / 3)
    assert r["bias"] == pytest.approx(0.0)
    assert r["relative"] == pytest.approx((4 / 3) / 20.0)
    assert r["n"] == 3 and r["abs_low"] < r["abs_mean"] < r["abs_high"]
    r = return_error(np.array([15.0, np.nan]), np.array([10.0, 10.0]))
    assert (r["abs_mean"], r["bias"], r["relative"], r["n"]) == (5.0, 5.0, 0.5, 1)


def test_termination_agreement():
    pred = np.zeros((3, 5), bool)
    true = np.zeros((3, 5), bool)
    pred[0, 1], true[0, 3] = True, True  # predicted too early
    true[1, 2] = True  # missed
    pred[0, 4] = True  # later flags after the first do not matter
    np.testing.assert_array_equal(terminated_by(pred)[0], [False, True, True, True, True])
    t = termination_agreement(pred, true)
    np.testing.assert_allclose(t["agreement"], [1.0, 2 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(t["missed"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(t["false"], [0, 1, 1, 0, 0])
    np.testing.assert_allclose(t["true_rate"], [0, 0, 1 / 3, 2 / 3, 2 / 3])


def test_crossover_horizon():
    base = {"mean": np.array([0.1, 0.2, 0.4, 0.8, 1.6]), "low": np.array([0.05, 0.15, 0.35, 0.7, 1.5]),
            "high": np.array([0.15, 0.25, 0.45, 0.9, 1.7])}
    cand = {"mean": np.array([0.3, 0.1, 0.5, 0.6, 0.6]), "low": np.array([0.2, 0.05, 0.4, 0.5, 0.5]),
            "high": np.array([0.4, 0.15, 0.6, 0.75, 0.7])}
    assert crossover_horizon(cand, base) == {"first_below": 2, "below_from": 4, "significant_from": 5}
    assert crossover_horizon(base, base) == {"first_below": None, "below_from": None, "significant_from": None}


# --------------------------------------------------------------------------------------- simulator replay


def test_simulator_replay_reproduces_the_tiny_dataset(tiny_dataset):
    import gymnasium as gym

    data = tiny_dataset
    assert data.qpos is not None
    env = gym.make("Hopper-v5")
    env.reset(seed=0)
    rows = np.random.default_rng(0).choice(len(data), size=40, replace=False)
    for r in rows:
        env.unwrapped.set_state(data.qpos[r], data.qvel[r])
        np.testing.assert_allclose(env.unwrapped._get_obs(), data.observations[r], atol=1e-5)
        obs, reward, terminated, _, _ = env.step(data.actions[r])
        np.testing.assert_allclose(obs, data.next_observations[r], atol=1e-5)
        assert reward == pytest.approx(float(data.rewards[r]), abs=1e-4)
        assert terminated == bool(data.terminations[r])
    env.close()

    # multi-step: `simulate` with the recorded actions follows the dataset for H steps
    rows, _ = fidelity.select_starts(data, 5, 6, seed=0)
    actions, available = fidelity.recorded_actions(data, rows, 6)
    assert available.all()
    truth = fidelity.simulate("Hopper-v5", data.qpos[rows], data.qvel[rows], lambda t, obs, ids: actions[ids, t], 6)
    index = rows[:, None] + np.arange(6)
    alive = alive_mask(truth.terminated)
    np.testing.assert_allclose(truth.states[:, 1:][alive], data.next_observations[index][alive], atol=1e-5)
    np.testing.assert_array_equal(truth.terminated, data.terminations[index] & alive)
    np.testing.assert_array_equal(truth.actions[alive], actions[alive])  # the actions taken are recorded


def test_reward_model_return_error_sums_the_reward_model_over_the_true_steps():
    # 3 trajectories of 4 steps; the second ends after 2 steps (NaN states and actions after it)
    rng = np.random.default_rng(0)
    states, actions = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 4, 1))
    states[1, 3:], actions[1, 2:] = np.nan, np.nan
    exact = np.nan_to_num(states[:, :-1].sum(-1) + actions[..., 0])
    terminated = np.zeros((3, 4), bool)
    terminated[1, 1] = True
    truth = fidelity.Trajectories(states, exact, terminated, exact.sum(1), 0.0, actions=actions)

    class Bundle:
        offset = 0.0

        def reward(self, obs, act):
            return obs.sum(-1) + act[..., 0] + self.offset

    bundle = Bundle()
    assert fidelity.reward_model_return_error(bundle, truth)["abs_mean"] == pytest.approx(0.0, abs=1e-5)
    bundle.offset = 0.5  # each true step is off by 0.5: 4 steps, 2 steps, 4 steps
    assert fidelity.reward_model_return_error(bundle, truth)["abs_mean"] == pytest.approx((2 + 1 + 2) / 3, abs=1e-5)


def test_select_starts_leaves_h_steps_in_the_episode(tiny_dataset):
    rows, eligible = fidelity.select_starts(tiny_dataset, 50, 10, seed=3)
    ends = fidelity.episode_end_of_rows(tiny_dataset)
    assert len(rows) == 50 and len(set(rows.tolist())) == 50 and np.all(rows + 10 <= ends[rows])
    assert eligible == int(np.sum(np.arange(len(tiny_dataset)) + 10 <= ends))
    np.testing.assert_array_equal(rows, fidelity.select_starts(tiny_dataset, 50, 10, seed=3)[0])


# ------------------------------------------------------------------------------------------- model methods


def test_teacher_forced_rollout_uses_the_recorded_actions(tiny_bundle, tiny_dataset):
    # chunk_size=2 < 4 starts: time-indexed policies get global trajectory indices across chunks
    from dydiff_env import FilterConfig, dydiff_rollout, load_bundle
    from dydiff_env.config import SamplerConfig

    bundle = load_bundle(tiny_bundle)
    window = bundle.diffusion.horizon
    rows, _ = fidelity.select_starts(tiny_dataset, 4, 5, seed=1)
    rec, available = fidelity.recorded_actions(tiny_dataset, rows, window)
    calls = []

    def fallback(obs):
        calls.append(len(obs))
        return torch.zeros(len(obs), 3)

    fn = fidelity.RecordedActions(rec, available, fallback)
    result = dydiff_rollout(bundle, tiny_dataset.observations[rows], fn, 5, 1, SamplerConfig(num_steps=2),
                            FilterConfig("none"), torch.Generator().manual_seed(0), chunk_size=2)
    np.testing.assert_array_equal(result.actions.numpy(), np.clip(rec[:, :5], -1, 1))
    assert (not available.all()) == bool(calls)  # rows past an episode end come from the fallback


def test_env_reset_to_starts_at_the_given_states(tiny_bundle, tiny_dataset):
    from dydiff_env import DydiffEnv

    start = tiny_dataset.observations[[0, 5, 9]]
    env = DydiffEnv(num_envs=3, bundle=tiny_bundle, horizon=4, num_iterations=1, sampler={"num_steps": 2},
                    filter="none", max_episode_steps=None)
    obs, info = env.reset_to(start, seed=0)
    np.testing.assert_array_equal(obs.astype(np.float32), start)
    assert info["plan_return"].shape == (3,)
    obs, reward, *_ = env.step(np.zeros((3, 3), np.float32))
    assert obs.shape == (3, 11) and np.isfinite(obs).all() and np.isfinite(reward).all()
    with pytest.raises(ValueError, match="shape"):
        env.reset_to(start[:2])


def test_td3bc_policy_is_trained_then_cached(tiny_bundle, tiny_dataset, tmp_path):
    from dydiff_env import load_bundle

    bundle = load_bundle(tiny_bundle)
    policy, info = fidelity.build_policy("td3bc", bundle, tiny_dataset, 4, 0, tmp_path)
    again, info2 = fidelity.build_policy("td3bc", bundle, tiny_dataset, 4, 0, tmp_path)
    obs = torch.as_tensor(tiny_dataset.observations[:8])
    assert not info["cached"] and info2["cached"]
    torch.testing.assert_close(policy(obs), again(obs))
    with pytest.raises(ValueError, match="unknown --policy"):
        fidelity.build_policy("nonsense", bundle, tiny_dataset, 4, 0, tmp_path)

    # the seed alone fixes the trained policy, whatever the global RNG held before (a fresh process starts
    # torch's global RNG from a random seed; the initial weights once came from it)
    torch.manual_seed(12345)
    retrained, info3 = fidelity.build_policy("td3bc", bundle, tiny_dataset, 4, 0, tmp_path / "fresh")
    assert not info3["cached"]
    torch.testing.assert_close(retrained(obs), policy(obs), rtol=0, atol=0)

    from dydiff_env.behaviour import GaussianActor

    actor = GaussianActor(11, 3, (16,))
    actor.save(tmp_path / "actor.safetensors")
    snap, info = fidelity.build_policy(f"snapshot:{tmp_path / 'actor.safetensors'}", bundle, None, 0, 0, tmp_path)
    torch.testing.assert_close(snap(obs), actor(obs, deterministic=True))  # the mean action, every time
    assert info["kind"] == "snapshot"


# ---------------------------------------------------------------------------------------------- smoke run


def test_quick_run_writes_json_and_png(tiny_bundle, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "fidelity"
    rc = fidelity.main(["--bundle", str(tiny_bundle), "--dataset", TINY_DATASET_ID, "--policy", "bc", "-n", "6",
                        "--horizon", "6", "--sampler-steps", "2", "--threads", "1", "--quick", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "fidelity.json").read_text())
    assert (out / "fidelity.png").stat().st_size > 1000 and "| method |" in (out / "fidelity.md").read_text()
    assert set(results["regimes"]) == set(fidelity.REGIMES)
    assert results["config"]["horizon"] == 6 and results["config"]["num_starts"] == 6
    assert results["config"]["sampler_steps"] == 2
    assert results["checks"]["replay_max_abs_diff"] < 1e-4 and results["checks"]["start_obs_max_abs_diff"] < 1e-4
    for name, regime in results["regimes"].items():
        shared_prior = name in ("teacher-forced", "policy-driven")
        assert set(regime["methods"]) == set(fidelity.METHODS) - (set() if shared_prior else {"behaviour-prior"})
        assert set(regime["crossover"]) == {"dydiff-M1", "dydiff-M2", "dydiff-M3", "dydiff-M2-u-g4"}
        for m in regime["methods"].values():
            assert len(m["state_error"]["mean"]) == 6 and m["seconds"] >= 0
            assert m["state_error"]["mean"][0] is not None and m["state_error"]["mean"][0] >= 0
            assert 0 <= m["termination"]["agreement"][-1] <= 1
    # the env leaves its plans for noisy and random agents (model steps); an agent acting as the handle is served
    # plans; the simulator replays one set of exploration actions for every model
    envs = {r: results["regimes"][r]["methods"]["env"] for r in fidelity.REGIMES}
    assert envs["policy-driven"]["plan_share"] > 0.9
    assert envs["noisy-policy"]["plan_share"] == envs["random-actions"]["plan_share"] == 0
    # the behaviour prior is one computation shared by both regimes
    tf, pd = (results["regimes"][r]["methods"]["behaviour-prior"] for r in ("teacher-forced", "policy-driven"))
    assert tf["return_error"]["pred_mean"] == pd["return_error"]["pred_mean"]
    printed = capsys.readouterr().out
    assert "| method |" in printed and "Headline (teacher-forced)" in printed


def test_env_and_ensemble_run_past_the_window_with_the_plan_length_asked(tiny_bundle, tiny_dataset, tmp_path):
    """The env re-plans at its plans' ends, so --horizon may exceed the diffusion window (16 rows here) when the
    methods are ensemble and env; other diffusion methods are refused there. --env-horizon is its plan length."""
    args = ["--bundle", str(tiny_bundle), "--dataset", TINY_DATASET_ID, "--policy", "bc", "-n", "4", "--horizon", "20",
            "--sampler-steps", "2", "--threads", "1", "--quick", "--out", str(tmp_path)]
    assert fidelity.main(args + ["--methods", "ensemble,env", "--env-horizon", "5"]) == 0
    results = json.loads((tmp_path / "fidelity.json").read_text())
    assert results["config"]["env_horizon"] == 5 and results["config"]["horizon"] == 20
    env = results["regimes"]["policy-driven"]["methods"]["env"]
    assert len(env["state_error"]["mean"]) == 20 and env["plan_share"] > 0.9  # served plans across re-plans
    assert "env plans of 5 steps" in (tmp_path / "fidelity.md").read_text()
    with pytest.raises(ValueError, match="only ensemble and env run longer"):
        fidelity.main(args + ["--methods", "ensemble,dydiff-M2"])


def test_sampler_benchmark_quick_run(tiny_bundle, tiny_dataset, tmp_path):
    from benchmarks import samplers

    out = tmp_path / "samplers"
    results = samplers.main(["--bundle", str(tiny_bundle), "--dataset", TINY_DATASET_ID, "--policy", "bc", "-n", "4",
                             "--horizon", "5", "--grid", "heun:2:0,dpmpp_2m:2,euler:2@bfloat16", "--batch", "4",
                             "--rules", "paper", "--quick", "--out", str(out)])
    assert [(r["label"], r["iterations"]) for r in results["rows"]] == [
        ("single-step ensemble", 0), ("heun 2 deterministic", 1), ("heun 2 deterministic", 2), ("dpmpp_2m 2", 1),
        ("dpmpp_2m 2", 2), ("euler 2, bfloat16", 1), ("euler 2, bfloat16", 2)]
    assert [r["calls"] for r in results["rows"]] == [0, 3, 3, 2, 2, 2, 2]
    for row in results["rows"]:
        assert row["generated_per_s"] > 0
        for regime in ("teacher-forced", "policy-driven"):
            errors = list(row["fidelity"][regime]["state_error"].values())
            assert len(errors) >= 3 and all(e is not None and e >= 0 for e in errors)
    assert results["meta"]["real_per_s"] > 0
    assert (out / "samplers.png").stat().st_size > 1000 and "| sampler |" in (out / "samplers.md").read_text()


def test_sampler_benchmark_rules_and_second_thread_count(tiny_bundle, tiny_dataset, tmp_path):
    from benchmarks import fidelity, samplers
    from dydiff_env import RefineConfig

    assert fidelity.parse_method(samplers.RULES["default"].format(m=2)) == (2, RefineConfig())
    assert fidelity.parse_method("dydiff-M2-u-g4-k4") == (2, RefineConfig(num_samples=4))
    paper_rule_of_8 = RefineConfig(blend="average", max_probe_ratio=None, num_samples=8)
    assert fidelity.parse_method("dydiff-M1-k8") == (1, paper_rule_of_8)
    results = samplers.main(["--bundle", str(tiny_bundle), "--dataset", TINY_DATASET_ID, "--policy", "bc", "-n", "4",
                             "--horizon", "5", "--grid", "euler:2", "--batch", "4", "--also-threads", "2", "--quick",
                             "--out", str(tmp_path / "samplers")])
    assert [(r["iterations"], r["rule"]) for r in results["rows"]] == [
        (0, "-"), (1, "paper"), (2, "paper"), (1, "default"), (2, "default")]
    assert all(r["generated_per_s_also"] > 0 for r in results["rows"])
    assert "(2 threads)" in (tmp_path / "samplers" / "samplers.md").read_text()


def test_video_shows_mujoco_above_the_env(tiny_bundle, tiny_dataset, tmp_path, gl_renderer):
    from PIL import Image

    from benchmarks import fidelity_video

    out = tmp_path / "video"
    args = fidelity.build_parser().parse_args(
        ["--bundle", str(tiny_bundle), "--dataset", TINY_DATASET_ID, "--policy", "bc", "-n", "4", "--horizon", "6",
         "--sampler-steps", "2", "--threads", "1", "--quick", "--video", "--methods", "ensemble,env", "--out", str(out)])
    results = fidelity.run(args, log=lambda *_: None)
    assert results["video"] == "rollouts.gif"
    gif = Image.open(out / "rollouts.gif")
    size = fidelity_video.PANEL
    assert gif.size == (3 * size, 2 * size) and gif.n_frames == 7  # 3 starts; the start state and 6 steps
    assert (out / "rollouts.gif").stat().st_size < 2_000_000
    assert json.loads((out / "fidelity.json").read_text())["video"] == "rollouts.gif"
    # the parser's default: a video for full runs, none for --quick
    assert fidelity.build_parser().parse_args(["--quick"]).video is None


def test_video_grid_puts_starts_side_by_side_and_rows_on_top_of_each_other():
    from benchmarks import fidelity_video

    truth = np.zeros((2, 3, 40, 50, 3), np.uint8)  # 2 starts, 3 steps
    model = np.full((2, 3, 40, 50, 3), 200, np.uint8)
    truth[1] = 100
    frames = fidelity_video.grid_frames([truth, model])
    assert frames.shape == (3, 80, 100, 3) and frames.dtype == np.uint8
    # away from the labels: start n in column n, MuJoCo on top, DydiffEnv below
    assert (frames[:, 30:40, 10:50] == 0).all() and (frames[:, 30:40, 60:100] == 100).all()
    assert (frames[:, 70:80] == 200).all()
    assert not (frames[:, :12, :40] == 0).all()  # the label box with its text


def test_calibration_benchmark_on_the_tiny_bundle(tiny_bundle, tiny_dataset, tmp_path, capsys):
    from benchmarks import fidelity_calibration

    # opposite errors cancel at w = 0.5; an exact model takes all the weight
    assert fidelity_calibration.best_fixed_blend(torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, -2.0]])) == (0.0, 0.5)
    assert fidelity_calibration.best_fixed_blend(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)) == (0.0, 1.0)
    out = tmp_path / "calibration.json"
    assert fidelity_calibration.main(["--bundle", str(tiny_bundle), "--dataset", TINY_DATASET_ID, "--policy", "bc",
                                      "-n", "4", "--samples", "2", "--out", str(tmp_path), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for regime in fidelity.REGIMES:
        rows = results[regime]["horizons"]
        assert rows and all(row["ensemble_mse"] >= 0 and row["diffusion_mean_of_2_mse"] >= 0
                            and -1 <= row["error_correlation"] <= 1 for row in rows.values())
        # weights 0 and 1 are among the blends tried: the best is never worse than either model alone
        assert all(row["best_fixed_blend_mse"] <= min(row["ensemble_mse"], row["diffusion_mean_of_2_mse"]) + 1e-6
                   for row in rows.values())
    # teacher-forced, the simulator took the recorded actions: the ensemble's open-loop rollout is the same one
    for row in results["teacher-forced"]["horizons"].values():
        assert row["ensemble_given_simulator_actions_mse"] == pytest.approx(row["ensemble_mse"], rel=1e-5, abs=1e-9)
    assert "mean of 2" in capsys.readouterr().out
