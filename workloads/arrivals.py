"""Arrival processes: request arrival times in seconds, sorted, starting near 0.

- ``poisson``: exponential gaps of mean ``1/rate``.
- ``poisson-capped``: the same with each gap capped at ``cap_factor`` (3) times the mean, as Sarathi-Serve's and
  SLAI's generators do (the real rate is then about 1.053x nominal and the gap CV 0.88); for reproduction.
- ``gamma``: gamma gaps of mean ``1/rate`` and coefficient of variation ``cv`` (shape ``1/cv^2``; vLLM's
  ``burstiness`` b is ``cv = 1/sqrt(b)``). ``cv=1`` is Poisson.
- ``constant``: deterministic gaps ``1/rate`` (the VTC paper's synthetic clients).
- trace timestamps: ``scale_trace`` replays a trace's own times, optionally sped up to a target rate.

Generators draw unit-rate gaps and divide by the rate, so runs at different rates with the same seed share their
random numbers (common random numbers make capacity searches smoother). First arrival at the first gap (``constant``:
at 0).
"""

from __future__ import annotations

import numpy as np

ARRIVAL_KINDS = ("poisson", "poisson-capped", "gamma", "constant")


def unit_gaps(kind: str, n: int, rng: np.random.Generator, cv: float = 1.0, cap_factor: float = 3.0) -> np.ndarray:
    """``n`` inter-arrival gaps of mean 1 (before capping)."""
    if n < 0:
        raise ValueError("number of arrivals must be >= 0")
    if kind == "poisson":
        return rng.exponential(1.0, n)
    if kind == "poisson-capped":
        if cap_factor <= 0:
            raise ValueError("cap_factor must be > 0")
        return np.minimum(rng.exponential(1.0, n), cap_factor)
    if kind == "gamma":
        if not cv > 0:
            raise ValueError("gamma arrivals need cv > 0")
        shape = 1.0 / cv ** 2
        return rng.gamma(shape, 1.0 / shape, n)
    if kind == "constant":
        return np.ones(n)
    raise ValueError(f"unknown arrival process {kind!r}; choose one of: {', '.join(ARRIVAL_KINDS)}")


def arrival_times(kind: str, rate: float, n: int, rng: np.random.Generator, cv: float = 1.0,
                  cap_factor: float = 3.0) -> np.ndarray:
    """``n`` arrival times at ``rate`` requests/s."""
    if not rate > 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    gaps = unit_gaps(kind, n, rng, cv, cap_factor)
    times = np.cumsum(gaps) / rate
    if kind == "constant":
        times -= 1.0 / rate
    return times


def arrivals_in(kind: str, rate: float, start: float, end: float, rng: np.random.Generator,
                cv: float = 1.0) -> np.ndarray:
    """Arrivals of a process at ``rate`` inside ``[start, end)``."""
    if end <= start:
        return np.zeros(0)
    expected = (end - start) * rate
    n = int(expected * 1.5 + 10 * np.sqrt(expected + 1) + 10)
    times = start + arrival_times(kind, rate, n, rng, cv)
    while times[-1] < end:  # very bursty processes may need more draws
        times = np.concatenate([times, times[-1] + arrival_times(kind, rate, n, rng, cv)])
    return times[times < end]


def ramp_times(rate_start: float, rate_end: float, start: float, end: float) -> np.ndarray:
    """Deterministic arrivals whose rate moves linearly from ``rate_start`` to ``rate_end`` over ``[start, end)``:
    the k-th arrival is where the integrated rate reaches k (k = 0, 1, ...)."""
    if rate_start <= 0 or rate_end <= 0:
        raise ValueError("ramp rates must be > 0")
    span = end - start
    slope = (rate_end - rate_start) / span
    total = rate_start * span + slope * span ** 2 / 2
    k = np.arange(int(np.floor(total)) + 1, dtype=float)
    if abs(slope) < 1e-12:
        offsets = k / rate_start
    else:  # solve rate_start*t + slope*t^2/2 = k
        offsets = (-rate_start + np.sqrt(rate_start ** 2 + 2 * slope * k)) / slope
    times = start + offsets
    return times[times < end]


def on_off_times(kind: str, rate: float, on_s: float, off_s: float, start: float, end: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Arrivals at ``rate`` during on periods of ``on_s`` seconds separated by ``off_s`` seconds of silence,
    starting with an on period at ``start``."""
    if on_s <= 0 or off_s < 0:
        raise ValueError("on_s must be > 0 and off_s >= 0")
    parts, t = [], start
    while t < end:
        parts.append(arrivals_in(kind, rate, t, min(end, t + on_s), rng))
        t += on_s + off_s
    return np.concatenate(parts) if parts else np.zeros(0)


def scale_trace(times: np.ndarray, rate: float | None = None, time_scale: float = 1.0) -> np.ndarray:
    """Trace timestamps (seconds from the first), sped up so the mean rate is ``rate`` (if given), else divided
    by ``time_scale``."""
    times = np.asarray(times, dtype=float)
    if len(times) < 2:
        return times.copy()
    if rate is not None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        natural = (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else float("inf")
        time_scale = rate / natural
    if not time_scale > 0:
        raise ValueError("time_scale must be > 0")
    return (times - times[0]) / time_scale


def gap_cv(times: np.ndarray) -> float:
    gaps = np.diff(np.sort(np.asarray(times, dtype=float)))
    return float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else 0.0
