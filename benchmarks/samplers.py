"""Samplers: speed against fidelity, in one run, next to the real simulator and the single-step ensemble.

    python -m benchmarks.samplers --threads 1                 # about 10 min on one core
    python -m benchmarks.samplers --quick                     # a smoke run

For every sampler of `--grid` (kind:steps[:churn][@precision], e.g. heun:34 is the reference stochastic Heun
sampler, heun:10:0 the deterministic Heun sampler with 10 steps, dpmpp_2m:5 DPM-Solver++(2M) with 5 steps,
student:2 the bundle's distilled student with 2 calls, skipped when the bundle has none; @bfloat16 serves the
bundle's networks in bf16, `Bundle.set_precision`, float32 otherwise), and every refinement rule of `--rules`
("paper": the 50/50 average, `dydiff-M<m>` of the fidelity benchmark; "default": `RefineConfig()`, the default
of `dydiff_rollout` and `DydiffEnv`, `dydiff-M<m>-u-g4`):
- speed: `dydiff_rollout` of `--batch` dataset starts x 3/4 of the window with the bundle's BC policy, M = 1
  and M = 2, generated transitions per second on `--threads` torch threads (and on `--also-threads`);
- fidelity: the fidelity benchmark's teacher-forced and policy-driven regimes (`benchmarks/fidelity.py`,
  same start states, same learning policy, one simulator replay shared by every sampler), state error at
  h = 1, H/4, H/2, 3H/4, H and the H-step return error, for M = 1 and M = 2.
The single-step ensemble (M = 0) is measured the same way, and the real env (`SyncVectorEnv` of 64 envs,
random actions) gives the simulator's rate in the same run. Writes `samplers.json`, `samplers.md` and
`samplers.png` (policy-driven state error at H and return error against generated transitions/s: the
speed/accuracy frontier) to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/samplers.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.trainer import json_safe  # noqa: E402
from benchmarks import fidelity  # noqa: E402
from dydiff_env.config import PRECISIONS, RefineConfig, SamplerConfig  # noqa: E402

DEFAULT_GRID = "heun:34,heun:10,heun:10:0,heun:5:0,dpmpp_2m:20,dpmpp_2m:10,dpmpp_2m:5,dpmpp_2m:3,euler:10,euler:3"
DEFAULT_OUT = Path("benchmarks/results/samplers")
REGIMES = ("teacher-forced", "policy-driven")
# refinement rules, as fidelity benchmark method names for M rounds ("default" names RefineConfig(): checked in
# the tests)
RULES = {"paper": "dydiff-M{m}", "default": "dydiff-M{m}-u-g4"}


def parse_grid(text: str, base: SamplerConfig) -> list[tuple[SamplerConfig, str]]:
    """'kind:steps[:churn][@precision],...' -> (sampler config, precision) pairs (the bundle's sigma schedule
    otherwise; float32 unless a precision is given)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        spec, _, precision = item.partition("@")
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"grid entry '{item}' is not kind:steps or kind:steps:churn (then optionally @precision)")
        if precision and precision not in PRECISIONS:
            raise ValueError(f"grid entry '{item}': precision must be one of {list(PRECISIONS)}")
        sampler = dataclasses.replace(base, kind=parts[0], num_steps=int(parts[1]))
        if len(parts) == 3:
            sampler = dataclasses.replace(sampler, s_churn=float(parts[2]))
        out.append((sampler, precision or "float32"))
    return out


def usable_samplers(samplers: list[tuple[SamplerConfig, str]], bundle, log=print) -> list[tuple[SamplerConfig, str]]:
    """The grid without student entries when the bundle has no student (each skipped one is said)."""
    if bundle.student is not None:
        return samplers
    for sampler, _ in samplers:
        if sampler.kind == "student":
            log(f"[samplers] skipping student:{sampler.num_steps}: the bundle has no distilled student "
                "(`dydiff-env train distill --bundle DIR`)")
    return [(sampler, precision) for sampler, precision in samplers if sampler.kind != "student"]


def label(sampler: SamplerConfig, precision: str = "float32") -> str:
    name = f"{sampler.kind} {sampler.num_steps}" if sampler.kind != "heun" else (
        f"heun {sampler.num_steps}" + (" deterministic" if sampler.s_churn == 0 else ""))
    return name + ("" if precision == "float32" else f", {precision}")


def rollout_speed(bundle, sampler: SamplerConfig, iterations: int, batch: int, seed: int,
                  refine: RefineConfig | None = None) -> float:
    """Generated transitions per second of one `dydiff_rollout` (the throughput benchmark's measurement)."""
    from dydiff_env import behaviour_policy, dydiff_rollout
    from dydiff_env.rollout import default_horizon

    starts = bundle.start_states["observations"]
    s0 = torch.as_tensor(starts[np.random.default_rng(seed).integers(0, len(starts), size=batch)])
    generator = torch.Generator().manual_seed(seed)
    horizon = default_horizon(bundle.diffusion.horizon)
    begin = time.perf_counter()
    dydiff_rollout(bundle, s0, behaviour_policy(bundle, generator), horizon=horizon, num_iterations=iterations,
                   sampler=sampler, generator=generator, refine=refine)
    return batch * horizon / (time.perf_counter() - begin)


