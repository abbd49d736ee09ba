"""Model bundles: a directory with `config.json` and one safetensors file per model. No pickle.

config.json holds the format version, package version, task and env id, obs/action dims, dataset id and
content hash, normalisation statistics, hyper-parameters, training summaries, and the sha256 of every
weight file. Bundles are untrusted input: `load_bundle(path)` checks all of it (`bundle_schema`: every field
of config.json, model sizes, tensor names, shapes, dtypes and values) before it builds a model, and raises
`BundleError` naming the field and the fix on a missing or corrupt file, a malformed field, a shape or dtype
mismatch, a model too large to load, a bundle for another env, or a newer format version.

The bundle also stores up to `MAX_START_STATES` dataset observations (every episode start first), so an
environment can reset from dataset states without the dataset being present.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bundle_schema import (FORMAT_VERSION, MODEL_FILES, START_STATES_FILE, BundleError, check_elites,
                            check_model_size, check_start_states, check_weights, validate_config)
from .config import START_STATE_MODES, TrainConfig
from .data import DEFAULT_DATASET_ID, Normalizer, OfflineData
from .models import BCPolicy, DynamicsEnsemble, RewardModel, TrajectoryDiffusion
from .tasks import Task, get_task

MAX_START_STATES = 20_000


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("dydiff-env")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_weights(path: Path, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous().clone()
               for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def start_state_sample(data: OfflineData, limit: int = MAX_START_STATES, seed: int = 0) -> dict[str, np.ndarray]:
    """Dataset observations to reset from: all episode starts (up to the limit), then a uniform sample."""
    starts = data.episode_starts[:limit]
    rest = np.setdiff1d(np.arange(len(data)), starts)
    extra = np.random.default_rng(seed).choice(rest, size=min(limit - len(starts), len(rest)), replace=False)
    rows = np.concatenate([starts, np.sort(extra)])
    out = {"observations": data.observations[rows].astype(np.float32),
           "is_episode_start": np.isin(rows, data.episode_starts)}
    if data.qpos is not None:
        out["qpos"], out["qvel"] = data.qpos[rows], data.qvel[rows]
    return out


class BundleWriter:
    """Writes a bundle incrementally while models finish training (used by `training.train_models`)."""

    def __init__(self, out_dir: Path, data: OfflineData, config: TrainConfig):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        task = get_task(data.env_id or data.dataset_id)
        cfg_path = self.dir / "config.json"
        if cfg_path.is_file():
            self.meta = _read_config(cfg_path)
            if self.meta.get("dataset_hash") != data.content_hash:
                raise BundleError(f"{self.dir} holds models trained on another dataset "
                                  f"({self.meta.get('dataset_id')}, hash {self.meta.get('dataset_hash')}); "
                                  "use a new --out directory")
        else:
            norm = {}
            norm.update(Normalizer.fit(data.observations).to_dict("obs"))
            norm.update(Normalizer.fit(data.actions).to_dict("act"))
            norm.update(Normalizer.fit(np.concatenate([data.observations, data.actions], 1)).to_dict("transition"))
            self.meta = {
                "format_version": FORMAT_VERSION, "package_version": _package_version(), "task": task.name,
                "env_id": task.env_id, "obs_dim": data.obs_dim, "act_dim": data.act_dim,
                "dataset_id": data.dataset_id, "dataset_hash": data.content_hash, "dataset_transitions": len(data),
                "dataset_episodes": int(len(data.episode_starts)),
                "dataset_mean_return": float(data.episode_returns.mean()),
                "normalization": {k: np.asarray(v).tolist() for k, v in norm.items()},
                "train_config": config.to_dict(), "models": {}, "files": {},
            }
            starts = start_state_sample(data, seed=config.seed)
            save_file({k: torch.as_tensor(v) for k, v in starts.items()}, str(self.dir / START_STATES_FILE))
            self.meta["files"][START_STATES_FILE] = _sha256(self.dir / START_STATES_FILE)
            _atomic_json(cfg_path, self.meta)

    def has_model(self, kind: str) -> bool:
        return kind in self.meta["models"] and (self.dir / MODEL_FILES[kind]).is_file()

    def add_model(self, kind: str, model: torch.nn.Module, summary: dict) -> None:
        path = self.dir / MODEL_FILES[kind]
        _save_weights(path, model)
        self.meta["models"][kind] = summary
        self.meta["files"][MODEL_FILES[kind]] = _sha256(path)
        _atomic_json(self.dir / "config.json", self.meta)


@dataclass
class Bundle:
    """Loaded models plus everything needed to use them; `None` for a model the bundle does not have."""

    path: Path
    meta: dict
    task: Task
    config: TrainConfig
    diffusion: TrajectoryDiffusion | None
    dynamics: DynamicsEnsemble | None
    reward: RewardModel | None
    bc: BCPolicy | None
    start_states: dict[str, np.ndarray] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")

    @property
    def obs_dim(self) -> int:
        return self.meta["obs_dim"]

    @property
    def act_dim(self) -> int:
        return self.meta["act_dim"]

    def normalizer(self, name: str) -> Normalizer:
        """'obs', 'act' or 'transition' (obs and actions concatenated, used by the diffusion model)."""
        return Normalizer.from_dict(self.meta["normalization"], name)

    def require(self, *kinds: str) -> None:
        missing = [k for k in kinds if getattr(self, k) is None]
        if missing:
            raise BundleError(f"bundle {self.path} has no {', '.join(missing)} model; train it with "
                              f"`dydiff-env train {missing[0]} --dataset {self.meta.get('dataset_id')} --out {self.path}`")

    def sample_start_obs(self, count: int, rng: np.random.Generator, mode: str = "any") -> torch.Tensor:
        """`count` stored dataset observations. The stored sample holds every episode start plus a uniform
        subsample of the other rows. mode: "any" - as if drawn uniformly from the whole dataset (each stored
        row weighted by how many dataset rows of its kind it stands for); "episode_starts" - episode starts
        only; "stored" - uniformly over the stored rows, i.e. episode starts about 10x over-represented (what
        versions before the env redesign did)."""
        if mode not in START_STATE_MODES:
            raise ValueError(f"start-state mode must be one of {list(START_STATE_MODES)}, got {mode!r}")
        starts = self.start_states
        if not starts:
            raise BundleError(f"bundle {self.path} stores no start states; re-train or re-export it")
        is_start = np.asarray(starts["is_episode_start"], dtype=bool)
        if mode == "episode_starts" and is_start.any():
            pick = np.flatnonzero(is_start)[rng.integers(0, int(is_start.sum()), size=count)]
        elif mode == "stored":
            pick = rng.integers(0, len(is_start), size=count)
        else:  # what rng.choice(p=weights) does, with the cumulative weights computed once
            pick = self._start_cdf.searchsorted(rng.random(count), side="right")
        return torch.as_tensor(starts["observations"][pick], device=self.device)

    @cached_property
    def _start_cdf(self) -> np.ndarray:
        is_start = np.asarray(self.start_states["is_episode_start"], dtype=bool)
        stored_starts, stored_rest = int(is_start.sum()), int((~is_start).sum())
        episodes, rows = self.meta.get("dataset_episodes"), self.meta.get("dataset_transitions")
        if stored_starts and stored_rest and episodes and rows and rows > episodes:
            weights = np.where(is_start, episodes / stored_starts, (rows - episodes) / stored_rest)
        else:  # nothing to correct for
            weights = np.ones(len(is_start))
        cdf = (weights / weights.sum()).cumsum()
        return cdf / cdf[-1]

    def to(self, device: str | torch.device) -> "Bundle":
        self.device = torch.device(device)
        for kind in MODEL_FILES:
            model = getattr(self, kind)
            if model is not None:
                model.to(self.device)
        return self


def _build_model(kind: str, meta: dict, config: TrainConfig) -> torch.nn.Module:
    obs_dim, act_dim = meta["obs_dim"], meta["act_dim"]
    if kind == "diffusion":
        c = config.diffusion
        return TrajectoryDiffusion(obs_dim, act_dim, c.horizon, c.channels, c.kernel_size, c.sigma_data)
    if kind == "dynamics":
        c = config.dynamics
        return DynamicsEnsemble(obs_dim, act_dim, c.ensemble_size, c.num_elites, c.hidden)
    if kind == "reward":
        return RewardModel(obs_dim, act_dim, config.reward.hidden)
    return BCPolicy(obs_dim, act_dim, config.bc.hidden)


def _model_skeleton(kind: str, meta: dict, config: TrainConfig, cfg_path: Path) -> torch.nn.Module:
    """The model as config.json describes it, on the meta device: the names, shapes, dtypes and size of its
    weights, with nothing allocated."""
    try:
        with torch.device("meta"):
            return _build_model(kind, meta, config)
    except (ValueError, RuntimeError) as err:  # validate_config should have refused such a config already
        raise BundleError(f"{cfg_path} describes a {kind} model that cannot be built ({err}); "
                          "re-copy the bundle or re-train it") from err


def _load_tensors(path: Path, expected_sha: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BundleError(f"bundle file {path} is missing; re-train that model with `dydiff-env train` "
                          "or copy the complete bundle directory")
    if _sha256(path) != expected_sha:
        raise BundleError(f"bundle file {path} is corrupt (sha256 differs from config.json); "
                          "re-copy the bundle or re-train that model")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"bundle file {path} is not a readable safetensors file ({err}); re-copy or re-train it") from err


def _read_config(cfg_path: Path) -> dict:
    """config.json, parsed and checked whole (`bundle_schema.validate_config`)."""
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{cfg_path} is corrupt ({err}); re-copy the bundle or re-train it") from err
    validate_config(meta, cfg_path)
    return meta


def _start_state_arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Checked start-state tensors as numpy (numpy has no bfloat16, so floats are converted first)."""
    out = {"observations": tensors["observations"].float().numpy(),
           "is_episode_start": tensors["is_episode_start"].numpy()}
    for key in ("qpos", "qvel"):
        if key in tensors:
            out[key] = tensors[key].double().numpy()
    return out


