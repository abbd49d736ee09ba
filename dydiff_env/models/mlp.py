"""Batched-ensemble MLP: every parameter has a leading member dimension, so K members train in one matmul
and early stopping can restore each member's best weights by slicing (see `training.BestWeights`)."""

from __future__ import annotations

import math

import torch
from torch import nn


class EnsembleLinear(nn.Module):
    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, B, in) -> (K, B, out)
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """K independent MLPs `in -> hidden... -> out` evaluated together on inputs of shape (K, B, in)."""

    def __init__(self, members: int, in_features: int, out_features: int, hidden: tuple[int, ...],
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        widths = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation()
        self.members = members

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """(K, B, in) or (B, in) -> (K, B, out); with `members`, only those members are evaluated (K = their
        count), e.g. the elites of a dynamics ensemble at inference. `dtype` (e.g. bfloat16 for serving): the
        input and the weights are cast to it and the output has it; without autograd the cast weights are
        kept, so a serving step does not cast them again (what autocast does on every call, and what made
        bf16 slower than float32 at small batches)."""
        weights = self._weights(members, dtype)
        if dtype is not None:
            x = x.to(dtype)
        if x.dim() == 2:  # the same batch for every member
            x = x.unsqueeze(0).expand(weights[0][0].shape[0], -1, -1)
        for i, (weight, bias) in enumerate(weights):
            x = torch.baddbmm(bias, x, weight)
            if i < len(weights) - 1:
                x = self.activation(x)
        return x

    def _weights(self, members: torch.Tensor | None,
                 dtype: torch.dtype | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (members') weights in `dtype`. With autograd on they are gathered and cast anew, so gradients
        flow to the parameters; without, they are gathered into contiguous tensors once and reused while
        neither the members, the dtype nor any weight changes (a weight update bumps its version)."""
        if members is None and dtype is None:
            return [(layer.weight, layer.bias) for layer in self.layers]
        if torch.is_grad_enabled():
            weights = [(layer.weight, layer.bias) if members is None else (layer.weight[members], layer.bias[members])
                       for layer in self.layers]
            return weights if dtype is None else [(w.to(dtype), b.to(dtype)) for w, b in weights]
        key = (None if members is None else members.tolist(), dtype,
               [(p.data_ptr(), p._version) for layer in self.layers for p in (layer.weight, layer.bias)])
        if getattr(self, "_cached_key", None) != key:
            index = slice(None) if members is None else members
            self._cached = [(layer.weight[index].to(dtype).contiguous(), layer.bias[index].to(dtype).contiguous())
                            for layer in self.layers]
            self._cached_key = key
        return self._cached

    def weight_penalty(self, decays: tuple[float, ...]) -> torch.Tensor:
        """Sum over layers of decay * ||W||^2 / 2, with one decay per layer (the reference's MBPO values)."""
        if len(decays) != len(self.layers):
            raise ValueError(f"{len(decays)} weight decays for {len(self.layers)} layers")
        return sum(d * 0.5 * layer.weight.pow(2).sum() for d, layer in zip(decays, self.layers))
