"""`dydiff-env` command line: collect datasets, train behaviour policies and bundle models, inspect bundles,
generate datasets of DyDiff rollouts.

    dydiff-env collect hopper-medium                  # ~200k steps of the shipped medium actor -> Minari
    dydiff-env train all --dataset dydiff/hopper/medium-v1 --out runs/hopper-medium --preset cpu
    dydiff-env train all ... --resume                 # continue after an interruption
    torchrun --nproc_per_node=4 -m dydiff_env.cli train all ...   # data-parallel, effective batch 4x
    dydiff-env train distill --bundle runs/hopper-medium   # a few-step student of its diffusion model
    dydiff-env info runs/hopper-medium                # what a bundle holds, with its holdout errors
    dydiff-env generate --bundle runs/hopper-medium --policy bc --starts 100000 --out dydiff/hopper/generated-v0
    dydiff-env behaviour train --steps 300000 --out runs/sac-hopper
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .config import START_STATE_MODES
from .data import DEFAULT_DATASET_ID
from .tasks import COLLECT_PRESETS

# Module level imports stay light (no torch): `dydiff-env --help` and argument errors must answer at once.
# Each command imports what it computes with.


# argument types: argparse reports a bad value as a usage error (exit code 2), never as a traceback


def integer_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return integer_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return integer_at_least(text, 0)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def channel_widths(text: str) -> tuple[int, ...]:
    """'64,128,256' -> (64, 128, 256): U-Net widths per resolution, multiples of 8 (its GroupNorm has 8 groups)."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(w < 8 or w % 8 for w in widths):
        raise argparse.ArgumentTypeError(f"must be comma-separated multiples of 8 such as 64,128,256, got {text!r}")
    return widths


def check_window(rows: int, diffusion) -> None:
    """Refuse, before any data is loaded, a diffusion window the preset's U-Net cannot take (each of its
    downsamplings halves the window) or one shorter than the real rows every training window must hold."""
    from .models import window_multiple

    factor = window_multiple(diffusion.channels)
    if rows % factor:
        raise ValueError(f"--diffusion-horizon {rows} must be divisible by {factor} for U-Net channels "
                         f"{tuple(diffusion.channels)}: use {rows + factor - rows % factor}")
    if rows < diffusion.min_valid_rows:
        raise ValueError(f"--diffusion-horizon {rows} is below the preset's {diffusion.min_valid_rows} real rows per "
                         f"training window: use at least {diffusion.min_valid_rows}")


