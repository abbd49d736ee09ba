"""Training of the four bundle models, with progress bars, CSV metrics, atomic checkpoints and resume.

`train_models(kinds, data, out_dir, config)` is what `dydiff-env train` calls. Each model trains in its own
loop below; all loops checkpoint every `config.checkpoint_every_s` seconds into `out_dir/checkpoints/` and
`resume=True` continues from there (a killed run loses at most one interval). A finished model is committed
into the bundle directory (`bundle.BundleWriter`, which holds the directory's lock for the whole run), so
`train all --resume` skips it, unless its file no longer has the sha256 that config.json records or a later
run started retraining it: those are trained again. A model of another architecture than the bundle records
replaces the bundle's only with `overwrite=True` (`--overwrite`).

Data-parallel under torchrun (WORLD_SIZE > 1, `distributed`): every rank draws its own batches (seeded from
(seed, rank)), the gradients are averaged over the ranks every step, so all ranks keep identical weights;
holdout losses and checkpoint decisions are rank 0's, broadcast, so every rank stops at the same step. Rank 0
alone writes checkpoints, metrics.csv and the bundle (the others wait for it) and prints. A checkpoint holds
rank 0's random streams; on resume the other ranks draw fresh ones from (seed, rank, position), so a resumed
multi-process run is not bit-identical to an uninterrupted one (a single process is).

Fix to the reference: early stopping restores the best holdout weights (per ensemble member).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import bundle as bundle_io
from . import distributed
from .checkpoint import CheckpointError, checkpoint_exists, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import DiffusionConfig, DistillConfig, DynamicsConfig, MLPConfig, TrainConfig, architecture
from .data import Normalizer, OfflineData, TrajectoryWindows
from .models import (BCPolicy, DynamicsEnsemble, RewardModel, TrajectoryDiffusion, edm_sample, grid_sigmas,
                     student_sample)
from .writers import remove_stale_temporaries, write_atomically

MODEL_KINDS = ("dynamics", "reward", "bc", "diffusion")


@dataclass
class RunContext:
    out_dir: Path
    device: torch.device
    seed: int = 0
    resume: bool = False
    checkpoint_every_s: float = 60.0
    progress: bool = True
    # called after every checkpoint with the model name; tests use it to simulate a kill mid-run
    on_checkpoint: Callable[[str], None] | None = None
    overwrite: bool = False  # a checkpoint of another architecture is ignored instead of refused
    # training time of one model: of the runs before the checkpoint this run resumed from, and of this run
    earlier_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def checkpoint_path(self, name: str) -> Path:
        return self.out_dir / "checkpoints" / f"{name}.safetensors"

    def train_seconds(self) -> float:
        return self.earlier_seconds + time.monotonic() - self.started


METRICS_COLUMNS = ["time", "model", "step", "metric", "value"]


def parse_metrics_rows(text: str) -> list[list[str]]:
    """The data rows of metrics.csv; a row that a kill cut short (or anything else malformed) is dropped."""
    rows = list(csv.reader(text.splitlines()))[1:]
    return [row for row in rows if len(row) == len(METRICS_COLUMNS) and row[2].isdigit()]


def without_duplicates(rows: list[list[str]]) -> list[list[str]]:
    """One row per (model, step, metric): the last one written, in the order they were written."""
    last = {(row[1], row[2], row[3]): i for i, row in enumerate(rows)}
    return [row for i, row in enumerate(rows) if last[(row[1], row[2], row[3])] == i]


class MetricsLog:
    """Appends rows to `out_dir/metrics.csv` (columns: time, model, step, metric, value).

    A resumed model's rows after its checkpoint are dropped (the resumed run writes them again), and a model
    trained afresh drops all its earlier rows, so the file holds one row per (model, step, metric)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(METRICS_COLUMNS)

    def log(self, model: str, step: int, **metrics: float) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for key, value in metrics.items():
                writer.writerow([now, model, step, key, f"{float(value):.6g}"])

    def rows(self) -> list[list[str]]:
        return parse_metrics_rows(self.path.read_text())

    def rewrite(self, rows: list[list[str]]) -> None:
        lines = io.StringIO()
        csv.writer(lines).writerows([METRICS_COLUMNS, *rows])
        write_atomically(self.path, lines.getvalue().encode())

    def forget_after(self, model: str, step: int) -> None:
        """Drop `model`'s rows after `step` (all of them for step 0) and any duplicates."""
        self.rewrite(without_duplicates([row for row in self.rows() if row[1] != model or int(row[2]) <= step]))

    def drop_duplicates(self) -> None:
        """Keep the last of rows logged twice at one step (the final evaluation of a model whose last
        checkpoint was written just before it, when that run was killed and resumed)."""
        self.rewrite(without_duplicates(self.rows()))


class NoMetrics:
    """What ranks other than 0 log to: nothing (rank 0 alone writes metrics.csv)."""

    def log(self, model: str, step: int, **metrics: float) -> None:
        pass

    def forget_after(self, model: str, step: int) -> None:
        pass

    def drop_duplicates(self) -> None:
        pass


def say(message: str) -> None:
    """Print on rank 0 only (every process prints when there is one)."""
    if distributed.is_leader():
        print(message)


def rank_streams(seed: int) -> tuple[torch.Generator, np.random.Generator]:
    """This rank's random streams of a training loop (a single process: both seeded with `seed`, as always)."""
    own = distributed.rank_seed(seed, distributed.rank())
    return torch.Generator().manual_seed(own), np.random.default_rng(own)


