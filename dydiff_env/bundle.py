"""Model bundles: a directory with `config.json` and one safetensors file per model. No pickle.

config.json holds the format version, package version, the versions of the packages that trained it
(`software_versions`, from `data.software_versions()`, refreshed by every model written), task and env id, obs/action dims, dataset id and
content hash, normalisation statistics, hyper-parameters, training summaries, and the sha256 of every
weight file. Bundles are untrusted input: `load_bundle(path)` checks all of it (`bundle_schema`: every field
of config.json, model sizes, tensor names, shapes, dtypes and values) before it builds a model, and raises
`BundleError` naming the field and the fix on a missing or corrupt file, a malformed field, a shape or dtype
mismatch, a model too large to load, a bundle for another env, or a newer format version.

`check_dataset_matches(bundle, data)` warns (`DatasetMismatchWarning`, once per bundle and dataset) when a local
dataset has the id of the bundle's training data but another content hash, and says how to fix it.

The bundle also stores up to `MAX_START_STATES` dataset observations (every episode start first), so an
environment can reset from dataset states without the dataset being present.

Writing (`BundleWriter`, `export_bundle`): one writer at a time holds the directory's lock file `.lock`
(`writers.WriterLock`). Every change is a commit: new files are written under names that config.json does
not reference (the plain `dynamics.safetensors`, or one tagged with the file's sha256 such as
`dynamics.1a2b3c4d.safetensors`), then ONE atomic replace of config.json makes them the bundle, then the
files it no longer references are deleted. Until that replace the previous bundle loads unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

# START_STATES_FILE is not used here but stays importable from this module, as before
from .bundle_schema import (FORMAT_VERSION, MODEL_FILES, START_STATES_FILE, BundleError, check_elites,
                            check_model_size, check_start_states, check_weights, file_kind, files_by_kind,
                            plain_file_name, tagged_file_name, validate_config)
from .config import START_STATE_MODES, TrainConfig, architecture_changes, describe_architecture_changes
from .data import DEFAULT_DATASET_ID, Normalizer, OfflineData, software_versions, versions_of
from .models import BCPolicy, DynamicsEnsemble, RewardModel, TrajectoryDiffusion, grid_sigmas, resolve_precision
from .tasks import Task, get_task, preset_for_dataset
from .writers import WriterLock, remove_stale_temporaries, write_atomically

MAX_START_STATES = 20_000
LOCK_FILE = ".lock"


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
    write_atomically(path, json.dumps(obj, indent=2).encode())


def _tensors_of(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous().clone()
            for k, v in model.state_dict().items()}


def write_new_file(directory: Path, kind: str, tensors: dict[str, torch.Tensor], referenced: set[str]) -> tuple[str, str]:
    """Write `tensors` as a bundle file of `kind` ('dynamics', ..., 'start_states') under a name that is not
    in `referenced` (the files config.json points to, which must stay as they are until it is replaced):
    the plain name when it is free, else the name tagged with the file's sha256. Returns (name, sha256)."""
    payload = save(tensors)
    digest = hashlib.sha256(payload).hexdigest()
    plain = plain_file_name(kind)
    name = plain if plain not in referenced else tagged_file_name(kind, digest)
    write_atomically(directory / name, payload)
    return name, digest


