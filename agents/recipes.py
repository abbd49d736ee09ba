"""What the example scripts share: the embedded default data, the DyDiff rollout source, and common flags.

- `ensure_dataset(id)` loads a local Minari dataset and, for the ids `dydiff-env collect` knows
  (dydiff/hopper/medium-v1, ...), collects it on first use with the shipped behaviour policy.
- `refuse_existing_run(out, args, can_resume)` stops an example before any work when its run directory already
  holds results and neither --overwrite nor (where the example can resume) --resume was given.
- `dydiff_rollout_fn(env)` adapts a `DydiffEnv` to `OfflineTrainer`'s `rollout_fn`: every K gradient steps
  the trainer hands over its current actor, which becomes the env's policy handle for one batched rollout
  from dataset states; the filtered, termination-cut transitions go into the model buffer.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import numpy as np
import torch

from dydiff_env.bundle import check_dataset_matches
from dydiff_env.config import RefineConfig
from dydiff_env.data import DEFAULT_DATASET_ID, DatasetNotFoundError, OfflineData, load_dataset
from dydiff_env.tasks import TASKS, get_task, preset_for_dataset

# --refine: the settings docs/fidelity.md compares
REFINE_CHOICES = {"default": RefineConfig(), "ungated": RefineConfig(max_probe_ratio=None),
                  "average": RefineConfig(blend="average")}


def ensure_dataset(dataset_id: str = DEFAULT_DATASET_ID, seed: int = 0) -> OfflineData:
    try:
        return load_dataset(dataset_id)
    except DatasetNotFoundError:
        from dydiff_env.cli import main as cli_main

        preset = preset_for_dataset(dataset_id)
        if preset is None:
            raise
        print(f"[data] {dataset_id} not found locally: collecting it in the real simulator "
              f"(`dydiff-env collect {preset}`), once")
        if cli_main(["collect", preset, "--seed", str(seed)]) != 0:
            raise RuntimeError(f"collecting {dataset_id} failed")
        return load_dataset(dataset_id)


def task_and_dataset(args: argparse.Namespace) -> tuple[str | None, str]:
    """(task, dataset id) from the shared flags: --dataset, or else the medium dataset of --task (default hopper).
    The task is None for a dataset id that names no known task (its env id is checked when it loads)."""
    if args.dataset is None:
        task = get_task(args.task or "hopper")
        return task.name, task.dataset_id("medium")
    try:
        dataset_task = get_task(args.dataset).name
    except ValueError:
        dataset_task = None
    if args.task is not None and dataset_task not in (None, args.task):
        raise SystemExit(f"error: --dataset {args.dataset} is a {dataset_task} dataset but --task is {args.task}; "
                         "pass one of them")
    return dataset_task or args.task, args.dataset


def default_run_dir(script: str, seed: int, real_only: bool = False, task: str | None = None) -> str:
    """runs/<script>-seed<seed> for Hopper, runs/<script>-<task>-seed<seed> for another task, with -nodydiff for a
    real-data-only run so it never overwrites the DyDiff run."""
    name = script if task in (None, "hopper") else f"{script}-{task}"
    return os.path.join("runs", f"{name}-seed{seed}{'-nodydiff' if real_only else ''}")


def run_results(out: str) -> list[str]:
    """What a run directory already holds (its entries, sorted); empty when it does not exist."""
    return sorted(os.listdir(out)) if os.path.isdir(out) else []


def refuse_existing_run(out: str, args: argparse.Namespace, can_resume: bool) -> None:
    """Exit with a one-line error when `out` holds results of an earlier run and the flags do not say what to do
    with them: --overwrite (replace them) or, for an example that can resume, --resume (continue the run)."""
    found = run_results(out)
    if not found or args.overwrite or (can_resume and args.resume):
        return
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    fix = "--overwrite to replace them or --resume to continue that run" if can_resume else "--overwrite to replace them"
    raise SystemExit(f"error: the run directory {out} already holds results ({shown}); pass {fix}, or choose another --out")


def dydiff_rollout_fn(env, start_states: str = "any") -> Callable:
    """`OfflineTrainer` rollout source backed by a `DydiffEnv` (see the module docstring); `start_states` is an
    `EnvConfig.start_states` mode."""
    from dydiff_env.policies import as_policy

    def rollout_fn(policy_fn: Callable, num_starts: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # the agents' actor functions take and return tensors: no numpy round trip
        result = env.rollout(num_starts, policy=as_policy(policy_fn, input="torch"), rng=rng, start_states=start_states)
        return result.transitions(kept_only=True)

    return rollout_fn


def add_shared_args(parser: argparse.ArgumentParser) -> None:
    """The flags every example has: data, bundle, seed, device, threads, evaluation, output, DyDiff settings."""
    parser.add_argument("--task", default=None, choices=sorted(TASKS),
                        help="the task: its medium dataset and shipped bundle are the defaults (default hopper)")
    parser.add_argument("--dataset", default=None,
                        help=f"Minari dataset id, collected on first use if a preset writes it (default: the task's "
                             f"medium dataset, {DEFAULT_DATASET_ID} for hopper)")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the bundle shipped for the task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores; pass 1 when another job shares the machine)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--eval-max-steps", type=int, default=None, help="cap evaluation episodes (default: 1000)")
    parser.add_argument("--out", default=None,
                        help="run directory (default: runs/<script>-seed<seed>, with -nodydiff for real-data-only runs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a run directory that already holds results, replacing them (without it such a "
                             "directory is refused before any work)")
    parser.add_argument("--iterations", type=int, default=2, help="DyDiff iterations M (0 = single-step model)")
    parser.add_argument("--sampler-steps", type=int, default=None, help="EDM sampler steps (default: the bundle's)")
    # stored, not the env's uniform default: with TD3+BC, rollouts from the stored sample (episode starts ~10x
    # their share of the dataset; the evaluation starts there too) scored 31.4 +- 2.5 over 3 seeds, uniform
    # dataset states 25.9 +- 2.6 (README, "TD3+BC with and without DyDiff")
    parser.add_argument("--start-states", default="stored", choices=("any", "episode_starts", "stored"),
                        help="where model rollouts start: uniformly over the bundle's stored sample of dataset states "
                             "(stored, default: episode starts about 10x more often than in the dataset), dataset "
                             "states drawn uniformly (any), or episode starts only")


def add_common_args(parser: argparse.ArgumentParser, steps: int, rollout_every: int, rollout_starts: int,
                    eval_every: int, refine: str = "default") -> None:
    """Flags of the examples built on `OfflineTrainer` (TD3+BC, Diffusion-QL)."""
    add_shared_args(parser)
    parser.add_argument("--steps", type=int, default=steps, help="gradient steps (the paper uses 1M)")
    parser.add_argument("--no-dydiff", action="store_true", help="same budget on real data only (the baseline)")
    parser.add_argument("--rollout-every", type=int, default=rollout_every, help="gradient steps between rollouts")
    parser.add_argument("--rollout-starts", type=int, default=rollout_starts, help="start states per rollout")
    parser.add_argument("--horizon", type=int, default=None,
                        help="rollout horizon (default: dydiff_rollout's, 3/4 of the bundle's diffusion window)")
    parser.add_argument("--refine", default=refine, choices=sorted(REFINE_CHOICES),
                        help="how DyDiff combines diffusion samples with the single-step states (docs/fidelity.md): "
                             "default (the env's: the gated uncertainty blend), ungated (the blend without its gate), "
                             f"average (the paper's 50/50 rule); default here: {refine}")
    parser.add_argument("--real-fraction", type=float, default=0.6)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--log-every", type=int, default=1_000, help="gradient steps between metrics rows")
    parser.add_argument("--baseline", default=None,
                        help="a real-data-only run directory whose scores the learning curve shows for reference "
                             "(default: this script's --no-dydiff run of the same seed, when it exists)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint (a fresh run when there is none)")


def run_offline(name: str, make_agent: Callable[[OfflineData, str], object], args: argparse.Namespace) -> dict:
    """Build data, env and trainer from the common flags, train, and print the real-simulator score."""
    from dataclasses import replace

    from dydiff_env.env import DydiffEnv, resolve_bundle
    from dydiff_env.rollout import default_horizon

    from .trainer import OfflineTrainer, TrainerConfig

    task, dataset_id = task_and_dataset(args)
    out = args.out or default_run_dir(name, args.seed, real_only=args.no_dydiff, task=task)
    if args.overwrite and args.resume:
        raise SystemExit("error: --overwrite starts the run over and --resume continues it; pass one of them")
    refuse_existing_run(out, args, can_resume=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = ensure_dataset(dataset_id, seed=args.seed)
    rollout_fn = None
    if not args.no_dydiff:
        bundle = resolve_bundle(args.bundle, data.env_id or "hopper", args.device)
        # the rollouts' horizon is dydiff_rollout's (3/4 of the window), not the env's plan length (the whole
        # window): the paper's rule, which the main job uses, is least accurate in the window's last rows
        horizon = args.horizon or default_horizon(bundle.diffusion.horizon)
        env = DydiffEnv(num_envs=1, bundle=bundle, horizon=horizon, num_iterations=args.iterations,
                        device=args.device, refine=REFINE_CHOICES[args.refine])
        if args.sampler_steps:
            env.sampler = replace(env.sampler, num_steps=args.sampler_steps)
        check_dataset_matches(env.bundle, data)  # warns when the bundle learned another version of this dataset
        rollout_fn = dydiff_rollout_fn(env, args.start_states)
    config = TrainerConfig(total_steps=args.steps, real_fraction=args.real_fraction, rollout_every=args.rollout_every,
                           rollout_starts=args.rollout_starts, eval_every=args.eval_every,
                           eval_episodes=args.eval_episodes, eval_max_episode_steps=args.eval_max_steps,
                           log_every=args.log_every, seed=args.seed, device=args.device, out_dir=out,
                           checkpoint_every=max(1, min(args.steps, 10_000)), overwrite=args.overwrite,
                           baseline_dir=args.baseline or default_run_dir(name, args.seed, real_only=True, task=task))
    torch.manual_seed(args.seed)
    agent = make_agent(data, args.device)
    summary = OfflineTrainer(agent, data, config, rollout_fn).train(resume=args.resume)
    last, best = summary.get("last_eval") or {}, summary.get("best_eval") or {}
    label = f"D4RL-normalised on {data.env_id}"
    print(json.dumps({"run": out, "dydiff": not args.no_dydiff, "steps": args.steps,
                      "last_score": last.get("normalized_mean"), "best_score": best.get("normalized_mean"),
                      "last_return": last.get("return_mean"), "score_label": label}, indent=1))
    return summary
