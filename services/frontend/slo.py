"""SLO tiers and the SLO each request runs under.

A tier is a named pair of latency targets in seconds: ``tbt_s`` (time between tokens, always set, so workers always
see a concrete TBT target) and ``ttft_s`` (time to first token, None = no target). The built-in tiers are
``default`` (TBT 0.2 s), ``strict`` (0.1 s) and ``relaxed`` (0.5 s), none with a TTFT target. A configured tiers map
``{"<name>": {"tbt_s": <s>, "ttft_s": <s>}}`` replaces the built-in set; ``default`` (TBT 0.2 s) is added when the
map does not define it, because a request that names no tier runs in it.

Resolution (``SloPolicy.resolve``) of a request's optional ``tier``, ``ttft_s`` and ``tbt_s``:
- the tier must be known and a target a finite number > 0 (else ``APIError`` 400);
- without API keys the request's tier is used (``default`` when it names none);
- with API keys the tier is always the client's own: a request naming another (known) tier still runs in its own,
  so a client cannot promote itself. Its targets may be looser than the tier's but not tighter (400 otherwise;
  a tier without a TTFT target refuses any ``ttft_s``), since a tighter target is a promotion too: SLAI treats
  decodes with smaller TBT targets as more urgent;
- the result is the tier's name with the request's own targets where given, the tier's otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diptych.proto import SLO
from diptych.services.frontend.api_errors import bad_request

DEFAULT_TIER = "default"


@dataclass(frozen=True)
class Tier:
    """Latency targets in seconds. Invariant: ``tbt_s > 0``; ``ttft_s`` is None or > 0."""

    tbt_s: float
    ttft_s: float | None = None


BUILTIN_TIERS: dict[str, Tier] = {"default": Tier(0.2), "strict": Tier(0.1), "relaxed": Tier(0.5)}

_TIER_KEYS = frozenset({"tbt_s", "ttft_s"})


def parse_tiers(data: Any, where: str) -> dict[str, Tier]:
    """A configured tiers map -> the tier table (``default`` added when absent). Raises ValueError naming the
    problem, prefixed by ``where`` (e.g. the file it came from)."""
    if not isinstance(data, dict):
        raise ValueError(f'{where}: tiers must be an object {{"<name>": {{"tbt_s": ..., "ttft_s": ...}}}}')
    tiers = {DEFAULT_TIER: BUILTIN_TIERS[DEFAULT_TIER]}
    for name, spec in data.items():
        if not name:
            raise ValueError(f"{where}: a tier name must be a non-empty string")
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: tier {name!r} must be an object with tbt_s and optionally ttft_s")
        unknown = set(spec) - _TIER_KEYS
        if unknown:
            raise ValueError(f"{where}: tier {name!r} has unknown keys {sorted(unknown)}; allowed: tbt_s, ttft_s")
        if "tbt_s" not in spec or not _positive(spec["tbt_s"]):
            raise ValueError(f"{where}: tier {name!r} needs tbt_s, a positive number of seconds")
        ttft = spec.get("ttft_s")
        if ttft is not None and not _positive(ttft):
            raise ValueError(f"{where}: tier {name!r}: ttft_s must be a positive number of seconds or null")
        tiers[name] = Tier(float(spec["tbt_s"]), None if ttft is None else float(ttft))
    return tiers


class SloPolicy:
    """Resolves requested SLOs against the tier table. ``client_tiers_fixed`` is True when API keys are configured
    (a client runs in its key's tier). Invariant: every resolved SLO names a known tier and has ``tbt_s > 0``."""

    def __init__(self, tiers: dict[str, Tier] | None = None, client_tiers_fixed: bool = False) -> None:
        self.tiers = dict(BUILTIN_TIERS if tiers is None else tiers)
        if DEFAULT_TIER not in self.tiers:
            raise ValueError(f"the tier table must define {DEFAULT_TIER!r}")
        self.client_tiers_fixed = client_tiers_fixed

    def describe(self) -> str:
        """The tier table for the startup log: ``default(tbt=0.2s) strict(tbt=0.1s,ttft=1s) ...``."""
        return " ".join(f"{name}(tbt={t.tbt_s:g}s{'' if t.ttft_s is None else f',ttft={t.ttft_s:g}s'})"
                        for name, t in sorted(self.tiers.items()))

    def resolve(self, client_tier: str, tier: Any = None, ttft_s: Any = None, tbt_s: Any = None,
                param: str | None = None) -> SLO:
        """The SLO of a request from a client of ``client_tier`` that asked for ``tier``/``ttft_s``/``tbt_s``
        (None: not given). Raises APIError(400) with ``param`` for bad values. ``client_tier`` must be known."""
        if tier is not None and (not isinstance(tier, str) or tier not in self.tiers):
            raise bad_request(f"unknown tier {tier!r}; known tiers: {', '.join(sorted(self.tiers))}", param)
        ttft_s = _target("ttft_s", ttft_s, param)
        tbt_s = _target("tbt_s", tbt_s, param)
        name = client_tier if self.client_tiers_fixed else (tier or DEFAULT_TIER)
        targets = self.tiers[name]
        if self.client_tiers_fixed:
            _check_not_tighter("tbt_s", tbt_s, targets.tbt_s, name, param)
            _check_not_tighter("ttft_s", ttft_s, targets.ttft_s, name, param)
        return SLO(tier=name, ttft_s=targets.ttft_s if ttft_s is None else ttft_s,
                   tbt_s=targets.tbt_s if tbt_s is None else tbt_s)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _target(name: str, value: Any, param: str | None) -> float | None:
    if value is None:
        return None
    if not _positive(value):
        raise bad_request(f"{name} must be a positive, finite number of seconds, got {value!r}", param)
    return float(value)


def _check_not_tighter(name: str, requested: float | None, limit: float | None, tier: str,
                       param: str | None) -> None:
    if requested is None or (limit is not None and requested >= limit):
        return
    if limit is None:
        raise bad_request(f"{name}={requested:g} s: your tier {tier!r} sets no {name} target, so a request may not "
                          "set one; ask the operator for a tier that does", param)
    raise bad_request(f"{name}={requested:g} s is tighter than your tier {tier!r} allows (at least {limit:g} s); "
                      "ask the operator for a stricter tier", param)
