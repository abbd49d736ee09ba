"""Offline rollout generation (SynthER-style data augmentation): DyDiff rollouts of a policy from a bundle's
start states, written as a Minari dataset, on one process or data-parallel under torchrun.

    dydiff-env generate --bundle runs/hopper-medium --policy bc --starts 100000 --out dydiff/hopper/generated-v0
    torchrun --nproc_per_node=4 -m dydiff_env.cli generate ...      # 4 processes, the same dataset

The starts are split into chunks of `chunk_size` (`plan_chunks`). Chunk i draws its start states and every
random number of its rollout from its own seed `chunk_seed(seed, i)`, so the dataset is fixed by (seed, starts,
chunk_size, the settings) and never depends on how many processes ran the chunks. Each chunk is one
`dydiff_rollout` call (so the trajectory filter ranks the trajectories of one chunk); each kept trajectory
becomes one episode of its valid steps (`RolloutResult.transitions()`), whose last step has terminations True
where the model predicted a termination and truncations True otherwise.

Every process writes each of its chunks as a safetensors file into a hidden shard directory of the Minari
root (`.dydiff-env-shards/<id>/`, which Minari does not read as a namespace); process 0 then appends the
chunks in chunk order to the dataset and deletes the directory. Under torchrun (WORLD_SIZE > 1) rank r runs
the chunks i with i % world_size == r, and the ranks agree through a gloo process group after each phase, so
an error on one rank stops all of them instead of leaving the others waiting. Rank 0 holds
`dataset_lock(out)` from the check that the id is free until the dataset is written. All ranks must see the
same Minari root (one machine, or a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .config import START_STATE_MODES, FilterConfig, RefineConfig, SamplerConfig
from .data import check_dataset_id, dataset_lock, datasets_path, refuse_existing_dataset, write_minari_dataset
from .rollout import Policy, RolloutResult, behaviour_policy, dydiff_rollout
from .writers import write_atomically

SHARD_DIRECTORY = ".dydiff-env-shards"
ALGORITHM_NAME = "dydiff-env generate"
METADATA_KEY = "dydiff_env_generate"  # the key of the generation settings in the dataset's metadata.json
# how long a rank waits for the others at a phase boundary (rank 0 merges while the others wait)
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=12)
POLICY_SPEC_HELP = ("bc (the bundle's behaviour-cloning policy), snapshot:PATH (an actor .safetensors such as "
                    "dydiff_env/assets/behaviour/hopper-expert.safetensors) or module:func (anything "
                    "dydiff_env.as_policy accepts)")


class GenerationAborted(RuntimeError):
    """Another rank failed; its own error says why."""


# ------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PolicySpec:
    """A parsed --policy: kind "bc", "snapshot" (target: a file) or "callable" (target: module:attr)."""

    kind: str
    target: str = ""

    def __str__(self) -> str:
        return {"bc": "bc", "snapshot": f"snapshot:{self.target}", "callable": self.target}[self.kind]


MODULE_ATTRIBUTE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def parse_policy_spec(text: str) -> PolicySpec:
    """Check the form of a --policy (nothing is loaded here); raises ValueError naming the accepted forms."""
    if text == "bc":
        return PolicySpec("bc")
    if text.startswith("snapshot:") and len(text) > len("snapshot:"):
        return PolicySpec("snapshot", text[len("snapshot:"):])
    if MODULE_ATTRIBUTE.fullmatch(text):
        return PolicySpec("callable", text)
    raise ValueError(f"unknown policy '{text}'; use {POLICY_SPEC_HELP}")


@dataclass(frozen=True)
class GenerateConfig:
    """What `dydiff-env generate` makes. horizon None: the rollout's default (three quarters of the diffusion
    window); sampler_steps None: the bundle's sampler; deterministic: mean actions of bc / snapshot policies
    (default: sampled, like the data, from each chunk's generator)."""

    bundle: str
    policy: str
    starts: int
    out: str
    horizon: int | None = None
    iterations: int = 2
    chunk_size: int = 1024
    seed: int = 0
    start_states: str = "any"
    filter: FilterConfig = field(default_factory=FilterConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    sampler_steps: int | None = None
    deterministic: bool = False
    device: str = "cpu"
    overwrite: bool = False

    def __post_init__(self):
        for name, low in (("starts", 1), ("chunk_size", 1), ("iterations", 0), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("horizon", "sampler_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None (the default), got {getattr(self, name)}")
        if self.start_states not in START_STATE_MODES:
            raise ValueError(f"start_states must be one of {list(START_STATE_MODES)}, got {self.start_states!r}")
        parse_policy_spec(self.policy)


# --------------------------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk `index`: starts first_start .. first_start + count - 1, all its randomness from `seed`."""

    index: int
    first_start: int
    count: int
    seed: int


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk `index` of a run seeded with `seed` (independent streams per chunk, 63 bits)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def plan_chunks(starts: int, chunk_size: int, seed: int) -> list[ChunkPlan]:
    """The chunks of a run, in order; the last one holds the remainder."""
    if starts < 1 or chunk_size < 1:
        raise ValueError(f"starts and chunk_size must be >= 1, got {starts} and {chunk_size}")
    return [ChunkPlan(i, first, min(chunk_size, starts - first), chunk_seed(seed, i))
            for i, first in enumerate(range(0, starts, chunk_size))]


def chunks_of_rank(plans: list[ChunkPlan], rank: int, world_size: int) -> list[ChunkPlan]:
    """The chunks rank `rank` of `world_size` runs: those with index % world_size == rank."""
    return [plan for plan in plans if plan.index % world_size == rank]


@dataclass
class ChunkEpisodes:
    """The kept trajectories of one chunk: flat transitions in `RolloutResult.transitions()` order and the
    number of steps of each trajectory (every one > 0), in trajectory order."""

    obs: np.ndarray  # (N, obs_dim) float32
    actions: np.ndarray  # (N, act_dim) float32
    rewards: np.ndarray  # (N,) float32
    next_obs: np.ndarray  # (N, obs_dim) float32
    terminated: np.ndarray  # (N,) bool, True only at the last step of an episode
    episode_lengths: np.ndarray  # (E,) int64
    horizon: int  # transitions per trajectory of the rollout

    def __len__(self) -> int:
        return len(self.rewards)


def rollout_episodes(result: RolloutResult) -> ChunkEpisodes:
    """The kept, valid steps of a rollout as episodes (one per kept trajectory with at least one valid step)."""
    steps = result.valid & result.kept[:, None]
    if bool((steps[:, 1:] & ~steps[:, :-1]).any()):
        raise AssertionError("a trajectory's valid steps are not a prefix of it; the rollout changed its rules")
    lengths = steps.sum(1).cpu().numpy().astype(np.int64)
    flat = result.transitions()
    return ChunkEpisodes(flat["obs"], flat["actions"], flat["rewards"], flat["next_obs"],
                         flat["terminated"].astype(bool), lengths[lengths > 0], int(result.obs.shape[1]))


def episode_buffers(chunk: ChunkEpisodes, first_id: int = 0) -> list:
    """Minari `EpisodeBuffer`s of a chunk's episodes, numbered from `first_id`. An episode's observations are
    its step observations plus the last next observation; it ends with terminations True after a predicted
    termination, truncations True otherwise."""
    from minari.data_collector import EpisodeBuffer

    buffers = []
    ends = np.cumsum(chunk.episode_lengths)
    for i, (start, end) in enumerate(zip(ends - chunk.episode_lengths, ends)):
        terminations = chunk.terminated[start:end].copy()
        truncations = np.zeros_like(terminations)
        truncations[-1] = not terminations[-1]
        buffers.append(EpisodeBuffer(
            id=first_id + i, observations=np.concatenate([chunk.obs[start:end], chunk.next_obs[end - 1:end]]),
            actions=chunk.actions[start:end], rewards=chunk.rewards[start:end], terminations=terminations,
            truncations=truncations))
    return buffers


PolicyFactory = Callable[[torch.Generator], Policy]


def policy_factory(spec: PolicySpec, bundle, deterministic: bool = False) -> PolicyFactory:
    """A function from a chunk's generator to the chunk's policy. bc and snapshot policies sample their actions
    from that generator (unless deterministic); a module:func policy is loaded once and draws whatever
    randomness it uses itself, so its dataset is reproducible only if it is deterministic."""
    if spec.kind == "bc":
        bundle.require("bc")
        return lambda generator: behaviour_policy(bundle, generator, deterministic)
    if spec.kind == "snapshot":
        from .behaviour import snapshot_policy

        def make(generator: torch.Generator) -> Policy:
            return snapshot_policy(spec.target, bundle.device, deterministic, generator, bundle.obs_dim, bundle.act_dim)

        make(torch.Generator())  # a missing or mismatched snapshot is refused before the first chunk
        return make
    from .policies import as_policy

    module_name, attribute = spec.target.split(":", 1)
    try:
        obj = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"policy '{spec.target}' cannot be loaded ({err}); pass module:func of an importable "
                         "module (on PYTHONPATH), or use bc or snapshot:PATH") from err
    policy = as_policy(obj)
    return lambda generator: policy


def rollout_sampler(bundle, sampler_steps: int | None) -> SamplerConfig:
    """The bundle's sampler, with `sampler_steps` steps when given."""
    sampler = bundle.config.sampler
    return sampler if sampler_steps is None else dataclasses.replace(sampler, num_steps=sampler_steps)


def generate_chunk(bundle, plan: ChunkPlan, make_policy: PolicyFactory, config: GenerateConfig,
                   sampler: SamplerConfig) -> ChunkEpisodes:
    """One chunk: `plan.count` start states drawn with numpy's default_rng(plan.seed), then one `dydiff_rollout`
    whose every random number (policy, ensemble, diffusion, filter) comes from torch.Generator seeded plan.seed."""
    rng = np.random.default_rng(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    start_obs = bundle.sample_start_obs(plan.count, rng, config.start_states)
    result = dydiff_rollout(bundle, start_obs, make_policy(generator), horizon=config.horizon,
                            num_iterations=config.iterations, sampler=sampler, filter=config.filter,
                            generator=generator, chunk_size=plan.count, refine=config.refine)
    return rollout_episodes(result)


# -------------------------------------------------------------------------------------------- chunk files

CHUNK_ARRAYS = ("obs", "actions", "rewards", "next_obs", "terminated", "episode_lengths")


def shard_directory(dataset_id: str) -> Path:
    """Where the chunk files of a run that writes `dataset_id` live until they are merged."""
    return Path(datasets_path()) / SHARD_DIRECTORY / dataset_id.replace("/", "--")


def chunk_path(directory: Path, index: int) -> Path:
    return directory / f"chunk-{index:06d}.safetensors"


def save_chunk(path: Path, chunk: ChunkEpisodes) -> None:
    """Write a chunk file atomically (safetensors, no pickle)."""
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(getattr(chunk, name)) for name in CHUNK_ARRAYS}
    write_atomically(path, save(arrays, metadata={"horizon": str(chunk.horizon)}))


def load_chunk(path: Path) -> ChunkEpisodes:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"chunk file {path} is missing: the process that ran this chunk did not finish; "
                                "run the command again")
    with safe_open(str(path), "np") as f:
        arrays = {name: f.get_tensor(name) for name in CHUNK_ARRAYS}
        horizon = int((f.metadata() or {})["horizon"])
    return ChunkEpisodes(**arrays, horizon=horizon)


# ------------------------------------------------------------------------------------------------- merging


def generation_metadata(config: GenerateConfig, bundle_meta: dict, horizon: int, sampler: SamplerConfig) -> dict:
    """What the dataset's metadata.json records about how it was generated (JSON values only)."""
    from . import __version__

    return {
        "bundle": str(Path(config.bundle).resolve()), "bundle_dataset_id": bundle_meta.get("dataset_id"),
        "bundle_dataset_hash": bundle_meta.get("dataset_hash"), "env_id": bundle_meta.get("env_id"),
        "policy": config.policy, "deterministic": config.deterministic, "iterations": config.iterations,
        "horizon": horizon, "starts": config.starts, "chunk_size": config.chunk_size, "seed": config.seed,
        "start_states": config.start_states, "filter": dataclasses.asdict(config.filter),
        "refine": dataclasses.asdict(config.refine), "sampler": dataclasses.asdict(sampler),
        "package_version": __version__,
    }


def describe_generation(meta: dict) -> str:
    """The dataset description: one readable sentence with the settings."""
    mode, fraction = meta["filter"]["mode"], meta["filter"]["keep_fraction"]
    kept = "none (all kept)" if mode == "none" else f"{mode} {fraction:g}"
    return (f"DyDiff rollouts of policy {meta['policy']} in bundle {meta['bundle']} (trained on "
            f"{meta['bundle_dataset_id']}, hash {meta['bundle_dataset_hash']}): {meta['starts']} starts "
            f"({meta['start_states']}) in chunks of {meta['chunk_size']}, horizon {meta['horizon']}, "
            f"{meta['iterations']} iterations, {meta['sampler']['num_steps']} sampler steps, filter {kept}, "
            f"seed {meta['seed']}; dydiff-env {meta['package_version']} generate. Settings under "
            f"'{METADATA_KEY}' in metadata.json.")


def merge_chunks(directory: Path, plans: list[ChunkPlan], config: GenerateConfig, bundle_meta: dict,
                 sampler: SamplerConfig) -> dict:
    """Append the chunk files to the dataset `config.out` in chunk order (one chunk in memory at a time);
    returns a summary. A dataset left half written by an error is deleted."""
    import minari

    dataset, episodes, transitions, terminated, returns = None, 0, 0, 0, []
    try:
        for plan in plans:
            chunk = load_chunk(chunk_path(directory, plan.index))
            buffers = episode_buffers(chunk, first_id=episodes)
            if not buffers:
                continue
            if dataset is None:
                meta = generation_metadata(config, bundle_meta, chunk.horizon, sampler)
                with warnings.catch_warnings():  # Minari's note that the env also serves for evaluation
                    warnings.filterwarnings("ignore", message=".*eval_env.*", category=UserWarning)
                    dataset = write_minari_dataset(config.out, bundle_meta["env_id"], buffers,
                                                   description=describe_generation(meta),
                                                   algorithm_name=ALGORITHM_NAME, overwrite=config.overwrite,
                                                   metadata={METADATA_KEY: meta})
            else:
                dataset.update_dataset_from_buffer(buffers)
            episodes += len(buffers)
            transitions += len(chunk)
            terminated += int(chunk.terminated.sum())
            returns.append(np.add.reduceat(chunk.rewards.astype(np.float64),
                                           np.cumsum(chunk.episode_lengths) - chunk.episode_lengths))
    except BaseException:
        if dataset is not None:
            minari.delete_dataset(config.out)
        raise
    if dataset is None:
        raise ValueError(f"none of the {config.starts} trajectories has a valid step (each ended in a model "
                         "failure at its first step), so there is no dataset to write; check the bundle")
    returns = np.concatenate(returns)
    return {"dataset_id": config.out, "transitions": transitions, "episodes": episodes,
            "terminated_episodes": terminated, "chunks": len(plans),
            "predicted_return_mean": round(float(returns.mean()), 2)}


# -------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_succeeded(self, succeeded: bool) -> bool:
        """Whether every rank succeeded (a collective: every rank must call it at the same point)."""
        if self.world_size == 1:
            return succeeded
        import torch.distributed as dist

        flag = torch.tensor([int(succeeded)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def ranks_from_environment(environ: dict | None = None) -> Ranks:
    """The ranks torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK); a single process without them."""
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({err}); start the processes with "
                         "torchrun, or unset them for a single process") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world_size} is not a valid rank; start the processes with "
                         "torchrun, or unset them for a single process")
    return Ranks(rank, world_size, local_rank)


@contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """A gloo process group for WORLD_SIZE > 1 (torchrun sets MASTER_ADDR/MASTER_PORT); nothing for one process."""
    if ranks.world_size == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_device(device: str, ranks: Ranks) -> str:
    """`cuda` without an index means this rank's own GPU (cuda:LOCAL_RANK) when several processes run."""
    return f"cuda:{ranks.local_rank}" if device == "cuda" and ranks.world_size > 1 else device


def load_generation_bundle(config: GenerateConfig, ranks: Ranks):
    """The bundle on this rank's device, refused at once if it lacks a model the rollout needs."""
    from .bundle import load_bundle

    return load_bundle(config.bundle, device=rank_device(config.device, ranks),
                       require=("dynamics", "reward", *(("diffusion",) if config.iterations > 0 else ())))


def write_chunks(bundle, config: GenerateConfig, plans: list[ChunkPlan], directory: Path, ranks: Ranks,
                 progress: bool = True) -> None:
    """Generate this rank's chunks into chunk files."""
    from tqdm.auto import tqdm

    make_policy = policy_factory(parse_policy_spec(config.policy), bundle, config.deterministic)
    sampler = rollout_sampler(bundle, config.sampler_steps)
    mine = chunks_of_rank(plans, ranks.rank, ranks.world_size)
    desc = "generate" if ranks.world_size == 1 else f"generate rank {ranks.rank}/{ranks.world_size}"
    with tqdm(total=sum(plan.count for plan in mine), desc=desc, unit="start", position=ranks.rank,
              disable=not progress) as bar:
        for plan in mine:
            save_chunk(chunk_path(directory, plan.index), generate_chunk(bundle, plan, make_policy, config, sampler))
            bar.update(plan.count)


