"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

`flatten_state` splits any nesting of dicts / lists / tuples holding tensors, numpy arrays and JSON
scalars (an optimizer's state_dict, RNG states, counters) into a flat {path: tensor} map and a JSON
skeleton; `unflatten_state` rebuilds it. `save_checkpoint` writes both files to temporary names and then
renames them, a checkpoint directory entry at a time, so a kill at any moment leaves the previous complete
checkpoint in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {_TENSOR: path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
            return {_NDARRAY: path}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}") if not isinstance(k, (str, int)) else k,
                                  walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at '{path}'")

    skeleton = walk(obj, prefix or "s")
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    def build(node):
        if isinstance(node, dict):
            if _TENSOR in node:
                return tensors[node[_TENSOR]]
            if _NDARRAY in node:
                return tensors[node[_NDARRAY]].numpy()
            if _TUPLE in node:
                return tuple(build(v) for v in node[_TUPLE])
            if "__dict__" in node:
                return {build(k) if isinstance(k, dict) else k: build(v) for k, v in node["__dict__"]}
        if isinstance(node, list):
            return [build(v) for v in node]
        return node

    return build(skeleton)


def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """Write `path.safetensors` and `path.json` atomically (the JSON, written last, names the tensor file's
    content hash, so a half-updated pair is detected on load)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, skeleton = flatten_state(state)
    tmp_t, tmp_j = path.with_suffix(".safetensors.tmp"), path.with_suffix(".json.tmp")
    # safetensors refuses tensors that share memory; checkpoints are small enough to copy
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_t))
    size = tmp_t.stat().st_size
    with open(tmp_j, "w") as f:
        json.dump({"skeleton": skeleton, "tensor_file_size": size}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_t, path.with_suffix(".safetensors"))
    os.replace(tmp_j, path.with_suffix(".json"))


def load_checkpoint(path: str | os.PathLike) -> Any:
    path = Path(path)
    tfile, jfile = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not (tfile.is_file() and jfile.is_file()):
        raise FileNotFoundError(f"no checkpoint at {path} (expected {tfile.name} and {jfile.name})")
    with open(jfile) as f:
        meta = json.load(f)
    if tfile.stat().st_size != meta["tensor_file_size"]:
        raise ValueError(f"checkpoint {path} is inconsistent (interrupted while writing?); delete it to restart")
    return unflatten_state(load_file(str(tfile)), meta["skeleton"])


def checkpoint_exists(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.with_suffix(".safetensors").is_file() and path.with_suffix(".json").is_file()


def rng_state(generator: torch.Generator, rng: np.random.Generator) -> dict:
    return {"torch": generator.get_state(), "numpy": rng.bit_generator.state}


def set_rng_state(state: dict, generator: torch.Generator, rng: np.random.Generator) -> None:
    generator.set_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
