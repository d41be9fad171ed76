"""Capacity search: the highest load (requests/s) whose run meets a criterion, by binary search.

``capacity_search(run, criterion, lo, hi)`` calls ``run(qps) -> summary`` (a ``metrics.summary.summarize`` dict; a
simulation here, a live benchmark later) and ``criterion(summary) -> (ok, reason)``. It first widens the bracket
(doubling ``hi`` while it passes, halving ``lo`` while it fails, within ``max_runs``), then bisects until the bracket
is narrower than ``rel_tol`` of its upper end. The answer is the highest load that passed. Load is assumed to hurt
monotonically; runs at different loads should share their random numbers (``workloads.catalog`` scales one set of
unit-rate arrivals), which keeps the search from chasing noise.

Criteria (``CRITERIA``):

- ``slai`` (SLAI's capacity): median TTFT < 0.5 s and, for every tier with a TBT target, its P99 TBT within target.
- ``sarathi`` (Sarathi-Serve's): every tier's P99 TBT within target and median scheduling delay <= 2 s.
- ``goodput90`` (DistServe's goodput): at least 90% of requests meet their SLOs (``RunResult.meets_slo``).

Every criterion also fails a run with unfinished or rejected requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Summary = dict[str, Any]
Criterion = Callable[[Summary], tuple[bool, str]]


def _incomplete(s: Summary) -> str | None:
    if s["unfinished"] or s["rejected"] or s["failed"]:
        return f"{s['unfinished']} unfinished, {s['rejected']} rejected, {s['failed']} failed"
    return None


def _tiers_tbt(s: Summary) -> str | None:
    for tier, v in s["tiers"].items():
        if not math.isnan(v["tbt_slo"]) and not v["tbt_p99"] <= v["tbt_slo"]:
            return f"tier {tier}: P99 TBT {v['tbt_p99']:.3f} s > {v['tbt_slo']:g} s"
    return None


def slai_criterion(s: Summary, ttft_median_s: float = 0.5) -> tuple[bool, str]:
    bad = _incomplete(s) or _tiers_tbt(s)
    if bad is None and not s["ttft_p50"] < ttft_median_s:
        bad = f"median TTFT {s['ttft_p50']:.3f} s >= {ttft_median_s} s"
    return bad is None, bad or f"median TTFT {s['ttft_p50']:.3f} s, P99 TBT within targets"


def sarathi_criterion(s: Summary, delay_median_s: float = 2.0) -> tuple[bool, str]:
    bad = _incomplete(s) or _tiers_tbt(s)
    if bad is None and not s["sched_delay_p50"] <= delay_median_s:
        bad = f"median scheduling delay {s['sched_delay_p50']:.3f} s > {delay_median_s} s"
    return bad is None, bad or f"median scheduling delay {s['sched_delay_p50']:.3f} s, P99 TBT within targets"


def goodput_criterion(s: Summary, attainment: float = 0.9) -> tuple[bool, str]:
    bad = _incomplete(s)
    if bad is None and not s["slo_attainment"] >= attainment:
        bad = f"SLO attainment {s['slo_attainment']:.1%} < {attainment:.0%}"
    return bad is None, bad or f"SLO attainment {s['slo_attainment']:.1%}"


CRITERIA: dict[str, Criterion] = {"slai": slai_criterion, "sarathi": sarathi_criterion,
                                  "goodput90": goodput_criterion}


@dataclass
class CapacityResult:
    qps: float  # highest load that passed (0 if none did)
    criterion: str
    runs: list[dict[str, Any]] = field(default_factory=list)  # {"qps", "ok", "reason", "summary"} in run order

    def best_summary(self) -> Summary | None:
        passing = [r for r in self.runs if r["ok"] and r["qps"] == self.qps]
        return passing[0]["summary"] if passing else None


def capacity_search(run: Callable[[float], Summary], criterion: Criterion | str, lo: float, hi: float,
                    rel_tol: float = 0.02, max_runs: int = 16, on_run: Callable[[dict], None] | None = None
                    ) -> CapacityResult:
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
        name, check = criterion, CRITERIA[criterion]
    else:
        name, check = getattr(criterion, "__name__", "custom"), criterion
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    if not 0 < rel_tol < 1 or max_runs < 2:
        raise ValueError("rel_tol must be in (0, 1) and max_runs >= 2")
    result = CapacityResult(0.0, name)
    cache: dict[float, bool] = {}

    def probe(qps: float) -> bool:
        if qps in cache:
            return cache[qps]
        summary = run(qps)
        ok, reason = check(summary)
        record = {"qps": qps, "ok": ok, "reason": reason, "summary": summary}
        result.runs.append(record)
        if on_run is not None:
            on_run(record)
        cache[qps] = ok
        return ok

    def budget() -> bool:
        return len(result.runs) < max_runs

    while budget() and probe(hi):  # widen upwards
        lo, hi = hi, hi * 2
    if not budget():
        result.qps = max([r["qps"] for r in result.runs if r["ok"]], default=0.0)
        return result
    while budget() and not probe(lo):  # widen downwards
        hi, lo = lo, lo / 2
        if lo < 1e-6:
            break
    if not cache.get(lo, False):
        return result
    while budget() and (hi - lo) > rel_tol * hi:
        mid = round((lo + hi) / 2, 6)
        if probe(mid):
            lo = mid
        else:
            hi = mid
    result.qps = lo
    return result