def restore_streams(saved: dict, generator: torch.Generator, rng: np.random.Generator, seed: int,
                    position: int) -> None:
    """Continue from a checkpoint's random streams: rank 0 (whose streams it holds) exactly, any other rank
    from fresh streams derived from (seed, rank, position), as the checkpoint holds only rank 0's."""
    if distributed.rank() == 0:
        set_rng_state(saved, generator, rng)
        return
    own = distributed.rank_seed(seed, distributed.rank(), position + 1)
    generator.manual_seed(own)
    rng.bit_generator.state = np.random.default_rng(own).bit_generator.state


def checkpoint_due(last_save: float, every_s: float) -> bool:
    """Whether to checkpoint now: rank 0's clock decides for every rank."""
    return distributed.broadcast_flag(time.monotonic() - last_save >= every_s)


class BestWeights:
    """Per-member early stopping for models whose parameters all have a leading member dimension
    (`EnsembleMLP`-based models; a single model is an ensemble of one)."""

    def __init__(self, model: torch.nn.Module, members: int, min_rel_improvement: float = 0.01):
        self.best_loss = np.full(members, np.inf)
        self.best_state = {k: p.detach().clone() for k, p in model.named_parameters()}
        for key, value in self.best_state.items():
            if value.shape[0] != members:
                raise ValueError(f"parameter {key} of shape {tuple(value.shape)} has no leading member dimension {members}")
        self.min_rel_improvement = min_rel_improvement

    def update(self, model: torch.nn.Module, losses: np.ndarray) -> bool:
        with np.errstate(invalid="ignore", divide="ignore"):
            improved = (self.best_loss - losses) / np.abs(self.best_loss) > self.min_rel_improvement
        improved = (improved | (~np.isfinite(self.best_loss) & np.isfinite(losses))) & np.isfinite(losses)
        if improved.any():
            mask = torch.as_tensor(improved)
            for key, p in model.named_parameters():
                self.best_state[key][mask] = p.detach()[mask.to(p.device)].to(self.best_state[key].device)
            self.best_loss[improved] = losses[improved]
        return bool(improved.any())

    def restore(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for key, p in model.named_parameters():
                p.copy_(self.best_state[key])

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss.tolist(), "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = np.asarray(state["best_loss"], dtype=np.float64)
        self.best_state = state["best_state"]


def _holdout_split(data: OfflineData, fraction: float, max_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train_rows, hold_rows = data.split_episodes(fraction, seed)
    if len(hold_rows) > max_holdout:
        hold_rows = np.random.default_rng(seed).choice(hold_rows, max_holdout, replace=False)
    if len(train_rows) == 0:
        raise ValueError(f"dataset {data.dataset_id} is too small to split off a holdout set")
    return train_rows, np.sort(hold_rows)


def state_dict_mismatch(saved, expected: dict[str, torch.Tensor]) -> str | None:
    """How a checkpoint's model weights differ from the model being trained, or None when they fit."""
    if not isinstance(saved, dict):
        return "it holds no model weights"
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        return f"tensors missing {missing[:3]}, unexpected {unexpected[:3]}"
    shapes = [f"{k} {tuple(saved[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape]
    return "; ".join(shapes[:3]) or None


def load_resume_state(name: str, model: torch.nn.Module, keys: tuple[str, ...], model_architecture: dict,
                      ctx: RunContext) -> dict | None:
    """The checkpoint state to continue `name` from, or None to start afresh (no --resume, no checkpoint, or
    one of another architecture with --overwrite). A checkpoint that cannot be read, or that was written for
    another architecture, raises a `CheckpointError` that says what to do. Sets the time trained so far.

    The architecture is compared as recorded in the checkpoint (older checkpoints lack it) and by the weights'
    shapes (some fields, such as sigma_data, change no shape)."""
    path = ctx.checkpoint_path(name)
    if not (ctx.resume and checkpoint_exists(path)):
        return None
    advice = f"delete it to train {name} afresh, or run without --resume"
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {advice}") from err
    absent = [key for key in keys if not isinstance(state, dict) or key not in state]
    problem = f"it lacks {absent}" if absent else state_dict_mismatch(state["model"], model.state_dict())
    if problem is None and state.get("architecture", model_architecture) != model_architecture:
        problem = f"architecture {state['architecture']} != {model_architecture}"
    if problem is None:
        ctx.earlier_seconds = float(state.get("train_seconds", 0.0))
        return state
    if ctx.overwrite:
        say(f"[train] {name}: checkpoint {path} is of another model ({problem}); starting afresh (--overwrite)")
        return None
    raise CheckpointError(f"checkpoint {path} was not written for the {name} model being trained, whose "
                          f"architecture is {model_architecture} ({problem}); {advice}")


def fit_supervised(name: str, model: torch.nn.Module, members: int,
                   batch_loss: Callable[[torch.Tensor], torch.Tensor],
                   holdout_loss: Callable[[], torch.Tensor],
                   train_rows: np.ndarray, cfg, optimizer: torch.optim.Optimizer,
                   ctx: RunContext, metrics: MetricsLog, model_architecture: dict | None = None) -> dict:
    """Epochs of minibatch steps (each member draws its own batch of train rows) and holdout early stopping.

    Stops after `cfg.patience` epochs in which no member improved by 1 %, or at `cfg.max_epochs`, and then
    restores every member's best holdout weights. Returns {"holdout_loss": per-member best, "epochs": n}.
    `model_architecture` (`config.architecture`) is stored in the checkpoints and checked on resume.
    """
    steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(len(train_rows) / cfg.batch_size))
    generator, rng = rank_streams(ctx.seed)
    best = BestWeights(model, members)
    epoch, stale = 0, 0
    ckpt = ctx.checkpoint_path(name)
    model_architecture = model_architecture or {}
    state = load_resume_state(name, model, ("model", "optimizer", "best", "epoch", "stale", "rng"),
                              model_architecture, ctx)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best.load_state_dict(state["best"])
        epoch, stale = state["epoch"], state["stale"]
        restore_streams(state["rng"], generator, rng, ctx.seed, epoch)
    distributed.broadcast_parameters(model)
    metrics.forget_after(name, epoch)

    def save():
        if distributed.is_leader():
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "best": best.state_dict(), "epoch": epoch, "stale": stale,
                                   "rng": rng_state(generator, rng), "train_seconds": ctx.train_seconds(),
                                   "architecture": model_architecture})
        distributed.barrier()
        if ctx.on_checkpoint:
            ctx.on_checkpoint(name)

    last_save = time.monotonic()
    bar = tqdm(total=cfg.max_epochs, initial=epoch, desc=f"train {name}", unit="epoch", disable=not ctx.progress)
    while epoch < cfg.max_epochs and stale < cfg.patience:
        model.train()
        total = 0.0
        for _ in range(steps_per_epoch):
            idx = torch.as_tensor(train_rows[rng.integers(0, len(train_rows), size=(members, cfg.batch_size))])
            loss = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_mean_grads(model)
            optimizer.step()
            total += loss.item()
        model.eval()
        # rank 0's losses decide for every rank (the weights are the same; the stop must be too)
        losses = distributed.broadcast_array(holdout_loss().detach().cpu().numpy().astype(np.float64))
        stale = 0 if best.update(model, losses) else stale + 1
        epoch += 1
        metrics.log(name, epoch, train_loss=total / steps_per_epoch, holdout_loss=float(losses.mean()),
                    best_holdout_loss=float(best.best_loss.mean()))
        bar.update(1)
        bar.set_postfix(holdout=f"{losses.mean():.4g}", best=f"{best.best_loss.mean():.4g}")
        if checkpoint_due(last_save, ctx.checkpoint_every_s):
            save()
            last_save = time.monotonic()
    bar.close()
    best.restore(model)
    save()
    return {"holdout_loss": best.best_loss.tolist(), "epochs": epoch}


