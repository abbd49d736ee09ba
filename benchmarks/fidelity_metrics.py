"""Pure numpy metrics of model trajectories against true (real-simulator) trajectories.

Conventions, shared by every function here:
- N start states, horizon H. States are (N, H + 1, D): s_0 (the common start) .. s_H. Transition t (0-based)
  goes from s_t to s_{t+1}; "horizon h" (1..H) is the state s_h after h transitions.
- `terminated` is (N, H) bool, True on a transition whose next state is terminal. Only the first True counts.
- The true trajectory *length* is the number of transitions the real simulator ran: up to and including the
  first termination, else H. A true trajectory is compared at horizon h iff h <= its length (the terminal
  state itself is a real observation and is compared; nothing after it exists).
"""

from __future__ import annotations

import numpy as np

Z95 = 1.96


def normalized_state_error(pred: np.ndarray, true: np.ndarray, std: np.ndarray) -> np.ndarray:
    """mean_d |pred - true| / std_d over the last axis (dataset-std units). NaN where either side is NaN."""
    pred, true, std = np.asarray(pred, np.float64), np.asarray(true, np.float64), np.asarray(std, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    if std.shape != pred.shape[-1:]:
        raise ValueError(f"std must have shape {pred.shape[-1:]}, got {std.shape}")
    if not np.all(std > 0):
        raise ValueError("std must be > 0")
    return (np.abs(pred - true) / std).mean(-1)


def trajectory_length(terminated: np.ndarray) -> np.ndarray:
    """(N,) transitions up to and including the first termination; H where there is none."""
    terminated = np.asarray(terminated, bool)
    horizon = terminated.shape[1]
    any_term = terminated.any(1)
    return np.where(any_term, terminated.argmax(1) + 1, horizon)


def terminated_by(terminated: np.ndarray) -> np.ndarray:
    """(N, H) bool: column h - 1 is True iff the trajectory terminated within its first h transitions."""
    return np.logical_or.accumulate(np.asarray(terminated, bool), axis=1)


def alive_mask(true_terminated: np.ndarray) -> np.ndarray:
    """(N, H) bool: column h - 1 is True iff the true trajectory reached horizon h (h <= its length)."""
    length = trajectory_length(true_terminated)
    horizon = np.asarray(true_terminated).shape[1]
    return np.arange(1, horizon + 1)[None, :] <= length[:, None]


def mean_ci(values: np.ndarray, mask: np.ndarray | None = None, z: float = Z95) -> dict[str, np.ndarray]:
    """Column-wise mean of `values` (N, H) over the rows where `mask` is True and the value is finite, with
    the normal-approximation interval mean +- z * std / sqrt(n) (std with ddof 1).

    Returns arrays of shape (H,): mean, low, high, sem, n. Columns with n == 0 give NaN mean; n == 1 gives
    NaN sem and bounds (one sample has no spread estimate)."""
    values = np.asarray(values, np.float64)
    if values.ndim == 1:
        values = values[:, None]
    use = np.isfinite(values) if mask is None else (np.asarray(mask, bool).reshape(values.shape) & np.isfinite(values))
    n = use.sum(0)
    filled = np.where(use, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(0) / n
        var = np.where(use, (values - mean) ** 2, 0.0).sum(0) / (n - 1)
        sem = np.sqrt(var / n)
    mean = np.where(n > 0, mean, np.nan)
    sem = np.where(n > 1, sem, np.nan)
    return {"mean": mean, "low": mean - z * sem, "high": mean + z * sem, "sem": sem, "n": n}


def state_error_curve(pred_states: np.ndarray, true_states: np.ndarray, true_terminated: np.ndarray,
                      std: np.ndarray, z: float = Z95) -> dict[str, np.ndarray]:
    """Normalised state error per horizon h = 1..H with CIs over the start states whose true trajectory is
    alive at h. States are (N, H + 1, D) (s_0 is not scored: it is given). Non-finite model states (a model
    failure, or a state that does not exist, e.g. after an env episode ended) are left out of that horizon's
    mean and counted in `missing`."""
    err = normalized_state_error(pred_states[:, 1:], true_states[:, 1:], std)
    alive = alive_mask(true_terminated)
    curve = mean_ci(err, alive, z)
    curve["missing"] = (alive & ~np.isfinite(err)).sum(0)
    return curve


def return_error(pred_returns: np.ndarray, true_returns: np.ndarray, z: float = Z95) -> dict[str, float]:
    """Error of predicted H-step returns (each summed up to its own first termination) against the true ones.

    abs_mean: mean |pred - true| (with its CI abs_low/abs_high); bias: mean (pred - true);
    relative: mean |pred - true| / mean |true| (a ratio of means, stable when some true returns are near 0);
    n: starts with a finite prediction."""
    pred, true = np.asarray(pred_returns, np.float64), np.asarray(true_returns, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    ok = np.isfinite(pred) & np.isfinite(true)
    diff = pred[ok] - true[ok]
    ci = mean_ci(np.abs(diff)[:, None], z=z)
    denom = np.abs(true[ok]).mean() if ok.any() else np.nan
    return {
        "abs_mean": float(ci["mean"][0]), "abs_low": float(ci["low"][0]), "abs_high": float(ci["high"][0]),
        "bias": float(diff.mean()) if ok.any() else float("nan"),
        "relative": float(np.abs(diff).mean() / denom) if ok.any() and denom > 0 else float("nan"),
        "true_mean": float(true[ok].mean()) if ok.any() else float("nan"),
        "pred_mean": float(pred[ok].mean()) if ok.any() else float("nan"),
        "n": int(ok.sum()),
    }


def termination_agreement(pred_terminated: np.ndarray, true_terminated: np.ndarray) -> dict[str, np.ndarray]:
    """Per horizon h: the fraction of start states where "terminated within h transitions" is the same for
    the model and the truth (`agreement`), the true and predicted termination rates, and the counts of
    missed (true only) and false (predicted only) terminations."""
    pred_by, true_by = terminated_by(pred_terminated), terminated_by(true_terminated)
    if pred_by.shape != true_by.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred_by.shape} and {true_by.shape}")
    return {
        "agreement": (pred_by == true_by).mean(0), "true_rate": true_by.mean(0), "pred_rate": pred_by.mean(0),
        "missed": (true_by & ~pred_by).sum(0), "false": (pred_by & ~true_by).sum(0),
    }


def crossover_horizon(candidate: dict[str, np.ndarray], baseline: dict[str, np.ndarray]) -> dict[str, int | None]:
    """Where a candidate's error curve (e.g. diffusion, M >= 1) gets below a baseline's (the single-step
    ensemble, M = 0); horizons are 1-based, None when it never happens.

    first_below: the first h with mean_candidate < mean_baseline;
    below_from: the first h from which the candidate's mean stays below the baseline's up to H;
    significant_from: the first h from which the candidate's upper CI bound stays below the baseline's lower
    bound up to H (non-overlapping 95 % intervals)."""
    cm, bm = np.asarray(candidate["mean"], np.float64), np.asarray(baseline["mean"], np.float64)
    below = cm < bm  # NaN compares False
    sig = np.asarray(candidate["high"], np.float64) < np.asarray(baseline["low"], np.float64)

    def stays(flags: np.ndarray) -> int | None:
        if not flags.size or not flags[-1]:
            return None
        last_false = np.flatnonzero(~flags)
        return int(last_false[-1] + 2) if last_false.size else 1

    return {"first_below": int(np.argmax(below) + 1) if below.any() else None,
            "below_from": stays(below), "significant_from": stays(sig)}
