"""Policy handles: turn what users have into the batch policy a DyDiff rollout calls.

`as_policy(obj)` returns a function torch (B, obs) -> torch (B, act) for:
- a plain callable on a batch of observations: it receives **numpy** float32 arrays (B, obs) and may return
  numpy or torch actions (pass `input="torch"` for a callable that wants tensors);
- a `torch.nn.Module` mapping observations to actions (called on tensors, under `no_grad`);
- a Stable-Baselines3 algorithm or policy (anything with SB3's `predict(obs, deterministic=True)`);
- a Tianshou `Algorithm` (its `.policy`) or `Policy` (forward on a `Batch`, then `map_action`);
- an agent of this project (`agents.TD3BC`, `agents.DiffusionQL`: anything with `actor_fn()`).
Actions are deterministic where the library offers the choice: the reference relabels with the mean action.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

TorchPolicy = Callable[[torch.Tensor], torch.Tensor]


def _to_tensor(actions: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(actions, torch.Tensor):
        return actions.to(device=like.device, dtype=like.dtype)
    return torch.as_tensor(np.asarray(actions, dtype=np.float32), device=like.device)


def as_policy(obj: Any, input: str = "auto") -> TorchPolicy:
    """Adapt `obj` to a torch batch policy (see the module docstring). Raises TypeError for anything else.
    Adapting an adapted policy returns it unchanged."""
    policy = _adapt(obj, input)
    policy._dydiff_torch_policy = True
    return policy


def _adapt(obj: Any, input: str) -> TorchPolicy:
    if input not in ("auto", "numpy", "torch"):
        raise ValueError(f"input must be 'auto', 'numpy' or 'torch', got '{input}'")
    if obj is None:
        raise TypeError("policy is None")
    if getattr(obj, "_dydiff_torch_policy", False):  # already adapted
        return obj
    if hasattr(obj, "actor_fn"):  # agents of this project
        return _adapt(obj.actor_fn(), input="torch")
    if hasattr(obj, "predict") and any(c.__module__.startswith("stable_baselines3") for c in type(obj).__mro__):
        def sb3_policy(obs: torch.Tensor) -> torch.Tensor:
            actions, _ = obj.predict(obs.detach().cpu().numpy(), deterministic=True)
            return _to_tensor(actions, obs)

        return sb3_policy
    tianshou_policy = _tianshou_policy(obj)
    if tianshou_policy is not None:
        return tianshou_policy
    if isinstance(obj, torch.nn.Module) or input == "torch":
        def torch_policy(obs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return _to_tensor(obj(obs), obs)

        return torch_policy
    if callable(obj):
        def numpy_policy(obs: torch.Tensor) -> torch.Tensor:
            return _to_tensor(obj(obs.detach().cpu().numpy()), obs)

        return numpy_policy
    raise TypeError(f"cannot use a {type(obj).__name__} as a policy: pass a callable on a batch of observations, "
                    "a torch.nn.Module, an SB3 model or a Tianshou policy")


def _tianshou_policy(obj: Any) -> TorchPolicy | None:
    if not any((getattr(c, "__module__", None) or "").startswith("tianshou") for c in type(obj).__mro__):
        return None  # not a Tianshou object: skip importing tianshou (seconds, it pulls in tensorboard)
    try:
        from tianshou.algorithm.algorithm_base import Algorithm, Policy
        from tianshou.data import Batch
    except ImportError:
        return None
    if isinstance(obj, Algorithm):
        obj = obj.policy
    if not isinstance(obj, Policy):
        return None

    def tianshou_policy(obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            was_training = obj.training
            obj.eval()
            act = obj(Batch(obs=obs.detach().cpu().numpy(), info={})).act
            obj.train(was_training)
        act = act.detach().cpu().numpy() if isinstance(act, torch.Tensor) else np.asarray(act)
        return _to_tensor(obj.map_action(act), obs)

    return tianshou_policy