def _tensor(x: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32, device=device)


def train_dynamics(data: OfflineData, cfg: DynamicsConfig, ctx: RunContext, metrics: MetricsLog) -> tuple[DynamicsEnsemble, dict]:
    dev = ctx.device
    model = DynamicsEnsemble(data.obs_dim, data.act_dim, cfg.ensemble_size, cfg.num_elites, cfg.hidden).to(dev)
    inputs = Normalizer.fit(np.concatenate([data.observations, data.actions], 1))
    delta = Normalizer.fit(data.next_observations - data.observations)
    model.set_normalization(inputs.mean, inputs.std, delta.mean, delta.std)
    obs, act, nxt = _tensor(data.observations, dev), _tensor(data.actions, dev), _tensor(data.next_observations, dev)
    train_rows, hold = _holdout_split(data, cfg.holdout_fraction, cfg.max_holdout, ctx.seed)
    hold_t = torch.as_tensor(hold, device=dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def batch_loss(idx):
        idx = idx.to(dev)
        return model.loss(obs[idx], act[idx], nxt[idx], cfg.weight_decay)

    def holdout_loss():
        return model.holdout_mse(obs[hold_t], act[hold_t], nxt[hold_t])

    summary = fit_supervised("dynamics", model, cfg.ensemble_size, batch_loss, holdout_loss, train_rows, cfg,
                             optimizer, ctx, metrics, architecture(cfg, "dynamics"))
    member_mse = model.holdout_mse(obs[hold_t], act[hold_t], nxt[hold_t]).cpu().numpy()
    model.set_elites(member_mse)
    summary["elites"] = model.elites.tolist()
    summary["elite_holdout_mse"] = float(member_mse[model.elites.cpu().numpy()].mean())
    return model, summary


def train_reward(data: OfflineData, cfg: MLPConfig, ctx: RunContext, metrics: MetricsLog) -> tuple[RewardModel, dict]:
    dev = ctx.device
    model = RewardModel(data.obs_dim, data.act_dim, cfg.hidden).to(dev)
    inputs = Normalizer.fit(np.concatenate([data.observations, data.actions], 1))
    model.set_normalization(inputs.mean, inputs.std, float(data.rewards.mean()), float(max(data.rewards.std(), 1e-6)))
    obs, act, rew = _tensor(data.observations, dev), _tensor(data.actions, dev), _tensor(data.rewards, dev)
    train_rows, hold = _holdout_split(data, cfg.holdout_fraction, cfg.max_holdout, ctx.seed + 1)
    hold_t = torch.as_tensor(hold, device=dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    summary = fit_supervised(
        "reward", model, 1, lambda idx: model.loss(obs[idx[0].to(dev)], act[idx[0].to(dev)], rew[idx[0].to(dev)]),
        lambda: model.holdout_mse(obs[hold_t], act[hold_t], rew[hold_t]), train_rows, cfg, optimizer, ctx, metrics,
        architecture(cfg, "reward"))
    summary["holdout_mse"] = summary["holdout_loss"][0]
    summary["reward_std"] = float(data.rewards.std())
    return model, summary


def train_bc(data: OfflineData, cfg: MLPConfig, ctx: RunContext, metrics: MetricsLog) -> tuple[BCPolicy, dict]:
    dev = ctx.device
    model = BCPolicy(data.obs_dim, data.act_dim, cfg.hidden).to(dev)
    stats = Normalizer.fit(data.observations)
    model.set_normalization(stats.mean, stats.std)
    obs, act = _tensor(data.observations, dev), _tensor(data.actions, dev)
    train_rows, hold = _holdout_split(data, cfg.holdout_fraction, cfg.max_holdout, ctx.seed + 2)
    hold_t = torch.as_tensor(hold, device=dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # early stopping on the holdout negative log-likelihood (the training objective)
    summary = fit_supervised(
        "bc", model, 1, lambda idx: model.loss(obs[idx[0].to(dev)], act[idx[0].to(dev)]),
        lambda: model.loss(obs[hold_t], act[hold_t]).detach().reshape(1), train_rows, cfg, optimizer, ctx, metrics,
        architecture(cfg, "bc"))
    summary["holdout_nll"] = summary["holdout_loss"][0]
    summary["holdout_action_mse"] = float(model.holdout_mse(obs[hold_t], act[hold_t])[0])
    return model, summary


# ------------------------------------------------------------------------------------------------- diffusion


def diffusion_normalizer(data: OfflineData) -> Normalizer:
    return Normalizer.fit(np.concatenate([data.observations, data.actions], 1))


def diffusion_windows(data: OfflineData, cfg: DiffusionConfig, seed: int) -> tuple[TrajectoryWindows, TrajectoryWindows]:
    """The diffusion model's (training, holdout) windows: whole episodes held out, split with the training
    run's `seed` (the bundle's train_config.seed), so that the student's distillation sees the same split."""
    train_rows, hold_rows = data.split_episodes(cfg.holdout_fraction, seed + 3)
    train_windows = TrajectoryWindows(data, cfg.horizon, cfg.min_valid_rows, rows=train_rows)
    hold_windows = TrajectoryWindows(data, cfg.horizon, cfg.min_valid_rows, rows=hold_rows)
    if len(train_windows) == 0:
        raise ValueError(f"no training windows of horizon {cfg.horizon}: the dataset's episodes are too short")
    return train_windows, hold_windows


@torch.no_grad()
def teacher_forced_error(model: TrajectoryDiffusion, windows: TrajectoryWindows, norm: Normalizer, obs_std: np.ndarray,
                         sampler, count: int, generator: torch.Generator, device) -> np.ndarray:
    """Mean absolute state error per horizon step, in dataset-std units, of states sampled given a window's
    own first state and actions (the diffusion model's precision with no policy mismatch). Shape (H,)."""
    idx = np.linspace(0, len(windows) - 1, num=min(count, len(windows))).astype(int)
    x, valid = windows.get(idx)
    x_unit = _tensor(norm.to_unit(x), device)
    sample = edm_sample(model.denoise, x_unit, model.condition_mask(device=device), sampler, generator)
    states = norm.from_unit(sample.cpu().numpy())[..., : model.obs_dim]
    err = np.abs(states - x[..., : model.obs_dim]) / obs_std
    err = np.where(valid[..., None], err, np.nan)
    return np.nanmean(err, axis=(0, 2))


@dataclass
class EmaRun:
    """What a run of an EMA-averaged model (the diffusion model, the distilled student) checkpoints and resumes."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    rng: np.random.Generator


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, ema_decay: float, step: int) -> None:
    """One EMA step, with a warm-up so the early weights are not frozen in."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)
        for b_ema, b in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(b)


def ema_run_state(run: EmaRun, step: int, ctx: RunContext, model_architecture: dict) -> dict:
    """The checkpoint of an EMA run at `step`."""
    return {"model": run.model.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "step": step, "rng": rng_state(run.generator, run.rng),
            "train_seconds": ctx.train_seconds(), "architecture": model_architecture}


def resume_ema_run(name: str, run: EmaRun, model_architecture: dict, ctx: RunContext, seed: int) -> int:
    """Restore an EMA run from its checkpoint (when resuming and one fits); the step to continue from."""
    state = load_resume_state(name, run.model, ("model", "ema", "optimizer", "scheduler", "step", "rng"),
                              model_architecture, ctx)
    if state is None:
        return 0
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    restore_streams(state["rng"], run.generator, run.rng, seed, state["step"])
    return state["step"]


def train_diffusion(data: OfflineData, cfg: DiffusionConfig, sampler, ctx: RunContext, metrics: MetricsLog,
                    error_windows: int = 64) -> tuple[TrajectoryDiffusion, dict]:
    dev = ctx.device
    norm = diffusion_normalizer(data)
    model = TrajectoryDiffusion(data.obs_dim, data.act_dim, cfg.horizon, cfg.channels, cfg.kernel_size, cfg.sigma_data).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    train_windows, hold_windows = diffusion_windows(data, cfg, ctx.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    generator, rng = rank_streams(ctx.seed)
    ckpt = ctx.checkpoint_path("diffusion")
    model_architecture = architecture(cfg, "diffusion")
    run = EmaRun(model, ema, optimizer, scheduler, generator, rng)
    step = resume_ema_run("diffusion", run, model_architecture, ctx, ctx.seed)
    distributed.broadcast_parameters(model)
    distributed.broadcast_parameters(ema)
    metrics.forget_after("diffusion", step)

    def save():
        if distributed.is_leader():
            save_checkpoint(ckpt, ema_run_state(run, step, ctx, model_architecture))
        distributed.barrier()
        if ctx.on_checkpoint:
            ctx.on_checkpoint("diffusion")

    # fixed holdout batch and noise, so the validation loss is comparable across evaluations
    hold_source = hold_windows if len(hold_windows) else train_windows
    hold_idx = np.linspace(0, len(hold_source) - 1, num=min(256, len(hold_source))).astype(int)
    hx, hvalid = hold_source.get(hold_idx)
    hold_x, hold_valid = _tensor(norm.to_unit(hx), dev), torch.as_tensor(hvalid, device=dev)

    def holdout_loss(net):
        return float(net.loss(hold_x, hold_valid, cfg.p_mean, cfg.p_std, torch.Generator().manual_seed(1234)))

    obs_std = Normalizer.fit(data.observations).std
    last_save = time.monotonic()
    bar = tqdm(total=cfg.train_steps, initial=step, desc="train diffusion", unit="step", disable=not ctx.progress)
    running = []
    while step < cfg.train_steps:
        model.train()
        x, valid = train_windows.get(rng.integers(0, len(train_windows), size=cfg.batch_size))
        loss = model.loss(_tensor(norm.to_unit(x), dev), torch.as_tensor(valid, device=dev), cfg.p_mean, cfg.p_std,
                          generator, cfg.action_noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_mean_grads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        update_ema(ema, model, cfg.ema_decay, step)
        step += 1
        running.append(loss.item())
        bar.update(1)
        if (step % cfg.eval_every == 0 or step == cfg.train_steps) and not distributed.is_leader():
            running = []  # rank 0 evaluates and logs
        elif step % cfg.eval_every == 0 or step == cfg.train_steps:
            ema.eval()
            hl = holdout_loss(ema)
            # the figure that decides whether DyDiff helps, tracked cheaply: 16 holdout windows, 10 sampler steps
            tf = teacher_forced_error(ema, hold_source, norm, obs_std, replace(sampler, num_steps=10), 16,
                                      torch.Generator().manual_seed(0), dev)
            metrics.log("diffusion", step, train_loss=float(np.mean(running)), holdout_loss=hl,
                        lr=scheduler.get_last_lr()[0], teacher_forced_error_mean=float(np.nanmean(tf[1:])))
            bar.set_postfix(loss=f"{np.mean(running):.4f}", holdout=f"{hl:.4f}", tf_err=f"{np.nanmean(tf[1:]):.3f}")
            running = []
        if checkpoint_due(last_save, ctx.checkpoint_every_s):
            save()
            last_save = time.monotonic()
    bar.close()
    save()
    ema.eval()
    if not distributed.is_leader():  # rank 0 evaluates; train_models gives every rank its summary
        return ema, {"steps": step}
    err = teacher_forced_error(ema, hold_source, norm, obs_std, sampler, error_windows, torch.Generator().manual_seed(ctx.seed), dev)
    summary = {"steps": step, "holdout_loss": holdout_loss(ema), "parameters": sum(p.numel() for p in ema.parameters()),
               "teacher_forced_state_error": [round(float(e), 4) for e in err]}
    for h in sorted({1, 8, 16, 32, cfg.horizon // 2, cfg.horizon - 1}):
        if h < len(err):
            metrics.log("diffusion", step, **{f"teacher_forced_error_h{h}": float(err[h])})
    return ema, summary


# --------------------------------------------------------------------------------------------------- driver


def train_models(kinds: list[str], data: OfflineData, out_dir: str | os.PathLike, config: TrainConfig,
                 device: str | torch.device = "cpu", resume: bool = False, progress: bool = True,
                 on_checkpoint: Callable[[str], None] | None = None, overwrite: bool = False) -> dict:
    """Train the requested models on `data` and write them into the bundle directory `out_dir`.

    Holds the directory's lock for the whole run (a second writer is refused with `writers.LockedError`).
    Every finished model is committed at once (weights, then config.json), so a bundle is usable (for the
    models it has) at any point. `resume`: skip the models the bundle holds intact and continue the others
    from their checkpoints. `overwrite`: allow models of another architecture than the bundle records (else
    `BundleError`). Returns the per-model summaries (rank 0's, on every rank).

    Under torchrun (WORLD_SIZE > 1) this starts the process group (`distributed.init_from_env`; a bare
    `cuda` device is each rank's own GPU) and trains data-parallel (see the module docstring); the caller
    ends it with `distributed.shutdown()`.
    """
    unknown = set(kinds) - set(MODEL_KINDS)
    if unknown:
        raise ValueError(f"unknown model kinds {sorted(unknown)}; choose from {MODEL_KINDS} or 'all'")
    out = Path(out_dir)
    requested = [k for k in MODEL_KINDS if k in kinds]
    device = distributed.init_from_env(device)  # a process group only under torchrun with WORLD_SIZE > 1
    leader = distributed.is_leader()
    torch.manual_seed(config.seed)
    ctx = RunContext(out, device, config.seed, resume, config.checkpoint_every_s, progress and leader,
                     on_checkpoint, overwrite)
    writer, todo = open_bundle_and_plan(out, data, config, requested, ctx)
    try:
        metrics = MetricsLog(out / "metrics.csv") if leader else NoMetrics()
        summaries = {}
        for kind in todo:
            say_world(kind, config)
            kind_ctx = replace(ctx, earlier_seconds=0.0, started=time.monotonic())
            model, summary = train_one(kind, data, config, kind_ctx, metrics)
            distributed.write_rank_digest(kind, model)
            if leader:
                metrics.drop_duplicates()
                summary["train_seconds"] = round(kind_ctx.train_seconds(), 1)
                writer.add_model(kind, model, summary, recorded_config(kind, config, summary))
                print(f"[train] {kind}: done in {summary['train_seconds']} s; holdout {summary.get('holdout_loss')}")
            summaries[kind] = distributed.broadcast_json(summary)  # the others wait here while rank 0 writes
    finally:
        if writer is not None:
            writer.close()
    return summaries


def open_bundle_and_plan(out: Path, data: OfflineData, config: TrainConfig, requested: list[str],
                         ctx: RunContext) -> tuple[bundle_io.BundleWriter | None, list[str]]:
    """Rank 0 opens the bundle (taking its lock), checks it and decides which models to train; every rank
    gets that list. Returns (the writer on rank 0 and None elsewhere, the models to train). A failure on rank 0
    is raised there and, naming it, on every other rank."""
    writer, todo = None, None
    if distributed.is_leader():
        try:
            writer = bundle_io.BundleWriter(out, data, config)
            todo = start_bundle_run(writer, requested, config, ctx)
        except Exception as err:
            if writer is not None:
                writer.close()
            distributed.broadcast_json({"error": f"{type(err).__name__}: {err}"})
            distributed.mark_shared(err)  # every rank prints its line before any exits (cli.main)
            raise
    plan = distributed.broadcast_json({"todo": todo})
    if "error" in plan:
        raise distributed.LeaderFailed(f"rank 0 could not start training ({plan['error']}); fix that and start all ranks again")
    return writer, plan["todo"]


def start_bundle_run(writer: bundle_io.BundleWriter, requested: list[str], config: TrainConfig,
                     ctx: RunContext) -> list[str]:
    """Rank 0's part of starting a run: which models to train, their stale checkpoints removed (without
    --resume) and recorded in the bundle as being trained."""
    remove_stale_temporaries(ctx.out_dir / "checkpoints")
    if not ctx.overwrite:
        writer.refuse_architecture_changes(requested, config)
    todo = models_to_train(writer, requested, config, ctx.resume)
    if not ctx.resume:  # they belong to earlier runs; a later --resume of this one must not continue them
        for kind in todo:
            ctx.checkpoint_path(kind).unlink(missing_ok=True)
    writer.start_training(todo)
    return todo


def say_world(kind: str, config: TrainConfig) -> None:
    """Under torchrun: the world size and the effective batch of `kind` (printed by rank 0)."""
    size = distributed.world_size()
    if size > 1:
        batch = getattr(config, kind).batch_size
        say(f"[train] {kind}: {size} processes (data-parallel, rank 0 writes); effective batch {batch} x {size} "
            f"= {batch * size}" + (" per ensemble member" if kind == "dynamics" else ""))


def models_to_train(writer, kinds: list[str], config: TrainConfig, resume: bool) -> list[str]:
    """All of `kinds`, or with `resume` those the bundle lacks, holds damaged (sha256 differs from
    config.json), or that an earlier run started to replace; says why each one is skipped or retrained."""
    if not resume:
        return list(kinds)
    changed = writer.architecture_changes(kinds, config)  # allowed here only with --overwrite
    todo = []
    for kind in kinds:
        if kind in changed or kind in writer.in_training:
            todo.append(kind)
        elif writer.has_intact_model(kind):
            print(f"[train] {kind}: already in {writer.dir}, skipped (--resume)")
        else:
            if writer.has_model(kind):
                print(f"[train] {kind}: {writer.model_file(kind).name} does not match its sha256 in config.json; "
                      "training it again")
            todo.append(kind)
    return todo


def train_one(kind: str, data: OfflineData, config: TrainConfig, ctx: RunContext,
              metrics: MetricsLog) -> tuple[torch.nn.Module, dict]:
    if kind == "dynamics":
        return train_dynamics(data, config.dynamics, ctx, metrics)
    if kind == "reward":
        return train_reward(data, config.reward, ctx, metrics)
    if kind == "bc":
        return train_bc(data, config.bc, ctx, metrics)
    return train_diffusion(data, config.diffusion, config.sampler, ctx, metrics)


def recorded_config(kind: str, config: TrainConfig, summary: dict) -> TrainConfig:
    """The configuration config.json records for a trained model: the diffusion steps it actually took (a
    resume with another --diffusion-steps ends where that run ends, or at the checkpoint's step if later)."""
    if kind != "diffusion":
        return config
    return replace(config, diffusion=replace(config.diffusion, train_steps=summary["steps"]))


# ---------------------------------------------------------------------------------------------- distillation
# The few-step student (`dydiff-env train distill`). Method: knowledge distillation of the teacher's
# deterministic ODE sampler (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models for
# Improved Sampling Speed", arXiv 2101.02388): the student maps a point of a teacher trajectory straight to
# the teacher's final sample. Here the points are taken at several noise levels, so that the student is also
# a multistep sampler as in consistency models (Song et al. 2023, arXiv 2303.01469, Algorithm 1; see
# `models.student_sample`). Why this method: one pass of teacher sampling gives exact regression targets, there
# is no bootstrapped target network to tune, and it fits a 30-minute CPU budget; progressive distillation
# needs log2(N) rounds of training, and consistency distillation converges slowly on a CPU.

# the DistillConfig fields that decide the student's training pairs; a checkpoint made with other values
# (or of another teacher) cannot be resumed
DISTILL_DATA_FIELDS = ("teacher_kind", "teacher_steps", "max_steps", "sigma_min", "sigma_max", "rho", "num_windows",
                       "teacher_batch", "holdout_windows", "seed")


@dataclass
class TeacherPairs:
    """Teacher trajectories of a set of windows, all in unit scale with the conditions imposed.

    points (L, N, H, D): x at the teacher grid indices `DistillConfig.training_indices()` (L of them);
    target (N, H, D): the teacher's final sample; free (N, H, D) bool: the entries that carry loss (not
    conditioned, real rows)."""

    points: torch.Tensor
    target: torch.Tensor
    free: torch.Tensor

    def __len__(self) -> int:
        return self.target.shape[0]


@torch.no_grad()
def teacher_pairs(teacher: TrajectoryDiffusion, windows: TrajectoryWindows, norm: Normalizer, distill: DistillConfig,
                  index: np.ndarray, seed: int, device, progress: bool = False, desc: str = "teacher") -> TeacherPairs:
    """Sample the windows `index` with the teacher in chunks of `distill.teacher_batch`, each chunk seeded
    from (seed, chunk), so the same arguments give the same pairs (a resumed run regenerates them)."""
    sampler, levels = distill.teacher_sampler(), distill.training_indices()
    cond_mask = teacher.condition_mask(device=device)
    points, targets, frees = [], [], []
    bar = tqdm(total=len(index), desc=desc, unit="window", disable=not progress)
    for chunk, start in enumerate(range(0, len(index), distill.teacher_batch)):
        x, valid = windows.get(index[start: start + distill.teacher_batch])
        trajectory = []
        sample = edm_sample(teacher.denoise, _tensor(norm.to_unit(x), device), cond_mask, sampler,
                            torch.Generator().manual_seed(seed * 1_000_003 + chunk), trajectory)
        points.append(torch.stack([trajectory[i] for i in levels]))
        targets.append(sample)
        frees.append((~cond_mask)[None] & torch.as_tensor(valid, device=device)[:, :, None])
        bar.update(len(x))
    bar.close()
    return TeacherPairs(torch.cat(points, 1), torch.cat(targets), torch.cat(frees))


def distillation_loss(student: TrajectoryDiffusion, points: torch.Tensor, sigmas: torch.Tensor, target: torch.Tensor,
                      free: torch.Tensor) -> torch.Tensor:
    """Mean square error of the student's one-call estimate D(x_sigma; sigma) against the teacher's final
    sample, over the free entries only (conditioned entries are given, padded rows are no data)."""
    error = (student.denoise(points, sigmas) - target).pow(2)
    return (error * free).sum() / free.sum().clamp_min(1)


def sample_gap(sample: torch.Tensor, pairs: TeacherPairs) -> float:
    """RMS distance (unit scale, free entries) between samples and the teacher's samples of the same windows."""
    mse = ((sample - pairs.target).pow(2) * pairs.free).sum() / pairs.free.sum().clamp_min(1)
    return float(mse.sqrt())


@torch.no_grad()
def student_gap(student: TrajectoryDiffusion, pairs: TeacherPairs, distill: DistillConfig, seed: int) -> dict[str, float]:
    """`sample_gap` of the student's K-step samples for every K = 1..max_steps: how well the student stands
    in for its teacher. The samples start from other noise than the teacher's, so the floor is the teacher's
    own spread (`teacher_spread`)."""
    cond_mask = student.condition_mask(device=pairs.target.device)
    gaps = {}
    for k in range(1, distill.max_steps + 1):
        sigmas = grid_sigmas(distill.teacher_sampler(), distill.student_sigma_indices(k))
        sample = student_sample(student.denoise, pairs.target, cond_mask, sigmas, torch.Generator().manual_seed(seed))
        gaps[f"gap_k{k}"] = sample_gap(sample, pairs)
    return gaps


@torch.no_grad()
def teacher_spread(teacher: TrajectoryDiffusion, pairs: TeacherPairs, distill: DistillConfig, seed: int) -> float:
    """`sample_gap` of the teacher's samples of the same windows from other noise: the floor of the student's gap."""
    sample = edm_sample(teacher.denoise, pairs.target, teacher.condition_mask(device=pairs.target.device),
                        distill.teacher_sampler(), torch.Generator().manual_seed(seed))
    return sample_gap(sample, pairs)


def train_student(teacher: TrajectoryDiffusion, data: OfflineData, diffusion: DiffusionConfig, split_seed: int,
                  norm: Normalizer, distill: DistillConfig, teacher_digest: str, ctx: RunContext,
                  metrics: MetricsLog) -> tuple[TrajectoryDiffusion, dict]:
    """Distil `teacher` (see the section comment) into a student of its architecture, initialised from its
    weights; returns the student's EMA weights and a summary.

    The training pairs are not stored in the checkpoint (hundreds of MB for the cpu preset); a resumed run
    regenerates them from the seed, bit-identical, which costs the teacher sampling time again."""
    dev = ctx.device
    train_windows, hold_windows = diffusion_windows(data, diffusion, split_seed)
    hold_source = hold_windows if len(hold_windows) else train_windows
    student = copy.deepcopy(teacher).float().train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=distill.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(distill.warmup_steps, 1)))
    generator, rng = rank_streams(distill.seed)
    model_architecture = {"teacher_sha256": teacher_digest, **architecture(diffusion, "diffusion"),
                          **{name: getattr(distill, name) for name in DISTILL_DATA_FIELDS}}
    run = EmaRun(student, ema, optimizer, scheduler, generator, rng)
    step = resume_ema_run("student", run, model_architecture, ctx, distill.seed)
    metrics.forget_after("student", step)

    def save():
        save_checkpoint(ctx.checkpoint_path("student"), ema_run_state(run, step, ctx, model_architecture))
        if ctx.on_checkpoint:
            ctx.on_checkpoint("student")

    # the pairs come from their own seeded streams, not from the training streams, so they are the same on resume
    pair_rng = np.random.default_rng(distill.seed)
    pairs = teacher_pairs(teacher, train_windows, norm, distill, pair_rng.integers(0, len(train_windows),
                          size=distill.num_windows), distill.seed, dev, ctx.progress, "teacher samples")
    hold_index = np.linspace(0, len(hold_source) - 1, num=min(distill.holdout_windows, len(hold_source))).astype(int)
    hold_pairs = teacher_pairs(teacher, hold_source, norm, distill, hold_index, distill.seed + 1, dev)
    level_sigmas = torch.tensor(grid_sigmas(distill.teacher_sampler(), distill.training_indices()),
                                dtype=torch.float32, device=dev)
    floor = teacher_spread(teacher, hold_pairs, distill, distill.seed + 2)
    if step == 0:  # the teacher's weights as a few-step sampler: what distillation starts from
        metrics.log("student", 0, teacher_spread=floor, **student_gap(ema, hold_pairs, distill, distill.seed))

    last_save = time.monotonic()
    bar = tqdm(total=distill.train_steps, initial=step, desc="distil student", unit="step", disable=not ctx.progress)
    running = []
    while step < distill.train_steps:
        student.train()
        pick = torch.as_tensor(rng.integers(0, len(pairs), size=distill.batch_size), device=dev)
        # levels drawn uniformly: each is the input of some K-step sampler (not tuned)
        level = torch.as_tensor(rng.integers(0, len(level_sigmas), size=distill.batch_size), device=dev)
        loss = distillation_loss(student, pairs.points[level, pick], level_sigmas[level], pairs.target[pick],
                                 pairs.free[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), distill.grad_clip)
        optimizer.step()
        scheduler.step()
        update_ema(ema, student, distill.ema_decay, step)
        step += 1
        running.append(loss.item())
        bar.update(1)
        if step % distill.eval_every == 0 or step == distill.train_steps:
            gaps = student_gap(ema, hold_pairs, distill, distill.seed)
            metrics.log("student", step, train_loss=float(np.mean(running)), lr=scheduler.get_last_lr()[0], **gaps)
            bar.set_postfix(loss=f"{np.mean(running):.4f}", **{k: f"{v:.4f}" for k, v in gaps.items()})
            running = []
        if time.monotonic() - last_save >= ctx.checkpoint_every_s:
            save()
            last_save = time.monotonic()
    bar.close()
    save()
    summary = {"steps": step, "teacher_sha256": teacher_digest, "teacher_sampler": f"{distill.teacher_kind} "
               f"{distill.teacher_steps}", "max_steps": distill.max_steps, "pairs": len(pairs),
               **student_gap(ema, hold_pairs, distill, distill.seed), "teacher_spread": floor}
    return ema, summary


def distill_student(out_dir: str | os.PathLike, data: OfflineData, config: TrainConfig,
                    device: str | torch.device = "cpu", resume: bool = False, progress: bool = True,
                    on_checkpoint: Callable[[str], None] | None = None) -> dict:
    """Distil the diffusion model of the bundle `out_dir` into a few-step student (`config.student`) and commit
    it into the bundle as `student.safetensors`; what `dydiff-env train distill --bundle DIR` runs.

    `data` must be the bundle's dataset (the writer checks its hash). Holds the bundle's lock for the whole
    run, checkpoints every `config.checkpoint_every_s` seconds, and `resume=True` continues from the checkpoint
    (or skips a student the bundle holds intact, of its current teacher). One process (no torchrun).
    Returns {"student": summary}, or {} when there was nothing to do."""
    if distributed.world_size() > 1:
        raise ValueError("distillation runs in one process; start it without torchrun")
    out = Path(out_dir)
    bundle_io.recorded_dataset_id(out)  # a bundle must be there: refuse before the writer would start a new one
    ctx = RunContext(out, torch.device(device), config.student.seed, resume, config.checkpoint_every_s, progress,
                     on_checkpoint)
    with bundle_io.BundleWriter(out, data, config) as writer:
        if not writer.has_intact_model("diffusion"):
            raise bundle_io.BundleError(f"bundle {out} has no intact diffusion model to distil; train it first with "
                                        f"`dydiff-env train diffusion --dataset {data.dataset_id} --out {out}`")
        teacher_digest = bundle_io.teacher_sha256(writer.meta)
        stale = writer.meta["models"].get("student", {}).get("teacher_sha256") not in (None, teacher_digest)
        todo = start_bundle_run(writer, ["student"], config, replace(ctx, resume=resume and not stale))
        if not todo:
            return {}
        teacher = bundle_io.load_bundle(out, device=device, without=tuple(k for k in bundle_io.MODEL_FILES
                                                                          if k != "diffusion"))
        metrics = MetricsLog(out / "metrics.csv")
        model, summary = train_student(teacher.diffusion, data, teacher.config.diffusion, teacher.config.seed,
                                       teacher.normalizer("transition"), config.student, teacher_digest, ctx, metrics)
        metrics.drop_duplicates()
        summary["train_seconds"] = round(ctx.train_seconds(), 1)
        writer.add_model("student", model, summary, config)
        print(f"[train] student: done in {summary['train_seconds']} s; gap to the teacher per K "
              f"{[round(summary[f'gap_k{k}'], 4) for k in range(1, config.student.max_steps + 1)]} (the teacher's own "
              f"spread: {summary['teacher_spread']:.4f})")
    return {"student": summary}
