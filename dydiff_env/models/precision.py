"""The precision the networks are served in: float32, or bfloat16 autocast where the device computes it natively.

Serving only: training always runs in float32. A model's `precision` attribute ("float32" or "bfloat16", set
by `Bundle.set_precision`) decides the dtype of its network's forward pass; its inputs, outputs and the
arithmetic around the network stay float32. The diffusion and reward networks run under bf16 autocast; the
dynamics ensemble casts its input and weights itself (bit for bit what autocast computes) and keeps the cast
weights between calls, since autocast would cast them again at every one of the rollout's sequential steps.
docs/samplers.md has the measured speed and fidelity.
"""

from __future__ import annotations

import contextlib

import torch

from ..config import PRECISIONS


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (elsewhere bf16 is emulated and slower than float32). torch exposes the CPU checks only as underscored
    functions of torch.cpu, so a torch without them counts as no."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check is not None and check() for check in checks)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"float32" or "bfloat16" for a requested precision: "auto" is bfloat16 where `native_bfloat16(device)`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


def network_precision(precision: str, device: torch.device | str):
    """The context a network's forward pass runs in: bfloat16 autocast, or nothing for float32."""
    if precision == "bfloat16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