def real_speed(env_id: str, num_envs: int = 64, steps: int = 200, seed: int = 0) -> float:
    import gymnasium as gym

    env = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)])
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    begin = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, (num_envs, env.single_action_space.shape[0])))
    env.close()
    return num_envs * steps / (time.perf_counter() - begin)


def fidelity_row(setup, sampler: SamplerConfig, iterations: int, seed: int, log, rule: str = "paper") -> dict:
    """State error at 5 horizons and return error in both regimes, for one sampler, M and refinement rule."""
    method = "ensemble" if iterations == 0 else RULES[rule].format(m=iterations)
    cols = sorted({1, max(1, setup.horizon // 4), max(1, setup.horizon // 2), max(1, 3 * setup.horizon // 4),
                   setup.horizon})
    row = {}
    for regime in REGIMES:
        action_fn, step_act, plan_policy = setup.regime_inputs[regime]
        result = fidelity.evaluate_methods(setup.bundle, setup.start_obs, setup.truths[regime], regime, [method],
                                           action_fn, step_act, plan_policy, setup.horizon, sampler, seed,
                                           "elite_mean", {}, log)[method]
        mean = result["state_error"]["mean"]
        row[regime] = {"state_error": {h: mean[h - 1] for h in cols},
                       "state_error_ci_at_H": [result["state_error"]["low"][-1], result["state_error"]["high"][-1]],
                       "return_error": result["return_error"]["abs_mean"]}
    return row


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"Samplers on `{m['bundle']}` ({m['threads']} torch thread(s)); the real env ran at "
             f"{m['real_per_s']:,.0f} transitions/s (SyncVectorEnv, 64 envs) in this run. Fidelity: "
             f"{m['num_starts']} starts, H = {m['horizon']}, learning policy {m['policy']}; state error = "
             "mean |model - true| / dataset std.", "",
             "| sampler | calls/iter | M | rule | generated/s | x real | "
             + (f"generated/s ({m['also_threads']} threads) | " if m.get("also_threads") else "")
             + "teacher-forced err h=1 / H | policy-driven err h=1 / H/4 / H/2 / 3H/4 / H | return err (policy-driven) |",
             "|---|---|---|---|---|---|" + ("---|" if m.get("also_threads") else "") + "---|---|---|"]
    for r in results["rows"]:
        tf, pd = r["fidelity"]["teacher-forced"], r["fidelity"]["policy-driven"]
        tf_e, pd_e = list(tf["state_error"].values()), list(pd["state_error"].values())
        also = f"{r['generated_per_s_also']:,.0f} | " if m.get("also_threads") else ""
        lines.append(f"| {r['label']} | {r['calls'] or '-'} | {r['iterations']} | {r.get('rule', 'paper')} | "
                     f"{r['generated_per_s']:,.0f} | {r['generated_per_s'] / m['real_per_s']:.3g} | {also}"
                     f"{tf_e[0]:.3f} / {tf_e[-1]:.3f} | " + " / ".join(f"{e:.3f}" for e in pd_e)
                     + f" | {pd['return_error']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Policy-driven error at H and return error against generated transitions/s: one colour per sampler kind,
    one marker per M, each point labelled with its step count; the ensemble is the black square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"heun": "tab:blue", "heun deterministic": "tab:cyan", "dpmpp_2m": "tab:red", "euler": "tab:green",
               "student": "tab:purple"}
    markers = {(1, "paper"): "o", (2, "paper"): "^", (1, "default"): "P", (2, "default"): "*"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, name in ((axes[0], "state_error", "policy-driven state error at H"),
                          (axes[1], "return_error", "policy-driven H-step return error")):
        for r in results["rows"]:
            pd = r["fidelity"]["policy-driven"]
            y = list(pd["state_error"].values())[-1] if key == "state_error" else pd["return_error"]
            if r["iterations"] == 0:
                ax.scatter(r["generated_per_s"], y, marker="s", s=50, color="black", label="single-step ensemble")
                continue
            family = "heun deterministic" if r["kind"] == "heun" and r["s_churn"] == 0 else r["kind"]
            rule = r.get("rule", "paper")
            ax.scatter(r["generated_per_s"], y, marker=markers[r["iterations"], rule], s=40, color=colours[family],
                       label=f"{family}, M={r['iterations']}, {rule} rule")
            bf16 = " bf16" if r.get("precision", "float32") == "bfloat16" else ""
            ax.annotate(f"{r['num_steps']}{bf16}", (r["generated_per_s"], y), fontsize=7, xytext=(3, 2),
                        textcoords="offset points", color=colours[family])
        ax.axvline(results["meta"]["real_per_s"], ls="--", color="0.5", lw=0.8, label="real Hopper-v5 (64 envs)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("generated transitions / s (1 thread)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[1].legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Speed/accuracy frontier of the samplers (labels: sampler steps, bf16 where served in bfloat16; "
                 "lower right is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.samplers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fidelity.add_task_args(p)
    p.add_argument("--policy", default="td3bc", help="learning policy of the policy-driven regime (as fidelity.py)")
    p.add_argument("--policy-steps", type=int, default=None, help="TD3+BC updates (as fidelity.py)")
    p.add_argument("-n", "--num-starts", type=int, default=96, help="fidelity start states (default 96)")
    p.add_argument("--horizon", type=int, default=None, help="fidelity horizon H (default: window - 1)")
    p.add_argument("--batch", type=int, default=256, help="rollout batch for the speed measurement (default 256)")
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help=f"samplers, kind:steps[:churn][@precision]; student:K for the bundle's student, @bfloat16 to "
                        f"serve the networks in bf16 (default {DEFAULT_GRID})")
    p.add_argument("--rules", default="paper,default",
                   help="refinement rules, paper (50/50 average) and/or default (RefineConfig()) (default both)")
    p.add_argument("--also-threads", type=int, default=None,
                   help="measure the speed on this many threads too (e.g. 2 on an otherwise idle machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="few starts, short H, small batch, two samplers")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.num_starts, args.batch = min(args.num_starts, 8), min(args.batch, 8)
        args.horizon = args.horizon or 8
        args.grid = args.grid if args.grid != DEFAULT_GRID else "heun:3,dpmpp_2m:2"
    fidelity_args = argparse.Namespace(
        task=args.task, bundle=args.bundle, dataset=args.dataset, policy=args.policy, policy_steps=args.policy_steps,
        num_starts=args.num_starts, horizon=args.horizon, seed=args.seed, threads=args.threads, sampler_steps=None,
        sampler_kind=None, methods="ensemble,dydiff-M1,dydiff-M2", dynamics_mode="elite_mean",
        out=args.out, quick=args.quick)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not rules or any(r not in RULES for r in rules):
        raise SystemExit(f"--rules must name some of {list(RULES)}, got {args.rules!r}")
    setup = fidelity.prepare(fidelity_args, log=print)
    bundle = setup.bundle
    samplers = usable_samplers(parse_grid(args.grid, bundle.config.sampler), bundle)
    out = Path(args.out)
    results = {"meta": {"bundle": str(setup.bundle_path), "threads": args.threads, "batch": args.batch,
                        "num_starts": int(len(setup.rows)), "horizon": setup.horizon, "policy": args.policy,
                        "also_threads": args.also_threads, "rules": rules,
                        "real_per_s": real_speed(bundle.task.env_id, steps=20 if args.quick else 200)},
               "rows": []}
    configs = [(None, "float32", 0, "paper")] + [(s, p, m, rule) for s, p in samplers for rule in rules for m in (1, 2)]
    for sampler, precision, iterations, rule in configs:
        used = sampler or bundle.config.sampler
        refine = fidelity.parse_method(RULES[rule].format(m=max(iterations, 1)))[1]
        with bundle.serving(precision):  # the fidelity methods, too, use the bundle's precision
            row = {"label": "single-step ensemble" if sampler is None else label(sampler, bundle.precision),
                   "iterations": iterations, "rule": rule if iterations else "-", "precision": bundle.precision,
                   "kind": used.kind, "num_steps": used.num_steps, "s_churn": used.s_churn,
                   "calls": 0 if sampler is None else used.calls_per_sample,
                   "generated_per_s": rollout_speed(bundle, used, iterations, args.batch, args.seed, refine),
                   "fidelity": fidelity_row(setup, used, iterations, args.seed, log=lambda *a: None, rule=rule)}
            if args.also_threads:
                torch.set_num_threads(args.also_threads)
                row["generated_per_s_also"] = rollout_speed(bundle, used, iterations, args.batch, args.seed, refine)
                torch.set_num_threads(args.threads)
        results["rows"].append(row)
        pd = row["fidelity"]["policy-driven"]
        print(f"[samplers] {row['label']:24s} M={iterations} {row['rule']:7s}: {row['generated_per_s']:8,.0f}/s, "
              f"policy-driven error at H {list(pd['state_error'].values())[-1]:.3f}, return error "
              f"{pd['return_error']:.2f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers.json").write_text(json.dumps(json_safe(results), indent=1))
    table = markdown(results)
    (out / "samplers.md").write_text(table + "\n")
    plot(results, out / "samplers.png")
    print(table)
    print(f"[samplers] wrote {out / 'samplers.json'}, samplers.md and samplers.png")
    return results


if __name__ == "__main__":
    main()
