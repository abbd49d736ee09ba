"""Drawing a learned model's state through MuJoCo.

A model's state is an observation, and an observation of the v5 locomotion envs holds the whole MuJoCo state
but the root's x position (see the `Task` fields `hidden_qpos`, `x_velocity_index`, `dt`):

- `integrate_x` advances the x position by one env step from the observed x velocity before and after it;
- `state_from_obs` rebuilds (qpos, qvel) from an observation and that x position;
- `StateRenderer` sets the state on one real env of the task and renders it (one renderer, reused per frame),
  through the model's own "track" camera, which follows the body: the x position shows as the floor moving by.

Headless machines: MuJoCo draws through an OpenGL backend chosen by `MUJOCO_GL`. Without it Gymnasium tries
glfw first, which on a Linux machine without a display fails only when it draws, so importing `dydiff_env`
sets `MUJOCO_GL=egl` there when libEGL is installed (Debian packages libegl1 and libgl1-mesa-dri), else
`osmesa` when libOSMesa is (libosmesa6). `render_problem()` says whether this machine can render, and why not.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

import numpy as np

from .tasks import Task

RENDER_MODES = ("human", "rgb_array")
DEFAULT_SIZE = 480  # pixels, Gymnasium's MuJoCo default
# The camera of the locomotion models that follows the body's centre of mass. Gymnasium's default view of the
# v5 envs is a free camera that stays where the episode starts, so a hopper that moves on leaves the picture.
CAMERA = "track"
# The models ask for 4096-pixel shadow maps: most of a frame's cost at a few hundred pixels, 5x more than the
# frame itself with software OpenGL (Mesa's llvmpipe), for no visible difference at these sizes.
SHADOW_SIZE = 1024
INSTALL_HINT = ("on a headless Linux machine install an offscreen OpenGL library (Debian/Ubuntu: `apt-get install "
                "libegl1 libgl1-mesa-dri` for MUJOCO_GL=egl, or `libosmesa6` for MUJOCO_GL=osmesa)")


class RenderError(RuntimeError):
    """MuJoCo could not draw a frame on this machine (no usable OpenGL backend)."""


def has_display() -> bool:
    """Whether a window can be opened: always on macOS and Windows, on Linux when X11 or Wayland is there."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def available_render_modes() -> list[str]:
    """The render modes this machine can honour ("human" needs a display): an env's metadata lists these, so
    Gymnasium's `check_env` tries only what can work here."""
    return [mode for mode in RENDER_MODES if mode != "human" or has_display()]


def choose_gl_backend() -> str | None:
    """The OpenGL backend MuJoCo will use: `MUJOCO_GL` when set; else, on a machine without a display, "egl" or
    "osmesa", whichever library is installed (set in os.environ: MuJoCo reads it when it is first imported,
    Gymnasium when it makes a renderer); else None (Gymnasium picks glfw)."""
    if "MUJOCO_GL" not in os.environ and not has_display():
        # only a backend whose libraries exist: MuJoCo loads the one named at import, and a missing library
        # would then break every MuJoCo env, not only rendering
        if ctypes.util.find_library("EGL") and ctypes.util.find_library("GL"):
            os.environ["MUJOCO_GL"] = "egl"
        elif ctypes.util.find_library("OSMesa"):
            os.environ["MUJOCO_GL"] = "osmesa"
    return os.environ.get("MUJOCO_GL")


def make_render_env(env_id: str, render_mode: str = "rgb_array", width: int = DEFAULT_SIZE,
                    height: int = DEFAULT_SIZE):
    """A real env that draws as `StateRenderer` does: the body-following camera, smaller shadow maps."""
    import gymnasium as gym

    choose_gl_backend()  # before Gymnasium makes its renderer, which reads MUJOCO_GL
    env = gym.make(env_id, render_mode=render_mode, width=width, height=height, camera_name=CAMERA)
    env.unwrapped.model.vis.quality.shadowsize = SHADOW_SIZE  # read when the first frame makes the GL context
    return env


