"""Tiny-budget runs of the TD3+BC and Diffusion-QL examples on the tiny dataset and bundle."""

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


def test_train_diffql_example(tmp_path, tiny_bundle, tiny_dataset):
    import examples.train_diffql as example

    summary, rows = _run(example, tmp_path, tiny_bundle,
                         ["--steps", "60", "--rollout-every", "30", "--eval-every", "60", "--log-every", "20"])
    assert math.isfinite(summary["last_eval"]["normalized_mean"])
    assert len(rows) >= 2 and all(math.isfinite(float(r["critic_loss"])) for r in rows)