def remove_unreferenced_files(directory: Path, files: dict) -> list[str]:
    """Delete the bundle files (by their names: models and start states) that config.json's `files` does not
    list: the ones a commit replaced, or ones written by a run that died before its commit."""
    removed = []
    for path in directory.iterdir():
        if file_kind(path.name) is not None and path.name not in files and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def same_directory(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


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
    """The one writer of a bundle directory while models finish training (used by `training.train_models`).

    Holds the directory's lock from construction to `close()` (use it as a context manager); refuses a
    bundle of another dataset. Every change is one commit of config.json (see the module docstring)."""

    def __init__(self, out_dir: Path, data: OfflineData, config: TrainConfig):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(self.dir / LOCK_FILE, f"bundle {self.dir}")
        self.lock.acquire()
        try:
            self.meta = self._open(data, config)
            remove_stale_temporaries(self.dir)
            remove_unreferenced_files(self.dir, self.meta["files"])
        except BaseException:
            self.lock.release()
            raise

    def _open(self, data: OfflineData, config: TrainConfig) -> dict:
        cfg_path = self.dir / "config.json"
        if cfg_path.is_file():
            meta = _read_config(cfg_path)
            if meta.get("dataset_hash") != data.content_hash:
                raise BundleError(f"{self.dir} holds models trained on another dataset "
                                  f"({meta.get('dataset_id')}, hash {meta.get('dataset_hash')}); "
                                  "use a new --out directory")
            return meta
        task = get_task(data.env_id or data.dataset_id)
        norm = {}
        norm.update(Normalizer.fit(data.observations).to_dict("obs"))
        norm.update(Normalizer.fit(data.actions).to_dict("act"))
        norm.update(Normalizer.fit(np.concatenate([data.observations, data.actions], 1)).to_dict("transition"))
        meta = {
            "format_version": FORMAT_VERSION, "package_version": _package_version(),
            "software_versions": software_versions(), "task": task.name,
            "env_id": task.env_id, "obs_dim": data.obs_dim, "act_dim": data.act_dim,
            "dataset_id": data.dataset_id, "dataset_hash": data.content_hash, "dataset_transitions": len(data),
            "dataset_episodes": int(len(data.episode_starts)),
            "dataset_mean_return": float(data.episode_returns.mean()),
            "normalization": {k: np.asarray(v).tolist() for k, v in norm.items()},
            "train_config": config.to_dict(), "models": {}, "files": {},
        }
        starts = {k: torch.as_tensor(v) for k, v in start_state_sample(data, seed=config.seed).items()}
        name, digest = write_new_file(self.dir, "start_states", starts, referenced=set())
        meta["files"][name] = digest
        _atomic_json(cfg_path, meta)
        return meta

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _commit(self, meta: dict) -> None:
        """Make `meta` the bundle: one atomic replace of config.json, then delete what it no longer lists.
        `self.meta` changes only once the replace succeeded."""
        _atomic_json(self.dir / "config.json", meta)
        self.meta = meta
        remove_unreferenced_files(self.dir, meta["files"])

    def model_file(self, kind: str) -> Path | None:
        name = files_by_kind(self.meta["files"]).get(kind)
        return self.dir / name if name else None

    def has_model(self, kind: str) -> bool:
        file = self.model_file(kind)
        return kind in self.meta["models"] and file is not None and file.is_file()

    def has_intact_model(self, kind: str) -> bool:
        """The model is in config.json and its file has the sha256 recorded there."""
        file = self.model_file(kind)
        return self.has_model(kind) and _sha256(file) == self.meta["files"][file.name]

    @property
    def in_training(self) -> list[str]:
        return list(self.meta.get("in_training", []))

    def architecture_changes(self, kinds: list[str], config: TrainConfig) -> dict[str, dict]:
        """Per model kind, the architecture fields in which `config` differs from what config.json records."""
        recorded = TrainConfig.from_dict(self.meta["train_config"])
        return {kind: changes for kind in kinds if (changes := architecture_changes(recorded, config, kind))}

    def refuse_architecture_changes(self, kinds: list[str], config: TrainConfig) -> None:
        changes = self.architecture_changes(kinds, config)
        if changes:
            raise BundleError(f"bundle {self.dir} records another architecture for "
                              f"{describe_architecture_changes(changes)}; pass --overwrite to replace those "
                              "models, or train into a new --out directory")

    def start_training(self, kinds: list[str]) -> None:
        """Record that these models are being (re)trained, so that `--resume` continues them even where the
        bundle still holds a previous version."""
        if kinds and set(kinds) - set(self.in_training):
            meta = copy.deepcopy(self.meta)
            meta["in_training"] = [k for k in MODEL_FILES if k in kinds or k in self.in_training]
            self._commit(meta)

    def add_model(self, kind: str, model: torch.nn.Module, summary: dict, config: TrainConfig | None = None) -> None:
        """Commit a trained model: its weights under a new name, then config.json with its summary, its file's
        sha256 and the configuration it was trained with (`config`'s section for `kind`)."""
        meta = copy.deepcopy(self.meta)
        old = files_by_kind(meta["files"]).get(kind)
        name, digest = write_new_file(self.dir, kind, _tensors_of(model), referenced=set(meta["files"]))
        if old is not None:
            del meta["files"][old]
        meta["files"][name] = digest
        meta["models"][kind] = summary
        meta["software_versions"] = software_versions()  # the versions that trained the latest model
        if config is not None:
            meta["train_config"][kind] = dataclasses.asdict(getattr(config, kind))
            if kind == "diffusion":
                meta["train_config"]["sampler"] = dataclasses.asdict(config.sampler)
        if kind == "diffusion":  # a student learned from the replaced teacher: it no longer fits
            drop_student_of_another_teacher(meta)
        in_training = [k for k in meta.get("in_training", []) if k != kind]
        if in_training:
            meta["in_training"] = in_training
        else:
            meta.pop("in_training", None)
        self._commit(meta)


def teacher_sha256(meta: dict) -> str | None:
    """The sha256 of the diffusion model's weight file (the teacher of a student), None without one."""
    name = files_by_kind(meta["files"]).get("diffusion")
    return meta["files"][name] if name else None


def drop_student_of_another_teacher(meta: dict) -> None:
    """Remove from `meta` a student whose recorded teacher is not its diffusion model (which was retrained)."""
    student = meta["models"].get("student")
    if student is not None and student.get("teacher_sha256") != teacher_sha256(meta):
        del meta["models"]["student"]
        meta["files"].pop(files_by_kind(meta["files"]).get("student"), None)
        print("[train] student: removed from the bundle, its teacher was replaced; distil it again with "
              "`dydiff-env train distill --bundle DIR`")


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
    student: TrajectoryDiffusion | None = None  # the distilled few-step student of `diffusion`
    start_states: dict[str, np.ndarray] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    precision: str = "float32"  # the simulator networks' serving precision (`set_precision`)

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
        if missing == ["student"]:
            raise BundleError(f"bundle {self.path} has no distilled student; distil one with "
                              f"`dydiff-env train distill --bundle {self.path}`, or choose another sampler kind")
        if missing:
            raise BundleError(f"bundle {self.path} has no {', '.join(missing)} model; train it with "
                              f"`dydiff-env train {missing[0]} --dataset {self.meta.get('dataset_id')} --out {self.path}`")

    def student_sigmas(self, num_steps: int) -> list[float]:
        """The noise levels of the student's `num_steps`-step sampler (`models.student_sample`), highest first."""
        self.require("student")
        distill = self.config.student
        try:
            indices = distill.student_sigma_indices(num_steps)
        except ValueError as err:
            raise BundleError(f"bundle {self.path}: {err}") from err
        return grid_sigmas(distill.teacher_sampler(), indices)

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

    def set_precision(self, precision: str) -> "Bundle":
        """Serve the simulator's networks (diffusion, student, dynamics, reward; not the BC policy, which is an
        agent) in `precision`: "float32", "bfloat16" (autocast) or "auto" (bfloat16 where this bundle's device
        computes it natively, `models.native_bfloat16`). Never use it for training: it is float32 only."""
        self.precision = resolve_precision(precision, self.device)
        for kind in ("diffusion", "student", "dynamics", "reward"):
            model = getattr(self, kind)
            if model is not None:
                model.precision = self.precision
        return self

    @contextlib.contextmanager
    def serving(self, precision: str | None):
        """The simulator's networks in `precision` inside the block (`set_precision`), as before after it; None
        changes nothing. It switches the shared models, so two threads using one Bundle in different precisions
        at once would see each other's setting: give each thread its own `load_bundle`."""
        if precision is None:
            yield self
            return
        before = self.precision
        self.set_precision(precision)
        try:
            yield self
        finally:
            self.set_precision(before)

    def to(self, device: str | torch.device) -> "Bundle":
        self.device = torch.device(device)
        for kind in MODEL_FILES:
            model = getattr(self, kind)
            if model is not None:
                model.to(self.device)
        return self


def _build_model(kind: str, meta: dict, config: TrainConfig) -> torch.nn.Module:
    obs_dim, act_dim = meta["obs_dim"], meta["act_dim"]
    if kind in ("diffusion", "student"):  # the student has its teacher's architecture
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


def recorded_dataset_id(path: str | os.PathLike) -> str | None:
    """The id of the dataset a bundle's models were trained on, from its checked config.json."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise BundleError(f"{path} has no config.json, so it is not a dydiff-env bundle; train one with "
                          "`dydiff-env train all --dataset ID --out DIR`")
    return _read_config(cfg_path).get("dataset_id")


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
                require: tuple[str, ...] = (), without: tuple[str, ...] = (), precision: str = "float32") -> Bundle:
    """Load and validate a bundle directory. `env_id`, when given, must match the bundle's env. `without`:
    model kinds not to load (their files are neither read nor checked; distillation loads its teacher
    without the student it replaces). `precision`: how the simulator's networks are served
    (`Bundle.set_precision`).

    A student whose recorded teacher sha256 is not the diffusion model's file is refused (it was distilled
    from another diffusion model): distil it again.

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
    skeletons = {kind: _model_skeleton(kind, meta, config, cfg_path) for kind in MODEL_FILES
                 if kind in meta["models"] and kind not in without}
    if "student" in skeletons and meta["models"]["student"]["teacher_sha256"] != teacher_sha256(meta):
        raise BundleError(f"bundle {path}: the student was distilled from another diffusion model than the bundle's "
                          f"(teacher sha256 {meta['models']['student']['teacher_sha256'][:12]}... differs from "
                          f"the diffusion file's); distil it again with `dydiff-env train distill --bundle {path}`")
    for kind, skeleton in skeletons.items():
        check_model_size(kind, skeleton.state_dict(), cfg_path)
    models = dict.fromkeys(MODEL_FILES)
    names = files_by_kind(meta["files"])
    for kind, skeleton in skeletons.items():
        file = path / names[kind]
        tensors = _load_tensors(file, meta["files"][names[kind]])
        expected = skeleton.state_dict()
        check_weights(kind, tensors, expected, file)
        if kind == "dynamics":
            check_elites(tensors["elites"], config.dynamics.ensemble_size, meta["models"]["dynamics"].get("elites"), file)
        model = _build_model(kind, meta, config)
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
        models[kind] = model.eval().requires_grad_(False)
    start_states = {}
    if "start_states" in names:
        file = path / names["start_states"]
        tensors = _load_tensors(file, meta["files"][names["start_states"]])
        check_start_states(tensors, meta["obs_dim"], file)
        start_states = _start_state_arrays(tensors)
    bundle = Bundle(path, meta, task, config, start_states=start_states, **models).to(device)
    bundle.require(*require)
    bundle.set_precision(precision)
    return bundle


