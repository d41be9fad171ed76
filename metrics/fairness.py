"""Fairness metrics of the VTC paper, from a run's requests.

Service: a request's cost ``w_p * prompt + w_q * output`` (defaults 1 and 2, the VTC paper's) is received spread
evenly over its first-token-to-finish interval (the paper's measure); an unfinished request has received its share
up to the end of the run at the rate its tokens came (``num_tokens`` of ``output_len``).

- ``service_curves``: accumulated service per client at grid times.
- ``service_difference``: for each pair of clients and each stretch of time in which both are continuously
  *backlogged* (each with a request that has arrived and not yet been admitted), the difference of the service (per
  unit of client weight) they received since the stretch began; the largest pair at each time. VTC bounds it;
  FCFS lets it grow.
- ``window_service``: service per client per window (tokens/s).
- ``table2_metric``: per window, ``sum_i min(s_max - s_i, max(0, demand_i - s_i))`` with ``s_i`` the service of
  client i in the window, ``s_max`` the largest, and ``demand_i`` the cost of the client's requests that arrived
  by the window's end minus the service it had received by the window's start (what it could have used), all per
  unit of client weight; max and average over windows (the paper's Table 2 style).
"""

from __future__ import annotations

import numpy as np

from diptych.metrics.results import RunResult


def request_costs(result: RunResult, w_p: float = 1.0, w_q: float = 2.0) -> np.ndarray:
    return w_p * result.prompt_len + w_q * result.output_len


def _received(result: RunResult, grid: np.ndarray, w_p: float, w_q: float) -> tuple[list[str], np.ndarray]:
    """(clients, matrix [clients x grid]) of accumulated service."""
    first = result.times["first_token"]
    finish = result.times["finish"].copy()
    cost = request_costs(result, w_p, w_q).astype(float)
    unfinished = ~result.finished & ~np.isnan(first)
    # a running request: its service so far is the fraction of its tokens out, spread up to the end of the run
    cost = np.where(unfinished, cost * np.minimum(1.0, result.num_tokens / np.maximum(1, result.output_len)), cost)
    finish = np.where(unfinished, result.end_time, finish)
    started = ~np.isnan(first)
    clients = sorted(set(result.client_ids))
    client_index = {c: i for i, c in enumerate(clients)}
    owner = np.array([client_index[c] for c in result.client_ids])
    out = np.zeros((len(clients), len(grid)))
    s, f, c, o = first[started], finish[started], cost[started], owner[started]
    span = np.maximum(f - s, 1e-9)
    for lo in range(0, len(s), 4096):  # bounded memory: (block x grid)
        sl = slice(lo, lo + 4096)
        frac = np.clip((grid[None, :] - s[sl, None]) / span[sl, None], 0.0, 1.0)
        np.add.at(out, o[sl], frac * c[sl, None])
    return clients, out


def service_curves(result: RunResult, step_s: float = 1.0, w_p: float = 1.0, w_q: float = 2.0
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    start = float(np.nanmin(result.times["arrival"])) if len(result) else 0.0
    grid = np.arange(start, result.end_time + step_s, step_s)
    clients, received = _received(result, grid, w_p, w_q)
    return grid, {c: received[i] for i, c in enumerate(clients)}


def backlogged(result: RunResult, grid: np.ndarray) -> dict[str, np.ndarray]:
    """Per client: booleans over ``grid``, True while some request of the client waits for admission."""
    arrival = result.times["arrival"]
    admitted = result.times["admitted"]
    left = np.where(np.isnan(admitted), np.where(result.status == 1, arrival, np.inf), admitted)  # rejected: never Q
    out = {}
    for client in sorted(set(result.client_ids)):
        mask = np.array([c == client for c in result.client_ids])
        arrived, gone = np.sort(arrival[mask]), np.sort(left[mask])
        waiting = np.searchsorted(arrived, grid, side="right") - np.searchsorted(gone, grid, side="right")
        out[client] = waiting > 0
    return out


def client_weights(result: RunResult) -> dict[str, float]:
    """Each client's weight (its largest request weight)."""
    weights: dict[str, float] = {}
    for client, weight in zip(result.client_ids, result.weight):
        weights[client] = max(weights.get(client, 0.0), float(weight))
    return weights


def service_difference(result: RunResult, step_s: float = 1.0, w_p: float = 1.0, w_q: float = 2.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(grid, difference): for every pair of clients and every stretch of time in which both are continuously
    backlogged, the difference of the service (per unit of client weight) they received since the stretch began;
    at each grid time the largest such pair difference (NaN when no two clients are backlogged together). This is
    the quantity VTC bounds (two clients that both keep waiting get equal service); FCFS lets it grow."""
    grid, curves = service_curves(result, step_s, w_p, w_q)
    backlog = backlogged(result, grid)
    clients = sorted(curves)
    weights = client_weights(result)
    steps = {c: np.diff(curves[c], prepend=curves[c][:1]) / weights[c] for c in clients}
    diff = np.full(len(grid), np.nan)
    index = np.arange(len(grid))
    for a in range(len(clients)):
        for b in range(a + 1, len(clients)):
            joint = backlog[clients[a]] & backlog[clients[b]]
            if not joint.any():
                continue
            delta = np.where(joint, steps[clients[a]] - steps[clients[b]], 0.0)
            total = np.cumsum(delta)
            starts = joint & ~np.concatenate([[False], joint[:-1]])
            start = np.maximum.accumulate(np.where(starts, index, 0))
            since = total - total[start]  # the service of the stretch's first step happened before it began
            diff = np.fmax(diff, np.where(joint, np.abs(since), np.nan))
    return grid, diff


def window_service(result: RunResult, window_s: float = 60.0, w_p: float = 1.0, w_q: float = 2.0
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(window start times, per client service rate in tokens/s in each window)."""
    start = float(np.nanmin(result.times["arrival"])) if len(result) else 0.0
    edges = np.arange(start, result.end_time + window_s, window_s)
    clients, received = _received(result, edges, w_p, w_q)
    return edges[:-1], {c: np.diff(received[i]) / window_s for i, c in enumerate(clients)}


def table2_metric(result: RunResult, window_s: float = 60.0, w_p: float = 1.0, w_q: float = 2.0
                  ) -> tuple[float, float]:
    """(max, average) over windows of the Table-2 style unfairness (tokens per window, see the module docstring)."""
    start = float(np.nanmin(result.times["arrival"])) if len(result) else 0.0
    edges = np.arange(start, result.end_time + window_s, window_s)
    if len(edges) < 2:
        return float("nan"), float("nan")
    clients, received = _received(result, edges, w_p, w_q)
    weights = client_weights(result)
    received = received / np.array([weights[c] for c in clients])[:, None]
    cost = request_costs(result, w_p, w_q).astype(float) / result.weight
    arrival = result.times["arrival"]
    owner = np.array(result.client_ids)
    masks = [owner == client for client in clients]
    values = []
    for w in range(len(edges) - 1):
        service = received[:, w + 1] - received[:, w]
        s_max = service.max()
        total = 0.0
        for i in range(len(clients)):
            demand = cost[masks[i] & (arrival < edges[w + 1])].sum() - received[i, w]
            total += min(s_max - service[i], max(0.0, demand - service[i]))
        values.append(total)
    return float(np.max(values)), float(np.mean(values))
