"""Constant factors of a DyDiff rollout on the CPU: what each costs or saves against the shipped code path.

    python -m benchmarks.constant_factors --threads 1            # the shipped bundle, 2-call student, M = 2
    python -m benchmarks.constant_factors --sampler heun:34      # the reference sampler instead

One `dydiff_rollout` of `--batch` stored dataset states x 48 steps (3/4 of the diffusion window) with the bundle's
BC policy, timed `--repeats` times per variant after one warm-up call (the median is reported). Variants, each against the shipped path
(`torch.no_grad`, float32):
- `inference_mode`: the call inside `torch.inference_mode()`;
- `bf16 autocast`: inside `torch.autocast("cpu", dtype=torch.bfloat16)` (everything: denoiser, ensemble, policy);
- `precision bfloat16`: the shipped setting, `Bundle.set_precision("bfloat16")` (`EnvConfig.precision`): the
  simulator's networks (denoiser, ensemble, reward) under autocast, the policy in float32;
- `compile`: the denoiser's U-Net wrapped in `torch.compile` (inductor; reported as failed where no compiler works);
- `batch B`: the same starts rolled out in chunks of B (`chunk_size`).

Accuracy: every variant runs from the same starts and seed as the shipped path; the mean and max |diff| of its
generated states from the shipped path's are in dataset-std units (0 means bit-identical). This is a check, not a
fidelity measurement: chunked variants draw other noise (each chunk its own), so their difference is the spread
between two samples, and small numeric changes grow along a trajectory. What a variant costs in fidelity is a
job for benchmarks/fidelity.py.
Results: `benchmarks/results/constant-factors.{json,md}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dydiff_env import behaviour_policy, dydiff_rollout, load_bundle, shipped_bundle_path
from dydiff_env.rollout import default_horizon
from dydiff_env.config import SamplerConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "constant-factors.json"


def parse_sampler(text: str, bundle_sampler: SamplerConfig) -> SamplerConfig:
    kind, _, steps = text.partition(":")
    return SamplerConfig(**{**bundle_sampler.__dict__, "kind": kind, "num_steps": int(steps)})


def timed_rollouts(bundle, s0, sampler, iterations, repeats, seed, horizon, context=contextlib.nullcontext,
                   chunk_size=512, precision="float32"):
    """Median seconds of `repeats` rollouts (after one warm-up) in `precision`, and the first timed rollout's
    states."""
    seconds, states = [], None
    for i in range(repeats + 1):
        gen = torch.Generator().manual_seed(seed)
        with context():
            t0 = time.perf_counter()
            result = dydiff_rollout(bundle, s0, behaviour_policy(bundle, gen), horizon=horizon, num_iterations=iterations,
                                    sampler=sampler, generator=gen, chunk_size=chunk_size, precision=precision)
            elapsed = time.perf_counter() - t0
        if i > 0:
            seconds.append(elapsed)
            states = result.next_obs.float() if states is None else states
    return statistics.median(seconds), states


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.constant_factors", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=None, help="bundle directory (default: the shipped hopper bundle)")
    p.add_argument("--sampler", default="student:2", help="kind:steps (default student:2)")
    p.add_argument("--iterations", type=int, default=2, help="DyDiff iterations M (default 2)")
    p.add_argument("--batch", type=int, default=256, help="start states per rollout (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts per variant (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle or shipped_bundle_path("hopper"), require=("dynamics", "reward", "bc", "diffusion"))
    sampler = parse_sampler(args.sampler, bundle.config.sampler)
    if sampler.kind == "student":
        bundle.student_sigmas(sampler.num_steps)  # a bundle without a student fails here, with the fix named
    starts = bundle.start_states["observations"]
    s0 = torch.as_tensor(starts[np.random.default_rng(args.seed).integers(0, len(starts), size=args.batch)])
    obs_std = torch.as_tensor(bundle.normalizer("obs").std, dtype=torch.float32)
    horizon = default_horizon(bundle.diffusion.horizon)  # dydiff_rollout's: 48 of 64 rows
    generated = args.batch * horizon

    def run(label, shipped=False, **kwargs):
        try:
            seconds, states = timed_rollouts(bundle, s0, sampler, args.iterations, args.repeats, args.seed, horizon,
                                             **kwargs)
        except Exception as err:  # a variant that cannot run here is a result too, but the shipped path must run
            if shipped:
                raise
            row = {"variant": label, "failed": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            print(f"[constant-factors] {label}: failed ({row['failed']})", flush=True)
            return row, None
        row = {"variant": label, "seconds": seconds, "generated_per_s": generated / seconds}
        print(f"[constant-factors] {label}: {row['generated_per_s']:,.0f}/s", flush=True)
        return row, states

    rows = []
    base, base_states = run("no_grad, float32 (shipped)", shipped=True)
    rows.append(base)
    variants = [("inference_mode", {"context": torch.inference_mode}),
                ("bf16 autocast", {"context": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}),
                ("precision bfloat16", {"precision": "bfloat16"}),
                *[(f"batch {b}", {"chunk_size": b}) for b in (64, 128) if b < args.batch]]
    def compare(row, states):
        if states is not None:
            diff = ((states - base_states).abs() / obs_std).nan_to_num(float("inf"))
            row["mean_abs_diff_std"], row["max_abs_diff_std"] = float(diff.mean()), float(diff.max())

    for label, kwargs in variants:
        row, states = run(label, **kwargs)
        rows.append(row)
        compare(row, states)
    model = bundle.student if sampler.kind == "student" else bundle.diffusion
    eager = model.net
    try:
        model.net = torch.compile(eager)
        row, states = run("compile")
    finally:
        model.net = eager
    rows.append(row)
    compare(row, states)
    for row in rows:
        if "generated_per_s" in row:
            row["speedup"] = row["generated_per_s"] / base["generated_per_s"]
    results = {"config": {**{k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    lines = [f"`python -m benchmarks.constant_factors --sampler {args.sampler} --iterations {args.iterations} "
             f"--batch {args.batch} --threads {args.threads}`: one rollout of {args.batch} starts x {horizon} steps, median "
             f"of {args.repeats}.", "", "| variant | generated/s | x shipped | mean / max abs diff (dataset std) |",
             "|---|---|---|---|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['variant']} | failed: {row['failed']} | | |")
        else:
            diff = (f"{row['mean_abs_diff_std']:.3g} / {row['max_abs_diff_std']:.3g}" if "max_abs_diff_std" in row
                    else "-")
            lines.append(f"| {row['variant']} | {row['generated_per_s']:,.0f} | {row['speedup']:.2f} | {diff} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
