"""How fast is each workload at each torch thread count? (Decides the defaults; measure on an idle machine.)

    python benchmarks/threads.py                     # threads 1 and all cores
    python benchmarks/threads.py --threads 1 2 --repeats 20 --out benchmarks/results/threads.json
    python benchmarks/threads.py --preset paper --threads 2 --repeats 3   # what the paper preset costs here

Workloads: one training step of the preset's diffusion model (cpu: batch 64, H 64; paper: batch 8, H 100) and
of the dynamics ensemble (7 x 4x200, batch 256); one denoiser call on 256 trajectories (the sampler's unit of
work); one TD3+BC update (batch 256). Prints milliseconds per call (median of --repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def workloads(preset_name: str = "cpu"):
    from agents import TD3BC
    from dydiff_env.config import preset
    from dydiff_env.models import DynamicsEnsemble, TrajectoryDiffusion

    cfg = preset(preset_name)
    diff = TrajectoryDiffusion(11, 3, cfg.diffusion.horizon, cfg.diffusion.channels, cfg.diffusion.kernel_size)
    d_opt = torch.optim.Adam(diff.parameters(), 1e-4)
    x = torch.rand(cfg.diffusion.batch_size, cfg.diffusion.horizon, 14) * 2 - 1
    valid = torch.ones(x.shape[:2], dtype=torch.bool)

    def diffusion_step():
        loss = diff.loss(x, valid)
        d_opt.zero_grad()
        loss.backward()
        d_opt.step()

    xs = torch.rand(256, cfg.diffusion.horizon, 14) * 2 - 1

    def denoiser_call():
        with torch.no_grad():
            diff.denoise(xs, torch.tensor(1.0))

    dyn = DynamicsEnsemble(11, 3)
    dyn_opt = torch.optim.Adam(dyn.parameters(), 1e-3)
    o, a, n = torch.randn(7, 256, 11), torch.randn(7, 256, 3), torch.randn(7, 256, 11)

    def dynamics_step():
        loss = dyn.loss(o, a, n, cfg.dynamics.weight_decay)
        dyn_opt.zero_grad()
        loss.backward()
        dyn_opt.step()

    agent = TD3BC(11, 3)
    batch = {"obs": torch.randn(256, 11), "actions": torch.rand(256, 3) * 2 - 1, "rewards": torch.randn(256),
             "next_obs": torch.randn(256, 11), "terminated": torch.zeros(256)}

    return {f"diffusion_train_step_b{cfg.diffusion.batch_size}": diffusion_step, "denoiser_call_b256": denoiser_call,
            "dynamics_train_step_b256": dynamics_step, "td3bc_update_b256": lambda: agent.update(batch)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                        help="whose diffusion model to time (default cpu; the other workloads are the same)")
    args = parser.parse_args(argv)
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        results[threads] = {name: round(_time(fn, args.repeats), 2) for name, fn in workloads(args.preset).items()}
    names = list(next(iter(results.values())))
    print(f"| workload (ms per call, median of {args.repeats}) | " + " | ".join(f"{t} thread(s)" for t in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[t][name]:.1f}" for t in results) + " |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "preset": args.preset, "results_ms": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