class DatasetMismatchWarning(UserWarning):
    """A local dataset has the id of the dataset a bundle was trained on, but another content hash."""


# (bundle directory, its dataset hash, dataset id, local hash) already warned about: one warning per pair
_warned_mismatches: set[tuple[str, str, str, str]] = set()


def check_dataset_matches(bundle: Bundle, data: OfflineData) -> bool:
    """Whether `data` can be the dataset `bundle` was trained on. False when `data` has the bundle's recorded
    dataset id but another content hash: then a `DatasetMismatchWarning` names both hashes and the fix, once
    per (bundle, dataset) pair. True for the same hash, for a dataset of another id (e.g. generated data, or
    another dataset used on purpose), and for a bundle that records no dataset."""
    recorded_id, recorded_hash = bundle.meta.get("dataset_id"), bundle.meta.get("dataset_hash")
    if not recorded_id or not recorded_hash or data.dataset_id != recorded_id or data.content_hash == recorded_hash:
        return True
    key = (str(Path(bundle.path).resolve()), recorded_hash, data.dataset_id, data.content_hash)
    if key not in _warned_mismatches:
        _warned_mismatches.add(key)
        warnings.warn(dataset_mismatch_message(bundle, data), DatasetMismatchWarning, stacklevel=2)
    return False