def generate_dataset(config: GenerateConfig, ranks: Ranks = Ranks(), progress: bool = True) -> dict | None:
    """Generate the dataset `config.out` (see the module docstring); every rank calls this. Returns the summary
    on rank 0 and None on the others. Raises the error of a rank that failed on that rank and
    `GenerationAborted` on the others; nothing is left behind but a dataset written in full."""
    check_dataset_id(config.out)
    plans = plan_chunks(config.starts, config.chunk_size, config.seed)
    directory = shard_directory(config.out)
    lock = dataset_lock(config.out)
    error: BaseException | None = None
    try:
        if ranks.leader:  # the id is refused before any work, and held until the dataset is written
            try:
                refuse_existing_dataset(config.out, config.overwrite)
                lock.acquire()
                shutil.rmtree(directory, ignore_errors=True)  # chunks of an interrupted run never mix in
                directory.mkdir(parents=True)
            except Exception as err:
                error = err
        stop_unless_all_succeeded(ranks, error, "rank 0 refused the run")
        try:
            started = time.perf_counter()
            bundle = load_generation_bundle(config, ranks)
            write_chunks(bundle, config, plans, directory, ranks, progress)
            seconds = time.perf_counter() - started
        except Exception as err:
            error = err
        stop_unless_all_succeeded(ranks, error, "another rank failed while generating")
        summary = None
        if ranks.leader:
            try:
                summary = merge_chunks(directory, plans, config, bundle.meta,
                                       rollout_sampler(bundle, config.sampler_steps))
                summary.update(world_size=ranks.world_size, generate_seconds=round(seconds, 1))
            except Exception as err:
                error = err
        stop_unless_all_succeeded(ranks, error, "rank 0 could not write the dataset")
        return summary
    finally:
        if lock.record is not None:  # only the holder of the lock touches the shard directory
            remove_shard_directory(directory)
            lock.release()


def remove_shard_directory(directory: Path) -> None:
    """Delete a run's chunk files, and the parent `.dydiff-env-shards` once no other run uses it."""
    shutil.rmtree(directory, ignore_errors=True)
    try:
        directory.parent.rmdir()
    except OSError:  # another run's shards are there
        pass


def stop_unless_all_succeeded(ranks: Ranks, error: BaseException | None, others_reason: str) -> None:
    """Raise this rank's error, or `GenerationAborted` if only another rank failed (a collective)."""
    if ranks.all_succeeded(error is None):
        return
    if error is not None:
        raise error
    raise GenerationAborted(f"rank {ranks.rank}: {others_reason}; its error says why")