def torch_device(text: str) -> str:
    """A torch device that this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from err
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise argparse.ArgumentTypeError(f"{device.type} is not available on this machine; use --device cpu")
    return text


def gym_env_id(text: str) -> str:
    """An env id that Gymnasium has registered."""
    import gymnasium

    try:
        gymnasium.spec(text)
    except gymnasium.error.Error as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def collect_target(args) -> str:
    """The dataset id `collect` will write, from the flags alone (no actor loaded yet)."""
    from .tasks import get_task

    if args.actor:
        return args.dataset_id or f"dydiff/{get_task(args.env).name}/custom-v0"
    return args.dataset_id or COLLECT_PRESETS[args.name].dataset_id


def cmd_collect(args) -> int:
    if not args.actor and args.name not in COLLECT_PRESETS:
        print(f"error: unknown collection '{args.name}'; choose one of {sorted(COLLECT_PRESETS)} "
              "or pass --actor SNAPSHOT --env ENV_ID", file=sys.stderr)
        return 2
    from .data import dataset_lock, refuse_existing_dataset

    dataset_id = collect_target(args)
    refuse_existing_dataset(dataset_id, args.overwrite)  # now, not after minutes of collection
    # one writer per dataset id: the lock is held from the check before collecting to the write after it
    with dataset_lock(dataset_id):
        return collect_and_write(args, dataset_id)


def collect_and_write(args, dataset_id: str) -> int:
    import numpy as np
    import torch

    from .behaviour import GaussianActor, load_shipped_actor
    from .data import collect_episodes, load_dataset, refuse_existing_dataset, write_minari_dataset
    from .tasks import get_task

    refuse_existing_dataset(dataset_id, args.overwrite)  # again under the lock: another writer may just have finished
    set_threads(args.threads)
    if args.actor:
        task = get_task(args.env)
        actor = GaussianActor.load(args.actor)
        if (actor.obs_dim, actor.act_dim) != (task.obs_dim, task.act_dim):
            raise ValueError(f"--actor {args.actor} maps {actor.obs_dim} observations to {actor.act_dim} actions, "
                             f"but {task.env_id} has {task.obs_dim} and {task.act_dim}; pass the actor's env as --env")
        actors = [("custom", actor)]
        description = f"{task.env_id}, actor {args.actor}"
        num_steps = args.steps or 200_000
    else:
        p = COLLECT_PRESETS[args.name]
        task = get_task(p.task)
        actors = [(name, None if name == "random" else load_shipped_actor(p.task, name)) for name in p.actors]
        description, num_steps = p.description, args.steps or p.num_steps
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    buffers = []
    share = int(np.ceil(num_steps / len(actors)))
    for i, (name, actor) in enumerate(actors):
        if actor is None:
            def policy(obs):
                return rng.uniform(-1, 1, size=(obs.shape[0], task.act_dim)).astype(np.float32)
        else:
            def policy(obs, actor=actor):
                return actor.act(obs, deterministic=args.deterministic, generator=generator)
        part = collect_episodes(task.env_id, policy, share, seed=args.seed * 1_000_003 + i * 100_000)
        buffers += part
    buffers = [dataclasses.replace(buf, id=i) for i, buf in enumerate(buffers)]  # ids unique across actors
    write_minari_dataset(dataset_id, task.env_id, buffers, description=description, overwrite=args.overwrite)
    data = load_dataset(dataset_id)
    returns = data.episode_returns
    print(json.dumps({"dataset_id": dataset_id, "transitions": len(data), "episodes": int(len(returns)),
                      "return_mean": round(float(returns.mean()), 1), "return_std": round(float(returns.std()), 1),
                      "normalized_score": round(float(task.normalized_score(returns).mean()), 1)}))
    return 0


def cmd_generate(args) -> int:
    from .config import FilterConfig
    from .generate import GenerateConfig, GenerationAborted, generate_dataset, process_group, ranks_from_environment

    config = GenerateConfig(
        bundle=args.bundle, policy=args.policy, starts=args.starts, out=args.out, horizon=args.horizon,
        iterations=args.iterations, chunk_size=args.chunk, seed=args.seed, start_states=args.start_states,
        filter=FilterConfig(mode=args.filter, keep_fraction=args.keep_fraction), sampler_steps=args.sampler_steps,
        deterministic=args.deterministic, device=args.device, overwrite=args.overwrite)
    ranks = ranks_from_environment()
    set_threads(args.threads)
    try:
        with process_group(ranks):
            summary = generate_dataset(config, ranks)
    except GenerationAborted as err:
        print(error_line(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written (run the command again to generate the dataset)", file=sys.stderr)
        return 130
    if summary is not None:
        print(json.dumps(summary))
    return 0


def cmd_train(args) -> int:
    from . import distributed
    from .config import preset
    from .data import load_dataset
    from .training import MODEL_KINDS, train_models

    set_threads(args.threads)
    config = preset(args.preset)
    config.seed = args.seed
    if args.checkpoint_every is not None:
        config.checkpoint_every_s = args.checkpoint_every
    if args.diffusion_steps is not None:
        config.diffusion.train_steps = args.diffusion_steps
    if args.diffusion_action_noise is not None:
        config.diffusion.action_noise = args.diffusion_action_noise
    if args.diffusion_channels is not None:
        config.diffusion.channels = args.diffusion_channels
    if args.diffusion_horizon is not None:
        check_window(args.diffusion_horizon, config.diffusion)
        config.diffusion.horizon = args.diffusion_horizon
    if args.model == "distill":
        return cmd_distill(args, config)
    data = load_dataset(args.dataset or DEFAULT_DATASET_ID)
    kinds = list(MODEL_KINDS) if args.model == "all" else [args.model]
    try:  # under torchrun: data-parallel, rank 0 writes and prints
        summaries = train_models(kinds, data, args.out, config, device=args.device, resume=args.resume,
                                 overwrite=args.overwrite)
        leader = distributed.is_leader()
    finally:
        distributed.shutdown()
    if not leader:
        return 0
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "teacher_forced_state_error"}
                      for k, v in summaries.items()}, indent=1))
    return 0


def cmd_distill(args, config) -> int:
    """`train distill`: the bundle's student, on the bundle's own dataset unless --dataset names another."""
    from .bundle import recorded_dataset_id
    from .data import load_dataset
    from .training import distill_student

    config.student.seed = args.seed
    if args.distill_steps is not None:
        config.student.train_steps = args.distill_steps
    data = load_dataset(args.dataset or recorded_dataset_id(args.out) or DEFAULT_DATASET_ID)
    summaries = distill_student(args.out, data, config, device=args.device, resume=args.resume)
    print(json.dumps(summaries, indent=1))
    return 0


def cmd_info(args) -> int:
    from .bundle import load_bundle

    b = load_bundle(args.bundle)
    m = b.meta
    out = {k: m[k] for k in ("format_version", "package_version", "env_id", "dataset_id", "dataset_hash",
                             "dataset_transitions", "dataset_mean_return", "software_versions") if k in m}
    out["models"] = {k: {kk: vv for kk, vv in v.items() if kk != "teacher_forced_state_error"}
                     for k, v in m["models"].items()}
    out["start_states"] = int(len(b.start_states.get("observations", [])))
    print(json.dumps(out, indent=1))
    return 0


def cmd_export(args) -> int:
    from .bundle import export_bundle

    sampler = None
    if args.sampler is not None:
        kind, _, steps = args.sampler.partition(":")
        if not steps.isdigit():
            raise SystemExit(f"--sampler takes kind:steps (e.g. student:2 or heun:34), got {args.sampler!r}")
        sampler = {"kind": kind, "num_steps": int(steps)}
    print(export_bundle(args.src, args.dst, half=not args.float32, sampler=sampler))
    return 0


def cmd_behaviour_train(args) -> int:
    from .behaviour import SACTrainConfig, train_sac

    set_threads(args.threads)
    train_sac(args.out, SACTrainConfig(env_id=args.env, total_steps=args.steps, snapshot_every=args.snapshot_every,
                                       seed=args.seed))
    return 0


def cmd_behaviour_eval(args) -> int:
    from .behaviour import GaussianActor, evaluate_actor

    set_threads(args.threads)
    actor = GaussianActor.load(args.actor)
    for det in (False, True):
        mean, std = evaluate_actor(actor, args.env, args.episodes, seed=args.seed, deterministic=det)
        print(f"{'deterministic' if det else 'stochastic'}: return {mean:.1f} +- {std:.1f} over {args.episodes} episodes")
    return 0


THREADS_HELP = ("torch intra-op threads (default 1: the fastest choice when another job shares a small machine, where "
                "two threads can run 3x slower; on an idle machine more threads speed up training, see "
                "benchmarks/threads.py)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """The one --threads flag of every command that computes."""
    parser.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dydiff-env", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="run a behaviour policy in the real simulator and write a Minari dataset")
    p.add_argument("name", nargs="?", default="hopper-medium",
                   help=f"the collection to make, one of {sorted(COLLECT_PRESETS)} (default hopper-medium)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="transitions to collect, rounded up to whole episodes (default: the collection's, 200000 "
                        "for --actor)")
    p.add_argument("--dataset-id", default=None,
                   help="Minari id to write (default: the collection's, e.g. dydiff/hopper/medium-v1; "
                        "dydiff/<task>/custom-v0 for --actor)")
    p.add_argument("--actor", default=None, help="a behaviour snapshot (.safetensors) instead of a shipped one")
    p.add_argument("--env", default="Hopper-v5", help="env of --actor (default Hopper-v5)")
    p.add_argument("--deterministic", action="store_true", help="mean actions instead of sampling (D4RL samples)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the episodes and the actions (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a local dataset of the same id (without it an existing id is refused at once)")
    add_threads_option(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("generate", help="DyDiff rollouts of a policy in a bundle -> a Minari dataset (data "
                                        "augmentation); data-parallel under torchrun")
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--policy", required=True,
                   help="the policy that acts: bc (the bundle's behaviour-cloning policy), snapshot:PATH (an actor "
                        ".safetensors, e.g. dydiff_env/assets/behaviour/hopper-expert.safetensors) or module:func "
                        "(anything dydiff_env.as_policy accepts)")
    p.add_argument("--starts", type=positive_int, required=True, help="trajectories to generate (start states)")
    p.add_argument("--out", required=True, help="Minari dataset id to write, e.g. dydiff/hopper/generated-v0")
    p.add_argument("--horizon", type=positive_int, default=None,
                   help="transitions per trajectory (default: three quarters of the diffusion window)")
    p.add_argument("--iterations", type=non_negative_int, default=2,
                   help="DyDiff refinement rounds (default 2; 0: single-step ensemble rollouts)")
    p.add_argument("--chunk", type=positive_int, default=1024,
                   help="starts per chunk, each one rollout with its own seed (default 1024); the dataset depends "
                        "on it, not on the number of processes")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the start states and rollouts (default 0)")
    p.add_argument("--start-states", choices=START_STATE_MODES, default="any",
                   help="which bundle start states: any dataset row (default), episode starts only, or the stored "
                        "sample uniformly")
    p.add_argument("--filter", choices=["hardmax", "softmax", "none"], default="hardmax",
                   help="which trajectories of a chunk are kept, by predicted return (default hardmax)")
    p.add_argument("--keep-fraction", type=float, default=0.6,
                   help="fraction of each chunk's trajectories kept by the filter (default 0.6)")
    p.add_argument("--sampler-steps", type=positive_int, default=None,
                   help="diffusion sampler steps (default: the bundle's)")
    p.add_argument("--deterministic", action="store_true",
                   help="mean actions of bc / snapshot policies (default: sampled, like the data)")
    p.add_argument("--device", type=torch_device, default="cpu",
                   help="torch device: cpu (default), cuda (under torchrun: each rank's own GPU), cuda:1, mps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a local dataset of the same id (without it an existing id is refused at once)")
    add_threads_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train bundle models on a Minari dataset")
    p.add_argument("model", choices=["all", "diffusion", "dynamics", "reward", "bc", "distill"],
                   help="which model to train: all four (a complete bundle) or one of them; distill: a few-step "
                        "student of the bundle's diffusion model (docs/samplers.md)")
    p.add_argument("--dataset", default=None,
                   help=f"Minari dataset id (default {DEFAULT_DATASET_ID}; for distill, the bundle's dataset)")
    p.add_argument("--out", "--bundle", dest="out", required=True, help="bundle directory (--bundle is the same)")
    p.add_argument("--preset", default="cpu", choices=["tiny", "cpu", "paper"],
                   help="model sizes and training budgets: paper (the reference implementation's), cpu (scaled "
                        "down for CPUs, default), tiny (for tests)")
    p.add_argument("--resume", action="store_true",
                   help="skip the models --out holds intact (sha256 checked) and continue the others from their checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace models of another architecture (another --preset) than the bundle in --out records")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of initialisation and batches (default 0)")
    p.add_argument("--device", type=torch_device, default="cpu",
                   help="torch device: cpu (default), cuda (under torchrun: each rank's own GPU), cuda:1, mps")
    add_threads_option(p)
    p.add_argument("--checkpoint-every", type=non_negative_float, default=None,
                   help="seconds between checkpoints (default: the preset's)")
    p.add_argument("--diffusion-steps", type=non_negative_int, default=None, help="override the preset's diffusion steps")
    p.add_argument("--diffusion-channels", type=channel_widths, default=None,
                   help="override the preset's U-Net widths, e.g. 64,128,256 (another architecture: in an existing "
                        "bundle, with --overwrite)")
    p.add_argument("--diffusion-horizon", type=positive_int, default=None,
                   help="override the preset's diffusion window in rows, e.g. 100 as the reference (another "
                        "architecture: in an existing bundle, with --overwrite)")
    p.add_argument("--diffusion-action-noise", type=non_negative_float, default=None,
                   help="std of noise on the diffusion model's conditioned actions in training, unit scale "
                        "(default: the preset's, 0; docs/fidelity.md, lever 3)")
    p.add_argument("--distill-steps", type=non_negative_int, default=None,
                   help="override the preset's student training steps (train distill)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="summarise a bundle")
    p.add_argument("bundle", help="bundle directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="copy a bundle without checkpoints, fp16 weights by default")
    p.add_argument("src", help="bundle directory to copy")
    p.add_argument("dst", help="new bundle directory")
    p.add_argument("--float32", action="store_true", help="keep float32 weights (default: fp16, half the size)")
    p.add_argument("--sampler", default=None, metavar="KIND:STEPS",
                   help="make this the copy's default sampler (train_config.sampler), e.g. student:2 for the "
                        "distilled student with 2 calls (default: the source's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("behaviour", help="behaviour policies (SB3 SAC in the real simulator)")
    bsub = p.add_subparsers(dest="behaviour_command", required=True)
    b = bsub.add_parser("train", help="train SAC and export actor snapshots with their returns")
    b.add_argument("--env", type=gym_env_id, default="Hopper-v5", help="Gymnasium env id (default Hopper-v5)")
    b.add_argument("--steps", type=positive_int, default=300_000, help="SAC env steps (default 300000)")
    b.add_argument("--snapshot-every", type=positive_int, default=10_000,
                   help="env steps between actor snapshots (default 10000)")
    b.add_argument("--out", required=True, help="directory for the snapshots and their returns")
    b.add_argument("--seed", type=non_negative_int, default=0, help="seed of SAC and the env (default 0)")
    add_threads_option(b)
    b.set_defaults(func=cmd_behaviour_train)
    b = bsub.add_parser("eval", help="return of an actor snapshot in the real simulator")
    b.add_argument("actor", help="actor snapshot (.safetensors)")
    b.add_argument("--env", type=gym_env_id, default="Hopper-v5", help="Gymnasium env id (default Hopper-v5)")
    b.add_argument("--episodes", type=positive_int, default=10, help="episodes per evaluation (default 10)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="seed of the first episode (default 0)")
    add_threads_option(b)
    b.set_defaults(func=cmd_behaviour_eval)
    return parser


def error_line(err: BaseException) -> str:
    """What the CLI prints for a refused input: one line, never a traceback."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return f"error: {message}"


TRACEBACK_VARIABLE = "DYDIFF_ENV_TRACEBACK"  # set to 1 to see the traceback of an unexpected error


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .bundle import BundleError
    from .checkpoint import CheckpointError
    from .data import DatasetNotFoundError
    from .distributed import LeaderFailed, after_error_line
    from .writers import LockedError

    try:
        return args.func(args)
    except (BundleError, CheckpointError, DatasetNotFoundError, LockedError, LeaderFailed, OSError) as err:
        # a bad bundle, checkpoint, dataset or path, or another writer in the way (on rank 0, under torchrun)
        print(error_line(err), file=sys.stderr, flush=True)
        after_error_line(err)
        return 1
    except (ValueError, TypeError) as err:  # arguments refused further down (an unknown env id, a bad actor file)
        print(error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: still one line, with the way to the traceback
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"{error_line(err)} ({type(err).__name__}, unexpected: please report it; set {TRACEBACK_VARIABLE}=1 "
              "to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
