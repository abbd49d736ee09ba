#!/usr/bin/env python
"""Throughput of DyDiff rollouts and of the DydiffEnv, next to the real simulator, in one run.

    python benchmarks/throughput.py [--bundle DIR] [--threads 1] [--steps 1000] [--plan-steps N]
                                    [--env-sampler-steps N] [--quick] [--out FILE]

Measured (transitions per second, wall clock, single process, torch on `--threads` intra-op threads):

- `dydiff_rollout` on a batch of dataset start states (`--batch`, default 256) with the bundle's
  behaviour-cloning policy, served in the env's precision: M=2 with the bundle's sampler, M=2 with the reference
  34-step Heun sampler (when the bundle's is another), and M=0 (single-step ensemble only). "generated" counts every row (batch x horizon), "kept" only the valid steps of the
  trajectories the default hardmax filter keeps (what a replay buffer would receive).
- `DydiffEnv` with num_envs 1, 64, 256, one whole run per agent: `reset` then `--steps` vector steps (1,000
  per sub-env by default, and at least 5 plan lengths for the agent that follows its plans), timing the env calls only
  (the agent's own action computation is not timed) with every cost the user pays inside: autoresets, pool
  generations, first plans and continuations. The env's policy handle is the task's shipped medium actor
  (deterministic) for every agent, so auto mode's probing is included too. Agents:
    - `handle`: acts as the handle, so it is served DyDiff plans (the cost is plan generation);
    - `noisy_0.1`: the handle plus N(0, 0.1) per action, as TD3 explores;
    - `sac`: the same actor sampling its stochastic actions, as an SB3 SAC actor collects;
    - `random`: uniform random actions.
  Reported: transitions/s, the share served from plans, rollout calls, episodes ended, peak memory.
- the real env (`gymnasium.vector.SyncVectorEnv` of the bundle's MuJoCo env, random actions) with the same
  num_envs and `--steps`, timed the same way; DydiffEnv ratios are against it. Rollout ratios are against the
  real env's highest throughput in this run.

Memory: for every measurement, `peak_mib` is the largest resident set size (RSS, sampled from
/proc/self/statm every 5 ms by a background thread) above the RSS at its start, and `maxrss_delta_mib` is the
growth of the process high-water mark `resource.getrusage(RUSAGE_SELF).ru_maxrss` during it (0 when it stayed
under an earlier peak of this process, so read it as a lower bound). Both include torch and MuJoCo memory.

The agent that follows its plans is bound by plan generation (a DyDiff rollout per plan); the others are served
by the single-step model. Progress is printed per measurement and the JSON is rewritten after each one.

Writes a markdown table to stdout, all numbers (with the settings and machine) to `--out` as JSON, and a
log-scale bar chart of the step throughputs next to it (same name, .png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

from dydiff_env.config import PRECISIONS, SAMPLER_KINDS, EnvConfig, SamplerConfig
from dydiff_env.tasks import TASKS

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput.json"


def env_sampler_of(meta: dict) -> str:
    """The env's sampler as a run recorded it (runs before --env-sampler-kind recorded only the steps)."""
    return meta.get("env_sampler") or f"{meta.get('env_sampler_steps', meta['sampler_steps'])}-step"


# ------------------------------------------------------------------------------------------------- memory


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: fall back to the high-water mark
        return _maxrss_mib()


def _maxrss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager: peak RSS above the starting RSS (sampled) and the ru_maxrss growth, both in MiB."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self.maxrss_delta_mib = 0.0

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_mib())

    def __enter__(self):
        self._start, self._maxrss = _rss_mib(), _maxrss_mib()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_mib())
        self.peak_mib = round(self._peak - self._start, 1)
        self.maxrss_delta_mib = round(_maxrss_mib() - self._maxrss, 1)
        return False


# ------------------------------------------------------------------------------------------- measurements


