"""Data-parallel plumbing for `dydiff-env train` under torchrun (DistributedDataParallel semantics, by hand).

    torchrun --standalone --nproc_per_node=4 -m dydiff_env.cli train all --dataset ID --out DIR

A process group is started only when torchrun set WORLD_SIZE > 1 (`init_from_env`): backend gloo on the CPU,
nccl on CUDA (each rank on its own GPU, cuda:LOCAL_RANK). Without it every function here is a no-op that
answers as rank 0 of 1, so a single process trains exactly as it did before this module existed.

Each training step averages the gradients over the ranks (`all_reduce_mean_grads`, called after backward and
before clipping / the optimizer step), so all ranks keep identical weights while each draws its own batches
(`rank_seed`). Everything here is a collective: every rank must call it at the same point of the program.

The ranks share one filesystem (one machine, or a shared --out): every rank reads the same dataset and, with
--resume, the same checkpoint, which rank 0 wrote. No pickle: small structured values travel between ranks as JSON in a uint8 tensor (`broadcast_json`).

Test hook: with the environment variable DYDIFF_ENV_RANK_DIGEST_DIR set, `write_rank_digest` makes every rank
write the sha256 of a trained model's state to that directory (`<model>-rank<r>.sha256`), so a test can check
that the ranks ended with identical weights.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .writers import write_atomically

DIGEST_DIR_VARIABLE = "DYDIFF_ENV_RANK_DIGEST_DIR"
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


class LeaderFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed at a step they wait on (the message names rank 0's error)."""


def mark_shared(err: BaseException) -> None:
    """Mark rank 0's error as sent to the other ranks, which raise `LeaderFailed` for it."""
    err.shared_with_ranks = True


def after_error_line(err: BaseException) -> None:
    """Called by each rank after printing its error line: for an error every rank knows (rank 0's shared error,
    the others' `LeaderFailed`), wait until all have printed, since torchrun stops the remaining ranks as soon
    as one exits. A rank that leaves the barrier first may break the connection under a slower one; the
    lines are out by then, so that is ignored."""
    if isinstance(err, LeaderFailed) or getattr(err, "shared_with_ranks", False):
        with contextlib.suppress(RuntimeError):
            barrier()


def _dist():
    import torch.distributed as dist

    return dist


def world_size() -> int:
    """How many data-parallel processes run (1 without an initialised process group)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_distributed() -> bool:
    return world_size() > 1


def is_leader() -> bool:
    """Rank 0: the one process that writes checkpoints, metrics and the bundle, and prints."""
    return rank() == 0


def requested_world_size(environ: dict | None = None) -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset); a malformed value raises naming the fix."""
    environ = os.environ if environ is None else environ
    value = environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not an integer; start the processes with torchrun, or unset "
                         "it for a single process") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size} must be at least 1; start the processes with torchrun, or unset it")
    return size


def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """A bare `cuda` means this rank's own GPU (cuda:LOCAL_RANK); any other device stays as given."""
    device = torch.device(device)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: str | torch.device = "cpu") -> torch.device:
    """Start the process group when torchrun asked for several processes (WORLD_SIZE > 1) and return the device
    this rank trains on. A single process returns `device` unchanged and starts nothing. Idempotent."""
    if requested_world_size() == 1:
        return torch.device(device)
    dist = _dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device, local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), timeout=PROCESS_GROUP_TIMEOUT)
    return device


def shutdown() -> None:
    """Destroy the process group (if one was started)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: the current GPU under nccl, else the CPU."""
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def rank_seed(seed: int, rank_: int, position: int = 0) -> int:
    """The seed of a rank's random streams. Rank 0 at the start keeps `seed` itself (so a single process draws
    exactly what it always drew); every other (rank, position) gets its own seed derived from all three."""
    if rank_ == 0 and position == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank_, position]).generate_state(1, np.uint64)[0] >> 1)


def all_reduce_mean_grads(model: torch.nn.Module) -> None:
    """Replace every parameter's gradient with its mean over the ranks (one all-reduce of the flattened
    gradients). A parameter without a gradient counts as zero and gets one, so every rank sends the same
    layout. No-op for a single process."""
    if not is_distributed():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    device = flat.device
    flat = flat.to(_collective_device())
    _dist().all_reduce(flat)
    flat = (flat / world_size()).to(device)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (the start of training, and after a resume)."""
    if not is_distributed():
        return
    dist = _dist()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            buf = tensor.detach().to(_collective_device()).clone()
            dist.broadcast(buf, src=0)
            tensor.copy_(buf.to(tensor.device))


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (a decision such as 'save a checkpoint now' that rank 0 makes)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_collective_device())
    _dist().broadcast(value, src=0)
    return bool(value.item())


def broadcast_array(values: np.ndarray) -> np.ndarray:
    """Rank 0's float64 array on every rank (every rank passes an array of the same shape)."""
    if not is_distributed():
        return values
    tensor = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64)).to(_collective_device())
    _dist().broadcast(tensor, src=0)
    return tensor.cpu().numpy()


def broadcast_json(value=None):
    """Rank 0's JSON-able `value` on every rank (other ranks pass anything). No pickle: JSON bytes."""
    if not is_distributed():
        return value
    dist, device = _dist(), _collective_device()
    payload = json.dumps(value).encode() if is_leader() else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if is_leader():
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().numpy()).decode())


def state_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_rank_digest(name: str, model: torch.nn.Module, environ: dict | None = None) -> Path | None:
    """Test hook: with DYDIFF_ENV_RANK_DIGEST_DIR set, write `<name>-rank<r>.sha256` (the model's
    `state_digest`) there and return its path; otherwise do nothing."""
    directory = (os.environ if environ is None else environ).get(DIGEST_DIR_VARIABLE)
    if not directory:
        return None
    path = Path(directory) / f"{name}-rank{rank()}.sha256"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, state_digest(model).encode())
    return path
