"""Shared test fixtures.

Everything here is isolated from the user's machine and kept small enough for a 1-thread CPU:

- `MINARI_DATASETS_PATH` points to a fresh temporary directory for the whole test session. It is set when
  this module is imported, i.e. before any test module imports minari or `dydiff_env.data`, so no test can
  read or overwrite the user's datasets in ~/.minari. The directory is removed at the end of the session.
- torch uses one intra-op thread (the test machines are small and shared).

Session-scoped fixtures, reused by every test file (data, models, bundle, env, agents):

- `tiny_dataset` -> `OfflineData`: about 3000 Hopper-v5 transitions of a uniform random policy, collected in the
  real simulator with qpos/qvel recorded, written as the Minari dataset `TINY_DATASET_ID` and loaded back
  with `data.load_dataset`. Random-policy episodes are short (roughly 10-75 steps, all but possibly the last
  end in a fall).
- `tiny_config` -> `TrainConfig`: a fresh copy of `config.preset("tiny")` (function-scoped; mutate freely).
- `tiny_bundle` -> `pathlib.Path`: a bundle directory with all four models (dynamics, reward, bc, diffusion)
  trained on `tiny_dataset` with the tiny preset. Treat it as read-only; tests that need to modify a bundle
  must use `tiny_bundle_copy` (function-scoped: a private copy under the test's tmp_path) instead.
- `torchrun_problem(tmp_path, env)`: why two gloo processes cannot start under torchrun here (None when they
  can); a torchrun test that failed calls it to skip with the reason instead of failing on such a machine.
- `gl_renderer`: skips the test, with the reason, when MuJoCo cannot render a frame on this machine. Probed once,
  in a subprocess (a broken OpenGL library can crash the process that tries it). MUJOCO_GL is left as the
  package sets it (egl on a machine without a display, see `dydiff_env.render`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

_MINARI_DIR = tempfile.mkdtemp(prefix="dydiff-test-minari-")
os.environ["MINARI_DATASETS_PATH"] = _MINARI_DIR

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_DATASET_ID = "test/hopper/random-v0"
TINY_ENV_ID = "Hopper-v5"
TINY_DATASET_STEPS = 3000
TINY_DATASET_SEED = 0


@pytest.fixture(scope="session", autouse=True)
def _isolated_minari_and_threads():
    """Keep MINARI_DATASETS_PATH on the session temp dir and torch on one thread; clean up afterwards."""
    os.environ["MINARI_DATASETS_PATH"] = _MINARI_DIR
    torch.set_num_threads(1)
    yield _MINARI_DIR
    shutil.rmtree(_MINARI_DIR, ignore_errors=True)


def random_policy(act_dim: int, seed: int = 0):
    """A batch policy (obs (B, obs_dim) -> actions (B, act_dim)) of uniform random actions in [-1, 1]."""
    rng = np.random.default_rng(seed)

    def policy(obs: np.ndarray) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=(obs.shape[0], act_dim)).astype(np.float32)

    return policy


@pytest.fixture(scope="session")
def tiny_dataset():
    """~3000 random-policy Hopper-v5 transitions as `OfflineData` (Minari id `TINY_DATASET_ID`)."""
    from dydiff_env import data

    buffers = data.collect_episodes(TINY_ENV_ID, random_policy(3, TINY_DATASET_SEED), TINY_DATASET_STEPS,
                                    seed=TINY_DATASET_SEED, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eval_env.*", category=UserWarning)  # minari's note
        data.write_minari_dataset(TINY_DATASET_ID, TINY_ENV_ID, buffers, description="dydiff-env test data",
                                  overwrite=True)
    return data.load_dataset(TINY_DATASET_ID)


@pytest.fixture
def tiny_config():
    """A fresh `config.preset("tiny")` (safe to modify)."""
    from dydiff_env import config

    return config.preset("tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dataset, tmp_path_factory) -> Path:
    """Path of a read-only bundle with all four models trained on `tiny_dataset` with the tiny preset."""
    from dydiff_env import config, training

    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    training.train_models(list(training.MODEL_KINDS), tiny_dataset, out, config.preset("tiny"), progress=False)
    return out


@pytest.fixture
def tiny_bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private, modifiable copy of `tiny_bundle` (checkpoints included) under the test's tmp_path."""
    dst = tmp_path / "bundle-copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


RENDER_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])  # the dydiff_env this test session imports
from dydiff_env.render import render_problem
problem = render_problem()
print(" ".join((problem or "ok").split()))  # one line: the skip reason
sys.exit(1 if problem else 0)
"""


@pytest.fixture(scope="session")
def gl_renderer() -> str:
    """The OpenGL backend MuJoCo renders with here (MUJOCO_GL); skips the test when it cannot render."""
    import dydiff_env  # sets MUJOCO_GL=egl on a machine without a display; the probe inherits it

    package_root = str(Path(dydiff_env.__file__).resolve().parents[1])
    try:
        probe = subprocess.run([sys.executable, "-c", RENDER_PROBE, package_root], capture_output=True, text=True,
                               timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("no OpenGL backend can render here: the render probe timed out after 180 s")
    if probe.returncode != 0:
        # the probe prints its reason last on stdout; a crash leaves only stderr
        reason = (probe.stdout.strip().splitlines() or probe.stderr.strip().splitlines() or
                  [f"the probe exited with code {probe.returncode}"])[-1]
        pytest.skip(f"no OpenGL backend can render here (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {reason}")
    return os.environ.get("MUJOCO_GL", "gymnasium's default")


def torchrun_problem(tmp_path: Path, env: dict) -> str | None:
    """Why two gloo processes cannot start here (None when they can)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch.distributed as dist\ndist.init_process_group('gloo')\ndist.barrier()\n"
                     "dist.destroy_process_group()\n")
    try:
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(probe)], capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        return "two gloo processes did not start within 120 s"
    if run.returncode == 0:
        return None
    lines = (run.stderr + run.stdout).strip().splitlines() or [f"exit code {run.returncode}"]
    return f"exit code {run.returncode}: {lines[-1]}"
