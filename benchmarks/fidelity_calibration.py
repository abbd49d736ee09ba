"""Where the diffusion model breaks off the data: per horizon, the mean square state error against MuJoCo of
the single-step ensemble rollout and of one diffusion sample conditioned on its actions, the ensemble's own
variance estimate, and the sample's gap to the single-step states over the first 4 steps (the probe that
`RefineConfig`'s uncertainty blend and gate use). docs/fidelity.md reads it.

    python -m benchmarks.fidelity_calibration --policy td3bc --threads 1
    python -m benchmarks.fidelity_calibration --policy snapshot:dydiff_env/assets/behaviour/hopper-expert.safetensors

Same start states, regimes and learning policies as `benchmarks/fidelity.py` (its `prepare`). All values are
mean squares over the state dimensions in dataset-std units, averaged over the starts alive at h.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fidelity  # noqa: E402
from dydiff_env.rollout import FilterConfig, RefineConfig, dydiff_rollout, elite_spread  # noqa: E402

HORIZONS = (1, 2, 4, 8, 15, 31, 47, 63)
PROBE_STEPS = 4
# weight ~1 on the sample wherever the ensemble has any spread: the refined states are the diffusion sample
SAMPLE_ONLY = RefineConfig(blend="uncertainty", diffusion_error=1e-6, probe_steps=0, max_probe_ratio=None)


def calibrate(setup: fidelity.Setup, regime: str, seed: int) -> dict:
    bundle, horizon = setup.bundle, setup.horizon
    std = torch.as_tensor(bundle.normalizer("obs").std)
    truth = torch.as_tensor(setup.truths[regime].states, dtype=torch.float32)  # (B, H + 1, obs)
    action_fn = setup.regime_inputs[regime][0]
    s0 = torch.as_tensor(setup.start_obs)
    none = FilterConfig("none")
    # the same generator seed: the refined rollout's single-step trajectory is this one
    single = dydiff_rollout(bundle, s0, action_fn, horizon, 0, filter=none, generator=torch.Generator().manual_seed(seed))
    sampled = dydiff_rollout(bundle, s0, action_fn, horizon, 1, filter=none, refine=SAMPLE_ONLY,
                             generator=torch.Generator().manual_seed(seed))
    states = torch.cat([single.obs, single.next_obs[:, -1:]], 1)
    sample = torch.cat([sampled.obs, sampled.next_obs[:, -1:]], 1)
    spread = [torch.zeros(len(s0))]
    for t in range(horizon):  # the same running variance v as the rollout's uncertainty blend
        means, _ = bundle.dynamics.member_predictions(single.obs[:, t], single.actions[:, t])
        spread.append(elite_spread(means, std ** 2))
    variance = torch.cumsum(torch.stack(spread, 1), 1)
    ensemble_error = (((states - truth) / std) ** 2).mean(-1)
    sample_error = (((sample - truth) / std) ** 2).mean(-1)
    gap = (((sample - states) / std) ** 2).mean(-1)
    alive = torch.isfinite(ensemble_error)
    rows = {h: {"ensemble_mse": float(ensemble_error[alive[:, h], h].mean()),
                "diffusion_mse": float(sample_error[alive[:, h], h].mean()),
                "ensemble_variance": float(variance[alive[:, h], h].mean()),
                "gap": float(gap[alive[:, h], h].mean())} for h in HORIZONS if h <= horizon}
    probe = gap[:, 1 : PROBE_STEPS + 1].mean(1).numpy()
    return {"horizons": rows, "probe_gap_quantiles_10_50_90": np.quantile(probe, [0.1, 0.5, 0.9]).tolist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity_calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=None, choices=sorted(fidelity.TASKS),
                   help="the task: its shipped bundle and medium dataset are the defaults (default: the task of "
                        "--bundle, else hopper)")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped for --task)")
    p.add_argument("--policy", default="td3bc", help="td3bc | bc | snapshot:PATH | module:func (as benchmarks/fidelity.py)")
    p.add_argument("-n", "--num-starts", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/fidelity", help="where the TD3+BC policy is cached")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    fidelity_args = fidelity.build_parser().parse_args(
        ["-n", str(args.num_starts), "--seed", str(args.seed), "--no-video", "--out", args.out, "--policy", args.policy,
         "--methods", "ensemble,dydiff-M1"] + (["--task", args.task] if args.task else []) + (["--bundle", args.bundle] if args.bundle else [])
        + (["--threads", str(args.threads)] if args.threads else []))
    setup = fidelity.prepare(fidelity_args, log=lambda *a: None)
    results = {regime: calibrate(setup, regime, args.seed) for regime in fidelity.REGIMES}
    for regime, r in results.items():
        print(f"{regime}: probe gap (h = 1..{PROBE_STEPS}) quantiles 10/50/90 % "
              + " / ".join(f"{q:.4f}" for q in r["probe_gap_quantiles_10_50_90"]))
        for h, row in r["horizons"].items():
            print(f"  h={h:2d}  ensemble {row['ensemble_mse']:.4f}  diffusion sample {row['diffusion_mse']:.4f}  "
                  f"ensemble variance {row['ensemble_variance']:.4f}  gap {row['gap']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"policy": args.policy, "bundle": str(setup.bundle_path), **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