def bench_rollout(bundle, label: str, num_iterations: int, sampler, batch: int, seed: int = 0) -> dict:
    import torch

    from dydiff_env import behaviour_policy, dydiff_rollout
    from dydiff_env.rollout import default_horizon

    starts = bundle.start_states["observations"]
    rng = np.random.default_rng(seed)
    s0 = torch.as_tensor(starts[rng.integers(0, len(starts), size=batch)])
    gen = torch.Generator().manual_seed(seed)
    policy = behaviour_policy(bundle, gen)
    window = bundle.diffusion.horizon
    horizon = default_horizon(window)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = dydiff_rollout(bundle, s0, policy, horizon=horizon, num_iterations=num_iterations, sampler=sampler,
                                generator=gen)
        seconds = time.perf_counter() - t0
    generated = batch * horizon
    kept = int((result.valid & result.kept[:, None]).sum())
    return {"label": label, "num_iterations": num_iterations, "sampler_steps": sampler.num_steps, "batch": batch,
            "horizon": horizon, "seconds": seconds, "generated_per_s": generated / seconds,
            "kept_per_s": kept / seconds, "kept_transitions": kept, "peak_mib": mem.peak_mib,
            "maxrss_delta_mib": mem.maxrss_delta_mib}


class Agent:
    """What acts on the env (untimed): `handle` acts as the env's policy handle (deterministic actor);
    `noisy_0.1` adds N(0, 0.1) per action (as TD3 explores); `sac` samples the stochastic actor (an SB3 SAC
    actor collecting); `random` draws uniform actions. All clipped to [-1, 1]."""

    def __init__(self, kind: str, num_envs: int, act_dim: int, actor=None, seed: int = 0):
        import torch

        if kind not in AGENTS:
            raise ValueError(f"unknown agent '{kind}'; choose from {AGENTS}")
        self.kind, self.actor = kind, actor
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = (num_envs, act_dim)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.kind == "random":
            return self.rng.uniform(-1.0, 1.0, self.shape).astype(np.float32)
        actions = self.actor.act(obs, deterministic=self.kind != "sac", generator=self.generator)
        if self.kind == "noisy_0.1":
            actions = np.clip(actions + 0.1 * self.rng.standard_normal(self.shape), -1.0, 1.0)
        return np.asarray(actions, dtype=np.float32)


AGENTS = ("handle", "noisy_0.1", "sac", "random")


def behaviour_actor(bundle, seed: int = 0):
    """The task's shipped medium actor (an SB3 SAC snapshot), or a fixed tanh-linear actor where none ships."""
    from dydiff_env.behaviour import GaussianActor, load_shipped_actor

    try:
        return load_shipped_actor(bundle.task.name, "medium")
    except FileNotFoundError:
        import torch

        actor = GaussianActor(bundle.obs_dim, bundle.act_dim, hidden=(8,))
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in actor.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        return actor


def timed_run(env, agent: Agent, steps: int, seed: int) -> dict:
    """reset + `steps` vector steps, timing the env calls only (autoresets, re-plans and pools included)."""
    t0 = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    reset_s = time.perf_counter() - t0
    elapsed, episodes = reset_s, 0
    for _ in range(steps):
        actions = agent(obs)
        t0 = time.perf_counter()
        obs, _, terminated, truncated, _ = env.step(actions)
        elapsed += time.perf_counter() - t0
        episodes += int((terminated | truncated).sum())
    n = env.num_envs * steps
    return {"reset_s": reset_s, "total_s": elapsed, "total_per_s": n / elapsed, "transitions": n,
            "episodes_ended": episodes}


