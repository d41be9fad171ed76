"""Per-token accounting of the simulator: token times, gaps between tokens (TBT histograms per tier, the largest
gap, SLO violations), including the gaps of stationary decode stretches counted in bulk. Arrays are indexed by
request index (``SimSeq.idx``); ``sim.iteration_end`` updates them in place in its hot loop."""

from __future__ import annotations

import math

import numpy as np

from diptych.metrics.histogram import LogHistogram
from diptych.sim.worker import SimSeq


class TokenAccounting:
    hists: list[LogHistogram]
    """TBT histogram per tier index."""
    pending_gaps: list[list[float]]
    """Gaps (seconds) per tier index not binned yet (``flush_gaps``)."""
    max_tbt: list[float]
    violations: list[int]
    num_gaps: list[int]
    token_times: list[list[float]] | None
    """Every token time per request, when recorded."""

    def __init__(self, num_requests: int, num_tiers: int, record_tokens: bool) -> None:
        self.hists = [LogHistogram() for _ in range(num_tiers)]
        self.pending_gaps = [[] for _ in range(num_tiers)]
        self.max_tbt = [0.0] * num_requests
        self.violations = [0] * num_requests
        self.num_gaps = [0] * num_requests
        self.token_times = [[] for _ in range(num_requests)] if record_tokens else None

    def token(self, seq: SimSeq, t: float) -> None:
        """One decode token of ``seq`` at ``t`` (``sim.iteration_end.finish_plan`` inlines this)."""
        i = seq.idx
        assert seq.last_token_time is not None  # set with the first token
        gap = t - seq.last_token_time
        self.pending_gaps[seq.tier_idx].append(gap)
        if gap > self.max_tbt[i]:
            self.max_tbt[i] = gap
        if gap > seq.slo:
            self.violations[i] += 1
        self.num_gaps[i] += 1
        seq.num_output += 1
        seq.last_token_time = t
        if self.token_times is not None:
            self.token_times[i].append(t)

    def pending_count(self) -> int:
        return sum(len(g) for g in self.pending_gaps)

    def flush_gaps(self) -> None:
        """Bin the token gaps collected since the last flush (binning in bulk is much cheaper than one by one)."""
        for tier, gaps in enumerate(self.pending_gaps):
            if gaps:
                self.hists[tier].add_array(np.array(gaps))
                gaps.clear()

    def stretch_tokens(self, running: list[SimSeq], k: int, a: float, b: float, t0: float, first_end: float,
                       last_end: float) -> None:
        """Apply ``k`` pure-decode iterations of ``running`` from ``t0`` (the i-th taking ``a + b*i``)."""
        hists, max_tbt, violations, num_gaps = self.hists, self.max_tbt, self.violations, self.num_gaps
        pending = self.pending_gaps
        last_gap = a + b * (k - 1)
        over: dict[float, int] = {}
        tier_counts: dict[int, int] = {}
        times = None
        token_times = self.token_times
        if token_times is not None:
            times = [t0 + (j + 1) * a + b * j * (j + 1) / 2 for j in range(k)]
        for seq in running:
            i = seq.idx
            assert seq.last_token_time is not None  # a decoding sequence has its first token
            gap0 = first_end - seq.last_token_time
            pending[seq.tier_idx].append(gap0)
            worst = gap0 if (k == 1 or gap0 > last_gap) else last_gap
            if worst > max_tbt[i]:
                max_tbt[i] = worst
            slo = seq.slo
            if slo != math.inf:
                count = over.get(slo)
                if count is None:
                    count = over[slo] = _count_over(a, b, k, slo)
                violations[i] += count + (1 if gap0 > slo else 0)
            num_gaps[i] += k
            seq.num_output += k
            seq.last_token_time = last_end
            tier_counts[seq.tier_idx] = tier_counts.get(seq.tier_idx, 0) + 1
            if token_times is not None and times is not None:
                token_times[i].extend(times)
        if k >= 2:
            for tier, count in tier_counts.items():
                hists[tier].add_linear(a, b, 1, k, count)


def _count_over(a: float, b: float, k: int, slo: float) -> int:
    """How many of the gaps ``a + b*j``, j = 1 .. k-1, exceed ``slo`` (they grow with j)."""
    if k < 2:
        return 0
    if a + b * (k - 1) <= slo:
        return 0
    if a + b > slo:
        return k - 1
    first = int((slo - a) / b) + 1  # smallest j with a + b*j > slo
    while first > 1 and a + b * (first - 1) > slo:
        first -= 1
    while a + b * first <= slo:
        first += 1
    return max(0, k - first)

