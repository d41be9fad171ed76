"""SLO tier mixes: each request draws a tier with the mix's probabilities; the tier sets its TBT/TTFT targets.

Text form (command lines): ``NAME:FRACTION:TBT_S[:TTFT_S]`` items separated by commas, fractions summing to 1, e.g.
``strict:0.05:0.1,relaxed:0.95:0.5`` (SLAI's heterogeneous setting; the preset ``slai``). Presets: ``none`` (one
tier ``default`` with no targets), ``slai``, ``uniform-0.2`` (SLAI's homogeneous 0.2 s), ``sarathi-strict``
(0.1 s), ``sarathi-relaxed`` (0.5 s), ``distserve-chat`` (TTFT 0.25 s, TBT 0.1 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tier:
    name: str
    fraction: float
    tbt_slo_s: float | None = None
    ttft_slo_s: float | None = None


PRESETS: dict[str, tuple[Tier, ...]] = {
    "none": (Tier("default", 1.0),),
    "slai": (Tier("strict", 0.05, 0.1), Tier("relaxed", 0.95, 0.5)),
    "uniform-0.2": (Tier("default", 1.0, 0.2),),
    "sarathi-strict": (Tier("strict", 1.0, 0.1),),
    "sarathi-relaxed": (Tier("relaxed", 1.0, 0.5),),
    "distserve-chat": (Tier("default", 1.0, 0.1, 0.25),),
}


def parse_tiers(text: str) -> tuple[Tier, ...]:
    """A preset name or the text form above."""
    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    tiers = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4) or not parts[0]:
            raise ValueError(f"bad tier {item!r}: expected NAME:FRACTION:TBT_S[:TTFT_S] or a preset "
                             f"({', '.join(PRESETS)})")
        try:
            numbers = [float(p) if p.lower() not in ("", "none", "-") else None for p in parts[1:]]
        except ValueError:
            raise ValueError(f"bad tier {item!r}: FRACTION, TBT_S and TTFT_S must be numbers (or 'none')") from None
        fraction, tbt = numbers[0], numbers[1]
        ttft = numbers[2] if len(numbers) == 3 else None
        if fraction is None or not 0 < fraction <= 1:
            raise ValueError(f"bad tier {item!r}: fraction must be in (0, 1]")
        for value in (tbt, ttft):
            if value is not None and not value > 0:
                raise ValueError(f"bad tier {item!r}: targets must be > 0")
        tiers.append(Tier(parts[0], fraction, tbt, ttft))
    if len({t.name for t in tiers}) != len(tiers):
        raise ValueError(f"tier names repeat in {text!r}")
    total = sum(t.fraction for t in tiers)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"tier fractions must sum to 1, got {total:g} in {text!r}")
    return tuple(tiers)


def format_tiers(tiers: tuple[Tier, ...]) -> str:
    def num(v: float | None) -> str:
        return "none" if v is None else f"{v:g}"

    return ",".join(f"{t.name}:{t.fraction:g}:{num(t.tbt_slo_s)}" + (f":{num(t.ttft_slo_s)}" if t.ttft_slo_s else "")
                    for t in tiers)


def assign_tiers(tiers: tuple[Tier, ...], n: int, rng: np.random.Generator) -> list[Tier]:
    """``n`` independent draws (a single tier: no random numbers used)."""
    if len(tiers) == 1:
        return [tiers[0]] * n
    probs = np.array([t.fraction for t in tiers])
    index = rng.choice(len(tiers), size=n, p=probs / probs.sum())
    return [tiers[i] for i in index]