def dataset_mismatch_message(bundle: Bundle, data: OfflineData) -> str:
    meta = bundle.meta
    return (f"dataset '{data.dataset_id}' here has content hash {data.content_hash}, but bundle {bundle.path} was "
            f"trained on '{meta['dataset_id']}' with hash {meta['dataset_hash']}, so its models learned other data. "
            f"To use them together, {recollect_advice(data, versions_of(meta.get('software_versions')))}, or train "
            f"a bundle on your dataset with `dydiff-env train all --dataset {data.dataset_id} --out DIR`")


def recollect_advice(data: OfflineData, bundle_versions: dict[str, str]) -> str:
    """How to collect the bundle's dataset again, with the versions to install where they are known."""
    preset = preset_for_dataset(data.dataset_id)
    how = (f"collect it again with `dydiff-env collect {preset} --overwrite`" if preset
           else "make it again the way the bundle's dataset was made")
    if not bundle_versions:
        return f"{how} (the bundle records no software versions)"
    if not data.software_versions:
        return f"{how} using the versions recorded in the bundle: {show_versions(bundle_versions)}"
    diff = versions_diff(data.software_versions, bundle_versions)
    if not diff:
        return (f"{how} using the same settings (--seed, --steps) as the bundle's dataset: the dataset records the "
                "same software versions as the bundle")
    shown = ", ".join(f"{name} {here} in the dataset vs {there} in the bundle" for name, (here, there) in diff.items())
    return f"{how} using the versions recorded in the bundle (they differ: {shown})"


