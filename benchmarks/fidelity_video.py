"""A short GIF of learned rollouts next to the real simulator, for `benchmarks/fidelity.py --video`.

From the same start states and with the same policy, the top row is MuJoCo itself (`Hopper-v5` set to the
dataset's recorded qpos/qvel, rendered as it steps) and the bottom row is `DydiffEnv` in the policy-driven
regime (the policy is the env's handle and the agent, so the env serves its DyDiff plans), drawn through MuJoCo
from the model's observations (`render_mode="rgb_array"`). Both rows film through the same camera, which
follows the body. A panel freezes on its last frame once its trajectory terminates. Frames are played at `FRAME_MS` per env step, slower than real time (8 ms for Hopper).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

FRAME_MS = 40  # per env step: 25 frames per second, 5x slower than Hopper-v5's real time
PANEL = 160  # pixels per side of one panel
STARTS = 3  # panels per row
ROW_LABELS = ("MuJoCo", "DydiffEnv")


def real_frames(env_id: str, qpos: np.ndarray, qvel: np.ndarray, act: Callable[[np.ndarray], np.ndarray],
                horizon: int, size: int = PANEL) -> np.ndarray:
    """(N, horizon + 1, size, size, 3) uint8 frames of N real simulator runs from (qpos, qvel), acting with
    `act(obs (1, D)) -> (1, A)`; a run that terminates repeats its last frame."""
    from dydiff_env.render import make_render_env

    runs = []
    for q, v in zip(qpos, qvel):
        env = make_render_env(env_id, "rgb_array", size, size)  # drawn as DydiffEnv draws
        env.reset(seed=0)
        env.unwrapped.set_state(np.asarray(q, np.float64), np.asarray(v, np.float64))
        obs = env.unwrapped._get_obs()
        frames, alive = [env.render()], True
        for _ in range(horizon):
            if alive:
                obs, _, terminated, truncated, _ = env.step(np.asarray(act(obs[None]), np.float32)[0])
                alive = not (terminated or truncated)
                frames.append(env.render())
            else:
                frames.append(frames[-1])
        env.close()
        runs.append(np.stack(frames))
    return np.stack(runs)


def env_frames(env, start_obs: np.ndarray, act: Callable[[np.ndarray], np.ndarray], horizon: int,
               seed: int = 0) -> np.ndarray:
    """(N, horizon + 1, H, W, 3) uint8 frames of a `DydiffEnv` made with `render_mode="rgb_array"` and N sub-envs,
    started at `start_obs` and stepped with `act(obs (N, D)) -> (N, A)`; a sub-env whose episode ends repeats
    its last frame (the env would start a new episode there)."""
    obs, _ = env.reset_to(start_obs, seed=seed)
    frames = [np.stack(env.render())]
    done = np.zeros(len(start_obs), bool)
    for _ in range(horizon):
        if done.all():
            frames.append(frames[-1])
            continue
        obs, _, terminated, truncated, _ = env.step(np.asarray(act(obs.astype(np.float32)), np.float32))
        frame = np.stack(env.render())
        frame[done] = frames[-1][done]  # ended before this step: keep showing its last state
        frames.append(frame)
        done |= terminated | truncated
    return np.stack(frames, axis=1)


def label(panel: np.ndarray, text: str) -> np.ndarray:
    """The panel with `text` in its top-left corner, white on a dark box (readable on sky and floor)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((4, 3), text)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(20, 20, 20))
    draw.text((4, 3), text, fill=(255, 255, 255))
    return np.asarray(image)


def grid_frames(rows: list[np.ndarray], row_labels: tuple[str, ...] = ROW_LABELS) -> np.ndarray:
    """Frames (T, rows x H, N x W, 3) from per-row arrays (N, T, H, W, 3): panel n of row r at column n, each
    labelled with its row's name and the step."""
    steps = rows[0].shape[1]
    out = []
    for t in range(steps):
        lines = [np.concatenate([label(row[n, t], f"{name} t={t}") for n in range(row.shape[0])], axis=1)
                 for row, name in zip(rows, row_labels)]
        out.append(np.concatenate(lines, axis=0))
    return np.stack(out)


def write_gif(frames: np.ndarray, path: Path, frame_ms: int = FRAME_MS) -> Path:
    """An endlessly looping GIF of frames (T, H, W, 3) uint8, one palette for all frames (smaller, no flicker)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    palette = images[len(images) // 2].quantize(colors=64)  # renders have few colours; 64 keep the file small
    quantized = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    quantized[0].save(path, save_all=True, append_images=quantized[1:], duration=frame_ms, loop=0, optimize=True)
    return path
