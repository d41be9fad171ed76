"""Request length distributions: (prompt, output) pairs in tokens.

- ``EmpiricalLengths``: inverse-CDF sampling from a quantile table (``QUANTILE_GRID`` probabilities) of each
  marginal, joined by a Gaussian copula with the trace's Spearman rank correlation. The tables in
  ``workloads.length_tables`` summarise the public traces (regenerate with ``python -m workloads.make_tables``), so
  the generated lengths match their quantiles without shipping the traces:

  - ``sharegpt4``: openchat_sharegpt4 (Sarathi-Serve / SLAI): prompt mean 2340, P50 1730, P90 5696; output mean
    439, P50 415, P90 834, max 1024; Spearman 0.05.
  - ``azure-conv``: Azure 2023 conversation: prompt P50 1020, P90 2734; output P50 129, P90 424 (bimodal).
  - ``azure-code``: Azure 2023 coding: prompt P50 1469; output P50 13 (prompt/output tokens ~73).
- ``FixedLengths``: constant prompt and output (the VTC scenarios' 256/256).
- ``UniformLengths``: independent uniform integers in ranges.
- ``TraceLengths``: lengths resampled (with replacement) from a user trace file.

Every distribution has ``sample(n, rng) -> (prompts, outputs)`` as int64 arrays, all >= 1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

QUANTILE_GRID = np.concatenate([[0.0, 0.1, 0.25], np.arange(0.5, 100.0, 0.5), [99.75, 99.9, 100.0]])


class LengthDistribution(ABC):
    name: str = ""

    @abstractmethod
    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (prompt, output) length pairs."""

    def describe(self) -> str:
        return self.name


class EmpiricalLengths(LengthDistribution):
    def __init__(self, name: str, prompt_quantiles: list[float], output_quantiles: list[float],
                 spearman: float = 0.0, max_total: int | None = None) -> None:
        if len(prompt_quantiles) != len(QUANTILE_GRID) or len(output_quantiles) != len(QUANTILE_GRID):
            raise ValueError(f"quantile tables need {len(QUANTILE_GRID)} entries")
        if not -1 < spearman < 1:
            raise ValueError("spearman must be in (-1, 1)")
        self.name = name
        self.prompt_q = np.asarray(prompt_quantiles, dtype=float)
        self.output_q = np.asarray(output_quantiles, dtype=float)
        self.probs = QUANTILE_GRID / 100.0
        self.spearman = spearman
        self.pearson = 2 * math.sin(math.pi * spearman / 6)  # Gaussian copula with that rank correlation
        self.max_total = max_total

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        z1 = rng.standard_normal(n)
        z2 = self.pearson * z1 + math.sqrt(1 - self.pearson ** 2) * rng.standard_normal(n)
        u1, u2 = _normal_cdf(z1), _normal_cdf(z2)
        prompts = np.maximum(1, np.rint(np.interp(u1, self.probs, self.prompt_q))).astype(np.int64)
        outputs = np.maximum(1, np.rint(np.interp(u2, self.probs, self.output_q))).astype(np.int64)
        if self.max_total is not None:
            prompts = np.minimum(prompts, np.maximum(1, self.max_total - outputs))
        return prompts, outputs

    def describe(self) -> str:
        return f"{self.name} (quantile table, Spearman {self.spearman:.2f})"


class FixedLengths(LengthDistribution):
    def __init__(self, prompt_len: int, output_len: int) -> None:
        if prompt_len < 1 or output_len < 1:
            raise ValueError("fixed lengths must be >= 1")
        self.name = f"fixed-{prompt_len}-{output_len}"
        self.prompt_len, self.output_len = prompt_len, output_len

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt_len, dtype=np.int64), np.full(n, self.output_len, dtype=np.int64)


class UniformLengths(LengthDistribution):
    def __init__(self, prompt_range: tuple[int, int], output_range: tuple[int, int]) -> None:
        for lo, hi in (prompt_range, output_range):
            if not 1 <= lo <= hi:
                raise ValueError(f"uniform range must satisfy 1 <= lo <= hi, got {lo}..{hi}")
        self.name = f"uniform-{prompt_range[0]}-{prompt_range[1]}-{output_range[0]}-{output_range[1]}"
        self.prompt_range, self.output_range = prompt_range, output_range

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = rng.integers(self.prompt_range[0], self.prompt_range[1] + 1, n)
        o = rng.integers(self.output_range[0], self.output_range[1] + 1, n)
        return p.astype(np.int64), o.astype(np.int64)


class TraceLengths(LengthDistribution):
    """Resample (prompt, output) pairs of a trace, keeping their joint distribution."""

    def __init__(self, name: str, prompts: np.ndarray, outputs: np.ndarray) -> None:
        if len(prompts) == 0 or len(prompts) != len(outputs):
            raise ValueError("a trace needs matching, non-empty prompt and output arrays")
        self.name = name
        self.prompts, self.outputs = np.asarray(prompts, np.int64), np.asarray(outputs, np.int64)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        index = rng.integers(0, len(self.prompts), n)
        return self.prompts[index], self.outputs[index]


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


_erf = np.vectorize(math.erf, otypes=[float])


def preset(name: str) -> EmpiricalLengths:
    """A named length distribution from ``workloads.length_tables``."""
    from diptych.workloads.length_tables import TABLES

    if name not in TABLES:
        raise ValueError(f"unknown length distribution {name!r}; choose one of: {', '.join(sorted(TABLES))}")
    table: dict[str, Any] = TABLES[name]
    return EmpiricalLengths(name, table["prompt"], table["output"], table["spearman"])


def preset_names() -> list[str]:
    from diptych.workloads.length_tables import TABLES

    return sorted(TABLES)
