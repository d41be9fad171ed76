"""A log-binned histogram of durations: exact counts, quantiles to within half a bin (0.23% at 500 bins per
decade). Used for TBT, where a long run has tens of millions of gaps."""

from __future__ import annotations

import math

import numpy as np


class LogHistogram:
    def __init__(self, lo: float = 1e-5, hi: float = 1e4, bins_per_decade: int = 500) -> None:
        if not 0 < lo < hi or bins_per_decade < 1:
            raise ValueError("need 0 < lo < hi and bins_per_decade >= 1")
        self.lo, self.hi, self.bins_per_decade = lo, hi, bins_per_decade
        self.log_lo = math.log10(lo)
        self.scale = bins_per_decade
        self.nbins = math.ceil((math.log10(hi) - self.log_lo) * bins_per_decade) + 1
        self.counts = [0] * self.nbins  # a list: single-bin updates are the hot path
        self.total = 0
        self.sum = 0.0
        self.max = 0.0

    def index(self, value: float) -> int:
        if value <= self.lo:
            return 0
        i = int((math.log10(value) - self.log_lo) * self.scale)
        return i if i < self.nbins else self.nbins - 1

    def add(self, value: float, count: int = 1) -> None:
        if count <= 0:
            return
        self.counts[self.index(value)] += count
        self.total += count
        self.sum += value * count
        if value > self.max:
            self.max = value

    def add_array(self, values: np.ndarray, count: int = 1) -> None:
        values = np.asarray(values, dtype=float)
        if values.size == 0 or count <= 0:
            return
        idx = np.floor((np.log10(np.maximum(values, self.lo)) - self.log_lo) * self.scale).astype(np.int64)
        np.clip(idx, 0, self.nbins - 1, out=idx)
        bins, per_bin = np.unique(idx, return_counts=True)
        counts = self.counts
        for i, c in zip(bins.tolist(), per_bin.tolist()):
            counts[i] += c * count
        self.total += int(values.size) * count
        self.sum += float(values.sum()) * count
        self.max = max(self.max, float(values.max()))

    def add_linear(self, a: float, b: float, j0: int, j1: int, count: int = 1) -> None:
        """Add ``a + b*j`` for j in ``[j0, j1)`` (``b >= 0``), each ``count`` times, without listing them."""
        n = j1 - j0
        if n <= 0 or count <= 0:
            return
        if b <= 0:
            self.add(a, n * count)
            return
        first, last = a + b * j0, a + b * (j1 - 1)
        lo_i, hi_i = self.index(first), self.index(last)
        counts = self.counts
        if lo_i == hi_i:
            counts[lo_i] += n * count
        else:
            done = j0
            for i in range(lo_i, hi_i):
                edge = 10 ** (self.log_lo + (i + 1) / self.scale)
                below = min(j1, max(done, math.ceil((edge - a) / b)))  # values < edge
                counts[i] += (below - done) * count
                done = below
            counts[hi_i] += (j1 - done) * count
        self.total += n * count
        self.sum += count * (n * a + b * (j1 * (j1 - 1) - j0 * (j0 - 1)) / 2)
        if last > self.max:
            self.max = last

    def merge(self, other: LogHistogram) -> None:
        if (other.lo, other.hi, other.bins_per_decade) != (self.lo, self.hi, self.bins_per_decade):
            raise ValueError("cannot merge histograms with different bins")
        self.counts = [x + y for x, y in zip(self.counts, other.counts)]
        self.total += other.total
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1), as the geometric middle of its bin (capped at the exact maximum); NaN if empty."""
        if self.total == 0:
            return float("nan")
        rank = q * self.total
        cumulative = np.cumsum(self.counts)
        i = int(np.searchsorted(cumulative, max(rank, 1e-12), side="left"))
        i = min(i, self.nbins - 1)
        middle = 10 ** (self.log_lo + (i + 0.5) / self.scale)
        return min(middle, self.max)

    def fraction_above(self, threshold: float) -> float:
        if self.total == 0:
            return float("nan")
        return float(sum(self.counts[self.index(threshold) + 1:])) / self.total

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else float("nan")