def load_bundle(path: str | os.PathLike, env_id: str | None = None, device: str | torch.device = "cpu",
                require: tuple[str, ...] = ()) -> Bundle:
    """Load and validate a bundle directory. `env_id`, when given, must match the bundle's env.

    A bundle is untrusted input (see `bundle_schema`): config.json is checked whole and every model's size is
    counted before a weight file is read; every tensor is checked (names, shapes, dtypes, finite values) before
    a model is built; only the bundle's own file names are opened. Every problem raises `BundleError`."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise BundleError(f"no bundle directory at {path}; train one with "
                          f"`dydiff-env train all --dataset {DEFAULT_DATASET_ID} --out {path}`")
    if not cfg_path.is_file():
        raise BundleError(f"{path} has no config.json, so it is not a dydiff-env bundle (or its training never "
                          "wrote one); train one with `dydiff-env train all --dataset ID --out DIR`")
    meta = _read_config(cfg_path)
    if env_id is not None:
        try:
            get_task(env_id)
        except ValueError as err:
            raise BundleError(str(err)) from err
    if env_id is not None and get_task(env_id).env_id != meta["env_id"]:
        raise BundleError(f"bundle {path} models {meta['env_id']}, not {get_task(env_id).env_id}; "
                          "pass a bundle trained on a dataset of that env")
    task, config = get_task(meta["env_id"]), TrainConfig.from_dict(meta["train_config"])
    skeletons = {kind: _model_skeleton(kind, meta, config, cfg_path) for kind in MODEL_FILES if kind in meta["models"]}
    for kind, skeleton in skeletons.items():
        check_model_size(kind, skeleton.state_dict(), cfg_path)
    models = dict.fromkeys(MODEL_FILES)
    for kind, skeleton in skeletons.items():
        file = path / MODEL_FILES[kind]
        tensors = _load_tensors(file, meta["files"][MODEL_FILES[kind]])
        expected = skeleton.state_dict()
        check_weights(kind, tensors, expected, file)
        if kind == "dynamics":
            check_elites(tensors["elites"], config.dynamics.ensemble_size, meta["models"]["dynamics"].get("elites"), file)
        model = _build_model(kind, meta, config)
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
        models[kind] = model.eval().requires_grad_(False)
    start_states = {}
    if START_STATES_FILE in meta["files"]:
        file = path / START_STATES_FILE
        tensors = _load_tensors(file, meta["files"][START_STATES_FILE])
        check_start_states(tensors, meta["obs_dim"], file)
        start_states = _start_state_arrays(tensors)
    bundle = Bundle(path, meta, task, config, start_states=start_states, **models).to(device)
    bundle.require(*require)
    return bundle


def export_bundle(src: str | os.PathLike, dst: str | os.PathLike, half: bool = True) -> Path:
    """Copy a bundle without its training checkpoints, optionally storing weights as float16 (half the size;
    loading converts back to float32). Used to make the bundle shipped inside the package."""
    src_b = load_bundle(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps(src_b.meta))
    meta["files"] = {}
    for kind, filename in MODEL_FILES.items():
        model = getattr(src_b, kind)
        if model is not None:
            _save_weights(dst / filename, model, torch.float16 if half else torch.float32)
            meta["files"][filename] = _sha256(dst / filename)
    if src_b.start_states:
        save_file({k: torch.as_tensor(v) for k, v in src_b.start_states.items()}, str(dst / START_STATES_FILE))
        meta["files"][START_STATES_FILE] = _sha256(dst / START_STATES_FILE)
    meta["weights_dtype"] = "float16" if half else "float32"
    _atomic_json(dst / "config.json", meta)
    for extra in ("metrics.csv",):
        if (Path(src) / extra).is_file():
            (dst / extra).write_bytes((Path(src) / extra).read_bytes())
    return dst

