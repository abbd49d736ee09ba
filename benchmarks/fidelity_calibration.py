"""Where the diffusion model breaks off the data: per horizon, the mean square state error against MuJoCo of
the single-step ensemble rollout and of one diffusion sample conditioned on its actions, the ensemble's own
variance estimate, and the sample's gap to the single-step states over the first 4 steps (the probe that
`RefineConfig`'s uncertainty blend and gate use). Also the correlation of the two rollouts' errors, and the
error of the mean of --samples diffusion samples (what averaging removes is the sampler's noise; what is
left is the model's bias), the best blend of the ensemble's states with that mean that one weight per
horizon, chosen with hindsight, can reach, and both models' errors given the actions the simulator took
(open loop: the policy's true actions, without the drift that its reactions to a model's states put in
them). docs/fidelity.md reads it.

    python -m benchmarks.fidelity_calibration --policy td3bc --threads 1 --sampler-kind heun --sampler-steps 34
    python -m benchmarks.fidelity_calibration --sampler-kind heun --sampler-steps 34 \
        --policy snapshot:dydiff_env/assets/behaviour/hopper-expert.safetensors

(docs/fidelity.md's tables use the reference 34-step Heun sampler, not the shipped bundle's distilled student.)

Same start states, regimes and learning policies as `benchmarks/fidelity.py` (its `prepare`). All values are
mean squares over the state dimensions in dataset-std units, averaged over the starts alive at h.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def error_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two error arrays (starts, dims) taken whole: 1 when both rollouts are off the same way."""
    return float((a * b).sum() / (a.norm() * b.norm()))


def best_fixed_blend(ensemble_error: torch.Tensor, diffusion_error: torch.Tensor) -> tuple[float, float]:
    """(mean square error, weight) of the best blend (1 - w) * ensemble + w * diffusion over w = 0, 0.05, .., 1,
    chosen with hindsight from the errors (starts, dims) at one horizon: a bound on any rule that blends the two
    with one weight per horizon."""
    weights = torch.linspace(0, 1, 21)
    errors = [float((((1 - w) * ensemble_error + w * diffusion_error) ** 2).mean()) for w in weights]
    best = int(np.argmin(errors))
    return errors[best], float(weights[best])


