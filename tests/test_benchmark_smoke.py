"""Smoke test of benchmarks/throughput.py: its quick mode runs end to end on the tiny bundle (a few seconds),
prints the markdown table and writes a complete JSON. The numbers themselves are not checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("dydiff_benchmark_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_runs_a_subset_of_agents_with_another_plan_length(tiny_bundle, tmp_path):
    bench = _load_script()
    out = tmp_path / "throughput.json"
    results = bench.main(["--bundle", str(tiny_bundle), "--quick", "--steps", "2", "--batch", "4", "--num-envs", "2",
                          "--agents", "handle", "--env-horizon", "5", "--out", str(out)])
    assert [(r["num_envs"], r["agent"]) for r in results["env"]] == [(2, "handle")]
    assert results["meta"]["env_horizon"] == 5 and results["env"][0]["plan_share"] > 0.5


def test_throughput_quick(tiny_bundle, tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "results" / "throughput.json"
    results = bench.main(["--bundle", str(tiny_bundle), "--quick", "--steps", "2", "--batch", "4",
                          "--num-envs", "1", "2", "--env-sampler-steps", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| rollout |" in printed and "| num_envs |" in printed and str(out) in printed
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert saved["meta"]["quick"] is True and saved["meta"]["threads"] == 1
    assert [r["num_iterations"] for r in saved["rollout"]] == [2, 2, 0]
    assert saved["rollout"][1]["sampler_steps"] == 34  # the reference sampler, next to the bundle's 6-step one
    agents = ["handle", "noisy_0.1", "sac", "random"]
    assert [(r["num_envs"], r["agent"]) for r in saved["env"]] == [(n, a) for n in (1, 2) for a in agents]
    assert saved["meta"]["env_sampler_steps"] == 3 and {r["sampler_steps"] for r in saved["env"]} == {3}
    assert {r["model_step_precision"] for r in saved["env"]} == {"float32"}  # the rollout rows' precision is undone
    assert "[throughput] env: num_envs 2 random" in printed
    by_agent = {(r["num_envs"], r["agent"]): r for r in saved["env"]}
    assert by_agent[(2, "handle")]["plan_share"] > 0.5 and by_agent[(2, "random")]["plan_share"] == 0
    assert by_agent[(2, "random")]["stats"]["rollout_calls"] == 0
    assert [r["num_envs"] for r in saved["real"]] == [1, 2]
    for row in saved["rollout"] + saved["env"] + saved["real"]:
        for key in ("peak_mib", "maxrss_delta_mib"):
            assert row[key] >= 0
    for row in saved["env"] + saved["real"]:
        assert row["total_per_s"] > 0 and row["transitions"] == row["num_envs"] * row["steps"]
    assert results["meta"]["env_id"] == "Hopper-v5"


def test_throughput_defaults():
    bench = _load_script()
    args = bench.parse_args([])
    assert (args.steps, args.batch, args.num_envs, args.threads) == (1000, 256, [1, 64, 256], 1)
    assert args.plan_steps is None  # 5 plan lengths of the bundle
    assert args.out == bench.DEFAULT_OUT and args.out.name == "throughput.json"
    quick = bench.parse_args(["--quick"])
    assert (quick.steps, quick.batch, quick.num_envs) == (5, 8, [1, 4])


def test_constant_factors_runs_every_variant(tiny_bundle, tmp_path):
    from benchmarks import constant_factors

    out = tmp_path / "cf.json"
    results = constant_factors.main(["--bundle", str(tiny_bundle), "--sampler", "euler:2", "--batch", "4",
                                     "--repeats", "1", "--out", str(out)])
    variants = [row["variant"] for row in results["rows"]]
    assert variants[0].endswith("(shipped)") and {"inference_mode", "bf16 autocast", "precision bfloat16", "compile"} <= set(variants)
    assert next(r for r in results["rows"] if r["variant"] == "inference_mode")["max_abs_diff_std"] == 0
    assert out.is_file() and out.with_suffix(".md").is_file()