def bench_env(bundle, num_envs: int, agent_kind: str, steps: int, seed: int = 0, sampler=None,
              num_iterations: int = EnvConfig.num_iterations, precision: str = EnvConfig.precision,
              horizon: int | None = None) -> dict:
    from dydiff_env import DydiffEnv

    actor = behaviour_actor(bundle, seed)
    with PeakMemory() as mem:
        env = DydiffEnv(num_envs, bundle=bundle, task=bundle.task.name, sampler=sampler, num_iterations=num_iterations,
                        precision=precision, horizon=horizon)
        env.set_policy(lambda obs: actor.act(obs, deterministic=True))  # every agent's env has the handle set
        row = timed_run(env, Agent(agent_kind, num_envs, bundle.act_dim, actor, seed), steps, seed)
        stats = dict(env.stats)
        env.close()
    served = stats["plan_steps"] + stats["model_steps"]
    return {"num_envs": num_envs, "agent": agent_kind, "steps": steps, "sampler_steps": env.sampler.num_steps,
            "plan_precision": precision, "model_step_precision": bundle.precision,
            **row, "plan_share": stats["plan_steps"] / max(1, served), "stats": stats,
            "peak_mib": mem.peak_mib, "maxrss_delta_mib": mem.maxrss_delta_mib}


def bench_real(env_id: str, num_envs: int, steps: int, seed: int = 0) -> dict:
    import gymnasium as gym

    with PeakMemory() as mem:
        env = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)])
        row = timed_run(env, Agent("random", num_envs, env.single_action_space.shape[0], None, seed), steps, seed)
        env.close()
    return {"num_envs": num_envs, "env_id": env_id, "steps": steps, **row, "peak_mib": mem.peak_mib,
            "maxrss_delta_mib": mem.maxrss_delta_mib}


