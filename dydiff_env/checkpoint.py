"""Pickle-free, atomic checkpoints (training state of the models and the agents): nested Python state -> safetensors tensors + a JSON description of the structure.

`flatten_state(obj)` walks nested dicts / lists / tuples whose leaves are torch tensors, numpy arrays, ints,
floats, bools, str or None, and returns `(tensors, meta)`: every array leaf goes into `tensors` under a unique
readable name (its path, e.g. ``agent.critic.q1.0.weight``) and `meta` is a JSON-able tree that records the
structure, the scalars, and where each tensor goes. `unflatten_state(tensors, meta)` inverts it exactly:
int dictionary keys (optimizer states use them) stay ints, tuples stay tuples, numpy arrays come back as numpy
arrays, NaN / inf floats survive.

`save_checkpoint(path, state)` writes ONE safetensors file whose header metadata holds the JSON meta, so a
checkpoint is a single file and `os.replace` of a fully written, fsync'ed temporary makes the save atomic (a
crash leaves either the old or the new checkpoint, never a mix). Nothing is ever unpickled on load.

The meta encoding is tagged: a dict node is ``{"$dict": [[key, value], ...]}``, a list ``{"$list": [...]}``,
a tuple ``{"$tuple": [...]}``, a tensor ``{"$tensor": name}``, a numpy array ``{"$ndarray": name}``, a
non-finite float ``{"$float": "nan" | "inf" | "-inf"}``; None, bools, ints, finite floats and strings are
stored as themselves (they are never JSON objects, so they cannot be confused with a tag).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

from .writers import write_atomically

FORMAT = "dydiff-env-state"
FORMAT_VERSION = 1
_META_KEY = "dydiff_env_meta"


class CheckpointError(ValueError):
    """A file that is not a readable dydiff-env checkpoint (truncated, damaged, another format)."""


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state into `(tensors, meta)`; see the module docstring for the encoding.

    Tensors are copied to contiguous CPU memory (safetensors refuses shared or strided storage, and the copy
    means later training steps cannot change what is being written)."""
    tensors: dict[str, torch.Tensor] = {}

    def tensor_name(path: list[str]) -> str:
        base = ".".join(path) or "value"
        name, n = base, 1
        while name in tensors:  # keys containing "." could collide with a sibling's path
            name, n = f"{base}#{n}", n + 1
        return name

    def encode(x: Any, path: list[str]) -> Any:
        if isinstance(x, torch.Tensor):
            name = tensor_name(path)
            tensors[name] = x.detach().to("cpu", copy=True).contiguous()
            return {"$tensor": name}
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                raise TypeError(f"flatten_state: object arrays are not supported (at '{'.'.join(path)}')")
            name = tensor_name(path)
            tensors[name] = torch.from_numpy(np.array(x, copy=True, order="C"))
            return {"$ndarray": name}
        if isinstance(x, np.generic):  # numpy scalars become Python scalars
            return encode(x.item(), path)
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if isinstance(x, dict):
            items = []
            for key, value in x.items():
                if not (key is None or isinstance(key, (str, int, float, bool))):
                    raise TypeError(f"flatten_state: dict keys must be str/int/float/bool/None, got "
                                    f"{type(key).__name__} at '{'.'.join(path)}'")
                items.append([key, encode(value, [*path, str(key)])])
            return {"$dict": items}
        if isinstance(x, (list, tuple)):
            encoded = [encode(v, [*path, str(i)]) for i, v in enumerate(x)]
            return {"$tuple" if isinstance(x, tuple) else "$list": encoded}
        raise TypeError(f"flatten_state: unsupported type {type(x).__name__} at '{'.'.join(path) or '<root>'}'")

    meta = encode(obj, [])
    return tensors, meta


def unflatten_state(tensors: dict[str, torch.Tensor], meta: Any, device: str | torch.device | None = None) -> Any:
    """Inverse of `flatten_state`. Tensors are moved to `device` when given (numpy leaves stay on the host)."""

    def decode(m: Any) -> Any:
        if not isinstance(m, dict):
            return m
        if len(m) != 1:
            raise ValueError(f"unflatten_state: malformed node {m!r}")
        (tag, value), = m.items()
        if tag == "$tensor":
            t = _lookup(tensors, value)
            return t.to(device) if device is not None else t
        if tag == "$ndarray":
            return _lookup(tensors, value).numpy()
        if tag == "$float":
            return float(value)
        if tag == "$dict":
            return {key: decode(v) for key, v in value}
        if tag == "$list":
            return [decode(v) for v in value]
        if tag == "$tuple":
            return tuple(decode(v) for v in value)
        raise ValueError(f"unflatten_state: unknown tag {tag!r}")

    return decode(meta)


def _lookup(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise KeyError(f"unflatten_state: tensor '{name}' is missing from the checkpoint") from None


def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """Atomically write `state` (see `flatten_state`) as one safetensors file at `path`."""
    from safetensors.torch import save

    tensors, meta = flatten_state(state)
    header = {_META_KEY: json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "state": meta},
                                    allow_nan=False)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, save(tensors, metadata=header))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None) -> Any:
    """Read a file written by `save_checkpoint`; tensors land on `device` (default CPU). A file that is not a
    readable checkpoint raises `CheckpointError` (a missing one `FileNotFoundError`)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if _META_KEY not in header:
            raise CheckpointError(f"{path} is a safetensors file but not a dydiff-env checkpoint "
                                  f"(no '{_META_KEY}' metadata)")
        payload = json.loads(header[_META_KEY])
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != FORMAT_VERSION:
            found = payload if not isinstance(payload, dict) else (payload.get("format"), payload.get("version"))
            raise CheckpointError(f"{path}: unsupported checkpoint format {found!r} "
                                  f"(expected {FORMAT!r} version {FORMAT_VERSION})")
        return unflatten_state(tensors, payload["state"], device=device)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:  # a truncated or damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err


def checkpoint_exists(path: str | os.PathLike) -> bool:
    return os.path.isfile(path)


def rng_state(generator: torch.Generator, rng: np.random.Generator) -> dict:
    """Both random streams of a training loop, in a form `save_checkpoint` stores."""
    return {"torch": generator.get_state(), "numpy": rng.bit_generator.state}


def set_rng_state(state: dict, generator: torch.Generator, rng: np.random.Generator) -> None:
    generator.set_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