def check_render_mode(render_mode: str | None) -> None:
    """Refuse a render mode the env cannot honour here, naming what to use instead."""
    if render_mode is None:
        return
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {list(RENDER_MODES)} or None, got {render_mode!r}")
    if render_mode == "human" and not has_display():
        raise ValueError("render_mode='human' needs a display and this machine has none (DISPLAY and WAYLAND_DISPLAY "
                         "are unset); use render_mode='rgb_array' and save the frames (e.g. imageio.mimsave)")


def integrate_x(x: np.ndarray, velocity_before: np.ndarray, velocity_after: np.ndarray, dt: float) -> np.ndarray:
    """x positions one env step later. The trapezoid rule on the x velocities observed before and after the
    step: the real displacement sums the velocities of the step's MuJoCo substeps, which run between the two."""
    return x + 0.5 * dt * (np.asarray(velocity_before, np.float64) + np.asarray(velocity_after, np.float64))


def state_from_obs(obs: np.ndarray, x_position: float, task: Task, nq: int, nv: int) -> tuple[np.ndarray, np.ndarray]:
    """(qpos, qvel) of one observation [qpos[hidden_qpos:], qvel]; the hidden qpos entries are the root's x
    position, given, then zeros. `nq`, `nv`: the sizes of the task's MuJoCo model."""
    obs = np.asarray(obs, dtype=np.float64)
    observed_qpos = nq - task.hidden_qpos
    if obs.shape != (observed_qpos + nv,):
        raise ValueError(f"a {task.env_id} observation holds qpos[{task.hidden_qpos}:] ({observed_qpos} values) and "
                         f"qvel ({nv}): expected shape ({observed_qpos + nv},), got {obs.shape}")
    qpos = np.zeros(nq)
    qpos[0] = x_position
    qpos[task.hidden_qpos:] = obs[:observed_qpos]
    return qpos, obs[observed_qpos:].copy()


class StateRenderer:
    """Draws observations of `task` through one real env of it (made on first use, then reused)."""

    def __init__(self, task: Task, render_mode: str = "rgb_array", width: int = DEFAULT_SIZE,
                 height: int = DEFAULT_SIZE):
        check_render_mode(render_mode)
        self.task, self.render_mode, self.width, self.height = task, render_mode, int(width), int(height)
        self._env = None

    def _real_env(self):
        if self._env is None:
            env = make_render_env(self.task.env_id, self.render_mode, self.width, self.height)
            env.reset(seed=0)  # set_state and render need a reset env; the state is overwritten before each frame
            self._env = env
        return self._env

    def draw(self, obs: np.ndarray, x_position: float = 0.0) -> np.ndarray | None:
        """The frame of one observation: (height, width, 3) uint8 in "rgb_array" mode; None in "human" mode
        (the frame goes to the window)."""
        env = self._real_env()
        model = env.unwrapped.model
        qpos, qvel = state_from_obs(obs, x_position, self.task, model.nq, model.nv)
        env.unwrapped.set_state(qpos, qvel)
        try:
            frame = env.render()
        except Exception as err:  # GL failures surface as RuntimeError, mujoco.FatalError, ImportError, ...
            raise RenderError(f"MuJoCo could not render {self.task.env_id} (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): "
                              f"{type(err).__name__}: {err}; {INSTALL_HINT}") from err
        return None if frame is None else np.ascontiguousarray(frame, dtype=np.uint8)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def render_problem(task: Task | None = None) -> str | None:
    """None when this machine can render a frame of `task` (Hopper by default), else why not."""
    from .tasks import TASKS

    renderer = StateRenderer(task or TASKS["hopper"], "rgb_array", 32, 32)
    try:
        frame = renderer.draw(np.zeros(renderer.task.obs_dim))
    except Exception as err:
        return str(err)
    finally:
        renderer.close()
    if frame is None or frame.shape != (32, 32, 3):
        return f"MuJoCo returned {None if frame is None else frame.shape} instead of a (32, 32, 3) frame"
    return None