# ---------------------------------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"## DyDiff throughput ({m['env_id']}, bundle `{m['bundle']}`, {m['threads']} torch thread(s), "
             f"{m['cpu_count']} CPUs, {'quick' if m['quick'] else 'full'} run)", ""]
    real_best = max(r["total_per_s"] for r in results["real"])
    lines += [f"### dydiff_rollout (precision {m.get('rollout_precision', 'float32')})", "",
              "| rollout | M | sampler steps | batch x horizon | seconds | generated/s | kept/s | x real | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rollout"]:
        lines.append(f"| {r['label']} | {r['num_iterations']} | {r['sampler_steps'] if r['num_iterations'] else '-'} | "
                     f"{r['batch']} x {r['horizon']} | {r['seconds']:.2f} | {_fmt(r['generated_per_s'])} | "
                     f"{_fmt(r['kept_per_s'])} | {r['generated_per_s'] / real_best:.3g} | {r['peak_mib']} |")
    lines += ["", f"x real: generated/s over the real env's best throughput in this run ({_fmt(real_best)}/s).",
              "", "### DydiffEnv vs the real env (SyncVectorEnv), whole runs", "",
              f"Plans: M={m.get('env_iterations', 2)}, {env_sampler_of(m)} sampler, precision "
              f"{m.get('env_precision', 'float32')}; the policy handle is set "
              "for every agent. total/s = num_envs x steps / seconds of env calls, reset, autoresets and every "
              "re-plan included.", "",
              "| num_envs | agent | steps | total/s | real total/s | x real | from plans | rollout calls | "
              "episodes | peak MiB (real) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    real = {r["num_envs"]: r for r in results["real"]}
    for r in results["env"]:
        q = real[r["num_envs"]]
        lines.append(f"| {r['num_envs']} | {r['agent']} | {r['steps']} | {_fmt(r['total_per_s'])} | "
                     f"{_fmt(q['total_per_s'])} | {r['total_per_s'] / q['total_per_s']:.3g} | "
                     f"{100 * r['plan_share']:.0f} % | {r['stats']['rollout_calls']} | {r['episodes_ended']} | "
                     f"{r['peak_mib']} ({q['peak_mib']}) |")
    lines += ["", "Peak MiB: sampled RSS peak above the RSS at the start of the measurement (JSON also has the "
              "ru_maxrss growth)."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Whole-run transitions/s of DydiffEnv per agent next to the real env, log scale, per num_envs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["num_envs"] for r in results["env"]})
    agents = list(dict.fromkeys(r["agent"] for r in results["env"]))
    series = {a: [next((r["total_per_s"] for r in results["env"] if r["num_envs"] == n and r["agent"] == a),
                       np.nan) for n in sizes] for a in agents}
    series[f"real {results['meta']['env_id']}"] = [
        next((r["total_per_s"] for r in results["real"] if r["num_envs"] == n), np.nan) for n in sizes]
    x = np.arange(len(sizes))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name,
               color="0.4" if name.startswith("real") else None)
    for r in results["rollout"]:
        ax.axhline(r["generated_per_s"], lw=0.8, ls="--", color="0.6")
        ax.annotate(f"dydiff_rollout {r['label']}", (x[0] - 0.45, r["generated_per_s"]), fontsize=6.5,
                    ha="left", va="bottom", color="0.25",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_yscale("log")
    ax.set_xticks(x, [f"num_envs {n}" for n in sizes])
    ax.set_ylabel("transitions / s (whole run)")
    m = results["meta"]
    ax.set_title(f"DydiffEnv ({env_sampler_of(m)} sampler) vs "
                 f"{m['env_id']}, {m['threads']} thread(s)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    from agents.trainer import json_safe  # the project's one strict-JSON conversion (numpy scalars, NaN)

    tmp.write_text(json.dumps(json_safe(results), indent=2))
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="hopper", choices=sorted(TASKS),
                   help="task whose shipped bundle is measured when --bundle is not given (default hopper)")
    p.add_argument("--bundle", help="bundle directory (default: the bundle shipped for --task, if any)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="vector steps per run of the agents served by the model (default 1000; --quick: 5)")
    p.add_argument("--plan-steps", type=int, default=None,
                   help="vector steps per run of the agent that follows its plans (default: --steps, at least 5 "
                        "plan lengths; --quick: 5)")
    p.add_argument("--batch", type=int, default=None, help="rollout batch size (default 256; --quick: 8)")
    p.add_argument("--num-envs", type=int, nargs="+", default=None, help="env sizes (default 1 64 256; --quick: 1 4)")
    p.add_argument("--env-sampler-steps", type=int, default=None,
                   help="sampler steps of the env's plans and re-plans (default: the bundle's)")
    p.add_argument("--env-iterations", type=int, default=EnvConfig.num_iterations,
                   help=f"DyDiff iterations M of the env's plans (default: the env's, {EnvConfig.num_iterations})")
    p.add_argument("--env-sampler-kind", default=None, choices=SAMPLER_KINDS,
                   help="sampler of the env's plans and re-plans (default: the bundle's; student: the bundle's "
                        "distilled student, with --env-sampler-steps K)")
    p.add_argument("--env-precision", default=EnvConfig.precision, choices=PRECISIONS,
                   help=f"EnvConfig.precision of the env runs and of the dydiff_rollout rows (default "
                        f"{EnvConfig.precision})")
    p.add_argument("--env-horizon", type=int, default=None,
                   help="transitions per plan (default: the env's, the diffusion window minus one)")
    p.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS,
                   help=f"the agents to run (default all: {' '.join(AGENTS)})")
    p.add_argument("--quick", action="store_true", help="a few seconds: tiny batch, few steps, small env sizes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 1000)
    args.plan_steps = args.plan_steps or (5 if args.quick else None)
    args.batch = args.batch or (8 if args.quick else 256)
    args.num_envs = args.num_envs or ([1, 4] if args.quick else [1, 64, 256])
    if args.threads < 1 or args.steps < 1 or args.batch < 1 or min(args.num_envs) < 1 or (args.plan_steps or 1) < 1:
        p.error("--threads, --steps, --plan-steps, --batch and --num-envs must be positive")
    if args.env_sampler_steps is not None and args.env_sampler_steps < 1:
        p.error("--env-sampler-steps must be positive")
    if args.env_iterations < 0:
        p.error("--env-iterations must be >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from dydiff_env import load_bundle, shipped_bundle_path
    from dydiff_env.env import default_plan_horizon

    bundle_path = Path(args.bundle) if args.bundle else shipped_bundle_path(args.task)
    if args.bundle is None and not (bundle_path / "config.json").is_file():
        sys.exit(f"no bundle ships for {args.task} in this installation; pass --bundle DIR (see `dydiff-env train`)")
    bundle = load_bundle(bundle_path, require=("dynamics", "reward", "bc", "diffusion"))
    sampler = bundle.config.sampler
    reference = SamplerConfig()  # EDM's stochastic Heun sampler, 34 steps: the paper's

    # warm-up: lazy torch/MuJoCo initialisation is not part of any measurement
    from dydiff_env import behaviour_policy, dydiff_rollout

    dydiff_rollout(bundle, bundle.start_states["observations"][:2], behaviour_policy(bundle), horizon=1,
                   num_iterations=1, sampler=dataclasses.replace(sampler, num_steps=1))

    t_start = time.perf_counter()
    results = {"meta": {
        "bundle": str(bundle_path), "env_id": bundle.task.env_id, "dataset_id": bundle.meta.get("dataset_id"),
        "diffusion_window": bundle.diffusion.horizon, "sampler_steps": sampler.num_steps,
        "threads": args.threads, "steps": args.steps, "batch": args.batch, "num_envs": args.num_envs,
        "quick": args.quick, "seed": args.seed, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "memory_note": "peak_mib: sampled RSS peak above the RSS at the start of the measurement; "
                       "maxrss_delta_mib: growth of getrusage ru_maxrss during it (lower bound)"}}
    env_sampler = dataclasses.replace(sampler, kind=args.env_sampler_kind or sampler.kind,
                                      num_steps=args.env_sampler_steps or sampler.num_steps)
    results["meta"]["env_sampler_steps"] = env_sampler.num_steps
    results["meta"]["env_sampler"] = f"{env_sampler.kind} {env_sampler.num_steps}-step"
    results["meta"]["env_iterations"] = args.env_iterations
    results["meta"]["env_horizon"] = args.env_horizon
    results["meta"]["env_precision"] = args.env_precision
    results.update(rollout=[], real=[], env=[])

    def record(section: str, row: dict) -> None:
        # progress goes to stdout unbuffered and the JSON is rewritten after every measurement, so a long
        # run that is stopped keeps what it measured
        results[section].append(row)
        rate = row.get("generated_per_s", row.get("total_per_s"))
        name = row.get("label") or f"num_envs {row['num_envs']} {row.get('agent', 'real')}"
        print(f"[throughput] {section}: {name}: {_fmt(rate)}/s ({time.perf_counter() - t_start:.0f}s elapsed)",
              flush=True)
        write_json(results, args.out)

    with bundle.serving(args.env_precision):  # the rollouts cost what the env's plans cost
        results["meta"]["rollout_precision"] = bundle.precision
        record("rollout", bench_rollout(bundle, f"M=2, bundle sampler ({sampler.kind} {sampler.num_steps})", 2,
                                        sampler, args.batch, args.seed))
        if sampler != reference:
            record("rollout", bench_rollout(bundle, "M=2, reference sampler (heun 34)", 2, reference, args.batch,
                                            args.seed))
        record("rollout", bench_rollout(bundle, "M=0 (single-step ensemble)", 0, sampler, args.batch, args.seed))
    # as long as the other agents' runs, and never under 5 plan lengths: a short run charges the user for the
    # plans generated ahead that it ends before serving (at 64 envs, 2 threads: 0.72x the real env over 240 steps,
    # 0.87x over 1,000, same code)
    plan_length = args.env_horizon or default_plan_horizon(bundle.diffusion.horizon)
    plan_steps = args.plan_steps or max(args.steps, 5 * plan_length)
    results["meta"]["plan_steps"] = plan_steps
    for n in args.num_envs:
        record("real", bench_real(bundle.task.env_id, n, args.steps, args.seed))
    for n in args.num_envs:
        for agent in args.agents:
            steps = plan_steps if agent == "handle" else args.steps
            record("env", bench_env(bundle, n, agent, steps, args.seed, env_sampler, args.env_iterations,
                                    args.env_precision, args.env_horizon))
    results["meta"]["wall_s"] = time.perf_counter() - t_start

    print(markdown(results))
    write_json(results, args.out)
    plot(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