def versions_diff(here: dict[str, str], there: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Package -> (version in `here`, version in `there`) for every package whose recorded versions differ."""
    missing = "not recorded"
    return {name: (here.get(name, missing), there.get(name, missing)) for name in sorted(set(here) | set(there))
            if here.get(name, missing) != there.get(name, missing)}


def show_versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items())


def export_bundle(src: str | os.PathLike, dst: str | os.PathLike, half: bool = True,
                  sampler: dict | None = None) -> Path:
    """Copy a bundle without its training checkpoints, optionally storing weights as float16 (half the size;
    loading converts back to float32). Used to make the bundle shipped inside the package. `sampler`: fields of
    `SamplerConfig` that replace the copy's default sampler (`train_config.sampler`, what `dydiff_rollout` and
    `DydiffEnv` use unless told otherwise), checked like the rest of config.json.

    `dst` is written as one commit under its lock (see the module docstring): a bundle already there stays
    loadable until the new config.json replaces its own."""
    src, dst = Path(src), Path(dst)
    if same_directory(src, dst):
        raise BundleError(f"export would overwrite its source {src}; pass another destination directory")
    src_b = load_bundle(src)
    if sampler is not None:  # checked before anything is written: e.g. a student default without a student
        src_b.meta["train_config"]["sampler"] = {**src_b.meta["train_config"].get("sampler", {}), **sampler}
        validate_config(src_b.meta, f"export {src} --sampler")
    dst.mkdir(parents=True, exist_ok=True)
    with WriterLock(dst / LOCK_FILE, f"bundle {dst}"):
        remove_stale_temporaries(dst)
        referenced = set(_referenced_files(dst))
        meta = json.loads(json.dumps(src_b.meta))
        meta.pop("in_training", None)
        meta["files"] = {}
        for kind in MODEL_FILES:
            model = getattr(src_b, kind)
            if model is not None:
                name, digest = write_new_file(dst, kind, _tensors_of(model, torch.float16 if half else torch.float32),
                                              referenced)
                meta["files"][name] = digest
        if src_b.start_states:
            starts = {k: torch.as_tensor(v) for k, v in src_b.start_states.items()}
            name, digest = write_new_file(dst, "start_states", starts, referenced)
            meta["files"][name] = digest
        if "student" in meta["models"]:  # its teacher is the diffusion file written here
            meta["models"]["student"]["teacher_sha256"] = teacher_sha256(meta)
        meta["weights_dtype"] = "float16" if half else "float32"
        _atomic_json(dst / "config.json", meta)
        remove_unreferenced_files(dst, meta["files"])
        for extra in ("metrics.csv",):
            if (src / extra).is_file():
                write_atomically(dst / extra, (src / extra).read_bytes())
    return dst


def _referenced_files(directory: Path) -> list[str]:
    """The files the config.json in `directory` lists, as far as it can be read (a damaged or missing one
    protects nothing: nothing there loads)."""
    try:
        files = json.loads((directory / "config.json").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in files if isinstance(name, str)] if isinstance(files, dict) else []