def calibrate(setup: fidelity.Setup, regime: str, seed: int, num_samples: int = 1) -> dict:
    bundle, horizon = setup.bundle, setup.horizon
    std = torch.as_tensor(bundle.normalizer("obs").std)
    truth = torch.as_tensor(setup.truths[regime].states, dtype=torch.float32)  # (B, H + 1, obs)
    action_fn = setup.regime_inputs[regime][0]
    s0 = torch.as_tensor(setup.start_obs)
    none = FilterConfig("none")
    # the same generator seed: the refined rollout's single-step trajectory is this one
    def rollout(iterations: int, refine=SAMPLE_ONLY, actions=action_fn):
        return dydiff_rollout(bundle, s0, actions, horizon, iterations, filter=none, refine=refine,
                              sampler=setup.sampler, generator=torch.Generator().manual_seed(seed))

    def states_of(result) -> torch.Tensor:
        """A rollout's states s_0 .. s_H (B, H + 1, obs)."""
        return torch.cat([result.obs, result.next_obs[:, -1:]], 1)

    single = rollout(0)
    states, sample = states_of(single), states_of(rollout(1))
    sample_mean = states_of(rollout(1, dataclasses.replace(SAMPLE_ONLY, num_samples=num_samples)))
    # both models given the actions the simulator took (no drift in them): the learning policy after the end
    taken = setup.truths[regime].actions
    simulator_actions = fidelity.RecordedActions(np.nan_to_num(taken), ~np.isnan(taken[..., 0]), setup.policy)
    open_loop_error = {name: (((states_of(rollout(iterations, actions=simulator_actions)) - truth) / std) ** 2)
                       .mean(-1) for name, iterations in (("ensemble", 0), ("diffusion", 1))}
    spread = [torch.zeros(len(s0))]
    for t in range(horizon):  # the same running variance v as the rollout's uncertainty blend
        means, _ = bundle.dynamics.member_predictions(single.obs[:, t], single.actions[:, t])
        spread.append(elite_spread(means, std ** 2))
    variance = torch.cumsum(torch.stack(spread, 1), 1)
    # offsets from the truth (starts, steps, dims) in dataset stds; NaN after a true termination
    ensemble_offset, sample_offset = (states - truth) / std, (sample - truth) / std
    mean_offset = (sample_mean - truth) / std
    ensemble_error, sample_error = (ensemble_offset ** 2).mean(-1), (sample_offset ** 2).mean(-1)
    mean_error = (mean_offset ** 2).mean(-1)
    gap = (((sample - states) / std) ** 2).mean(-1)
    alive = torch.isfinite(ensemble_error)
    rows = {}
    for h in (step for step in HORIZONS if step <= horizon):
        at = alive[:, h]
        blend_error, blend_weight = best_fixed_blend(ensemble_offset[at, h], mean_offset[at, h])
        rows[h] = {"ensemble_mse": float(ensemble_error[at, h].mean()),
                   "diffusion_mse": float(sample_error[at, h].mean()),
                   f"diffusion_mean_of_{num_samples}_mse": float(mean_error[at, h].mean()),
                   "error_correlation": error_correlation(ensemble_offset[at, h], sample_offset[at, h]),
                   "best_fixed_blend_mse": blend_error, "best_fixed_blend_weight": blend_weight,
                   **{f"{name}_given_simulator_actions_mse": float(error[at, h].mean())
                      for name, error in open_loop_error.items()},
                   "ensemble_variance": float(variance[at, h].mean()),
                   "gap": float(gap[at, h].mean())}
    probe = gap[:, 1 : PROBE_STEPS + 1].mean(1).numpy()
    return {"horizons": rows, "probe_gap_quantiles_10_50_90": np.quantile(probe, [0.1, 0.5, 0.9]).tolist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity_calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=None, choices=sorted(fidelity.TASKS),
                   help="the task: its shipped bundle and medium dataset are the defaults (default: the task of "
                        "--bundle, else hopper)")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped for --task)")
    p.add_argument("--dataset", default=None, help="dataset of the start states (default: the task's medium dataset)")
    p.add_argument("--policy", default="td3bc",
                   help="td3bc | bc | snapshot:PATH | module:func (as benchmarks/fidelity.py)")
    p.add_argument("-n", "--num-starts", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/fidelity", help="where the TD3+BC policy is cached")
    p.add_argument("--sampler-kind", default=None, help="sampler kind (default: the bundle's; docs/fidelity.md: heun)")
    p.add_argument("--sampler-steps", type=int, default=None, help="sampler steps (default: the bundle's; docs: 34)")
    p.add_argument("--samples", type=int, default=4, help="diffusion samples averaged for the mean's error (default 4)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples must be >= 1, got {args.samples}")
    passed = {"--task": args.task, "--bundle": args.bundle, "--dataset": args.dataset, "--threads": args.threads,
              "--sampler-kind": args.sampler_kind, "--sampler-steps": args.sampler_steps}
    options = [str(x) for flag, value in passed.items() if value for x in (flag, value)]
    fidelity_args = fidelity.build_parser().parse_args(
        ["-n", str(args.num_starts), "--seed", str(args.seed), "--no-video", "--out", args.out, "--policy", args.policy,
         "--methods", "ensemble,dydiff-M1"] + options)
    setup = fidelity.prepare(fidelity_args, log=lambda *a: None)
    results = {regime: calibrate(setup, regime, args.seed, args.samples) for regime in fidelity.REGIMES}
    for regime, r in results.items():
        print(f"{regime}: probe gap (h = 1..{PROBE_STEPS}) quantiles 10/50/90 % "
              + " / ".join(f"{q:.4f}" for q in r["probe_gap_quantiles_10_50_90"]))
        for h, row in r["horizons"].items():
            print(f"  h={h:2d}  ensemble {row['ensemble_mse']:.4f}  diffusion sample {row['diffusion_mse']:.4f}  "
                  f"mean of {args.samples} {row[f'diffusion_mean_of_{args.samples}_mse']:.4f}  "
                  f"error correlation {row['error_correlation']:+.2f}  "
                  f"best blend {row['best_fixed_blend_mse']:.4f} (w {row['best_fixed_blend_weight']:.2f})  "
                  f"given the simulator's actions: ensemble {row['ensemble_given_simulator_actions_mse']:.4f} "
                  f"diffusion {row['diffusion_given_simulator_actions_mse']:.4f}  "
                  f"ensemble variance {row['ensemble_variance']:.4f}  gap {row['gap']:.4f}")
    if args.json:
        record = {"policy": args.policy, "bundle": str(setup.bundle_path),
                  "sampler": f"{setup.sampler.kind} {setup.sampler.num_steps}", **results}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
