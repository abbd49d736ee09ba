"""Tiny-budget runs of the TD3+BC and Diffusion-QL examples on the tiny dataset and bundle; every example refuses a
run directory that holds results; the learning curve's reference lines."""

import csv
import json
import math

import pytest

from conftest import TINY_DATASET_ID


def _run(module, tmp_path, tiny_bundle, extra):
    out = tmp_path / "run"
    args = ["--dataset", TINY_DATASET_ID, "--bundle", str(tiny_bundle), "--out", str(out), "--eval-episodes", "1",
            "--eval-max-steps", "50", "--rollout-starts", "8", "--log-every", "20", *extra]
    module.main(args)
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("critic_loss")]
    return summary, rows


@pytest.mark.parametrize("dydiff", [True, False])
def test_train_td3bc_example(tmp_path, tiny_bundle, tiny_dataset, dydiff):
    import examples.train_td3bc as example

    extra = ["--steps", "200", "--rollout-every", "100", "--eval-every", "100"] + ([] if dydiff else ["--no-dydiff"])
    summary, rows = _run(example, tmp_path, tiny_bundle, extra)
    losses = [float(r["critic_loss"]) for r in rows]
    assert losses[-1] < losses[0], "training reduces the critic loss"
    assert math.isfinite(summary["last_eval"]["normalized_mean"])
    assert summary["uses_model_rollouts"] is dydiff
    assert (tmp_path / "run" / "learning_curve.png").is_file()


def test_trainer_rollouts_keep_three_quarters_of_the_window(tmp_path, tiny_bundle, tiny_dataset, monkeypatch):
    """The env's plans take the whole window; the trainer's rollouts keep dydiff_rollout's horizon (the paper's
    rule, which the main job uses, is least accurate in the window's last rows)."""
    import dydiff_env.env as env_module
    import examples.train_td3bc as example
    from dydiff_env import load_bundle
    from dydiff_env.rollout import default_horizon

    horizons = []

    class Recording(env_module.DydiffEnv):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            horizons.append(self.horizon)

    monkeypatch.setattr(env_module, "DydiffEnv", Recording)
    _run(example, tmp_path, tiny_bundle, ["--steps", "20", "--rollout-every", "10", "--eval-every", "20"])
    window = load_bundle(tiny_bundle).diffusion.horizon
    assert horizons == [default_horizon(window)] and default_horizon(window) < env_module.default_plan_horizon(window)


def test_train_diffql_example(tmp_path, tiny_bundle, tiny_dataset):
    import examples.train_diffql as example

    summary, rows = _run(example, tmp_path, tiny_bundle,
                         ["--steps", "60", "--rollout-every", "30", "--eval-every", "60", "--log-every", "20"])
    assert math.isfinite(summary["last_eval"]["normalized_mean"])
    assert len(rows) >= 2 and all(math.isfinite(float(r["critic_loss"])) for r in rows)


# ------------------------------------------------------------------------------------ existing run directories

MISSING_DATASET = "missing/hopper/none-v0"  # an example that got past the check would fail on this instead


def _examples():
    import examples.sb3_sac as sb3_sac
    import examples.tianshou_td3bc as tianshou_td3bc
    import examples.train_diffql as train_diffql
    import examples.train_td3bc as train_td3bc

    # (module, whether it can resume)
    return {"train_td3bc": (train_td3bc, True), "train_diffql": (train_diffql, True), "sb3_sac": (sb3_sac, False),
            "tianshou_td3bc": (tianshou_td3bc, False)}


@pytest.mark.parametrize("name", ["train_td3bc", "train_diffql", "sb3_sac", "tianshou_td3bc"])
def test_examples_refuse_a_run_directory_with_results(name, tmp_path):
    module, can_resume = _examples()[name]
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--dataset", MISSING_DATASET, "--out", str(out)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and str(out) in message and "--overwrite" in message
    assert ("--resume" in message) is can_resume
    assert (out / "summary.json").read_text() == "{}"
    # the flags let the run go on (to the missing dataset here); an empty or new directory needs none
    for argv in (["--overwrite"], ["--resume"] if can_resume else None):
        if argv is not None:
            with pytest.raises(Exception, match="missing/hopper/none-v0"):
                module.main(["--dataset", MISSING_DATASET, "--out", str(out), *argv])
    with pytest.raises(Exception, match="missing/hopper/none-v0"):
        module.main(["--dataset", MISSING_DATASET, "--out", str(tmp_path / "new")])


def test_overwrite_and_resume_together_are_refused(tmp_path):
    import examples.train_td3bc as example

    with pytest.raises(SystemExit, match="pass one of them"):
        example.main(["--dataset", MISSING_DATASET, "--out", str(tmp_path), "--overwrite", "--resume"])


# ------------------------------------------------------------------------------------------- learning curve


def _evaluation(step, score, episodes=3):
    return {"step": step, "normalized_mean": score, "normalized_std": 1.5, "return_mean": 30.0 * score,
            "return_std": 40.0, "episodes": episodes, "env_id": "Hopper-v5"}


def test_learning_curve_shows_band_dataset_score_and_baseline(tiny_dataset, tmp_path):
    from agents.trainer import dataset_score, load_baseline_evaluations, plot_learning_curve

    baseline_dir = tmp_path / "nodydiff"
    baseline_dir.mkdir()
    summary = {"agent": "TD3BC", "dataset_hash": tiny_dataset.content_hash, "uses_model_rollouts": False,
               "evaluations": [_evaluation(100, 2.0), _evaluation(200, 3.0)]}
    (baseline_dir / "summary.json").write_text(json.dumps(summary))
    baseline = load_baseline_evaluations(str(baseline_dir), tiny_dataset.content_hash, "TD3BC")
    assert [e["step"] for e in baseline] == [100, 200]
    # another dataset, another agent, a DyDiff run or no run: no baseline
    assert load_baseline_evaluations(str(baseline_dir), "other-hash", "TD3BC") is None
    assert load_baseline_evaluations(str(baseline_dir), tiny_dataset.content_hash, "DiffusionQL") is None
    assert load_baseline_evaluations(str(tmp_path / "missing"), tiny_dataset.content_hash, "TD3BC") is None
    (baseline_dir / "summary.json").write_text(json.dumps({**summary, "uses_model_rollouts": True}))
    assert load_baseline_evaluations(str(baseline_dir), tiny_dataset.content_hash, "TD3BC") is None

    dataset = dataset_score(tiny_dataset, "Hopper-v5")
    assert math.isfinite(dataset["normalized"]) and dataset["return"] == pytest.approx(tiny_dataset.episode_returns.mean())
    path = tmp_path / "curve.png"
    rows = [{"step": s, "critic_loss": 1.0 + s} for s in (20, 40)]
    legend = plot_learning_curve(str(path), [_evaluation(100, 4.0), _evaluation(200, 5.0)], 3, rows, "Hopper-v5",
                                 dataset, baseline, "TD3BC: real + model data")
    assert path.stat().st_size > 1000
    assert "± 1 std over its 3 episodes" in legend and "no DyDiff (real data only)" in legend
    assert f"dataset episodes (mean {dataset['normalized']:.1f})" in legend
    legend = plot_learning_curve(str(path), [_evaluation(100, 4.0)], 3, rows, "Hopper-v5", dataset, None, "t")
    assert "no DyDiff (real data only)" not in legend
