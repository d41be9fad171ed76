"""The request spec: what a load generator sends and the simulator replays, one per request.

A workload is a list of ``RequestSpec`` sorted by ``arrival_time`` (seconds from the start of the run). The live
load generator submits each at its arrival time with ``max_tokens = max_tokens``, ``stop_after_tokens = output_len``
and ``ignore_eos=True`` (so the output length is ``output_len``, as in the simulator, while the scheduler sees only
``max_tokens``) and the request's client, weight and SLO; the simulator replays the same list in virtual time.

File format (``save_specs`` / ``load_specs``): JSON Lines, one object per request with the field names below.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class RequestSpec:
    """One request. Times in seconds, lengths in tokens.

    ``output_len`` is the number of tokens generated; ``max_tokens`` the limit the request asks for (default
    ``output_len``; ``workloads.max_tokens`` sets it by policy), ``>= output_len``. ``tier`` names the SLO class;
    ``tbt_slo_s`` / ``ttft_slo_s`` its targets (None: none). ``weight`` is the client's fairness weight."""

    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int
    client_id: str = "default"
    tier: str = "default"
    tbt_slo_s: float | None = None
    ttft_slo_s: float | None = None
    weight: float = 1.0
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is None:
            self.max_tokens = self.output_len
        self.validate()

    def validate(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must not be empty")
        if not (math.isfinite(self.arrival_time) and self.arrival_time >= 0):
            raise ValueError(f"request {self.request_id}: arrival_time must be finite and >= 0")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"request {self.request_id}: prompt_len and output_len must be >= 1 "
                             f"(got {self.prompt_len}, {self.output_len})")
        if self.max_tokens is not None and self.max_tokens < self.output_len:
            raise ValueError(f"request {self.request_id}: max_tokens {self.max_tokens} < output_len {self.output_len}")
        for name in ("tbt_slo_s", "ttft_slo_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"request {self.request_id}: {name} must be > 0 or None")
        if not self.weight > 0:
            raise ValueError(f"request {self.request_id}: weight must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


_FIELDS = {f.name for f in fields(RequestSpec)}


def spec_from_dict(data: dict) -> RequestSpec:
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"unknown request spec fields: {sorted(unknown)}")
    return RequestSpec(**data)


def save_specs(specs: Iterable[RequestSpec], path: str | Path) -> None:
    with open(path, "w") as f:
        for spec in specs:
            f.write(json.dumps(spec.to_dict()) + "\n")


def load_specs(path: str | Path) -> list[RequestSpec]:
    specs = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                specs.append(spec_from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from None
    return sorted(specs, key=lambda s: s.arrival_time)


def sort_and_check(specs: list[RequestSpec]) -> list[RequestSpec]:
    """Sorted by arrival (stable), with unique request ids."""
    ids = set()
    for spec in specs:
        if spec.request_id in ids:
            raise ValueError(f"duplicate request id {spec.request_id!r}")
        ids.add(spec.request_id)
    return sorted(specs, key=lambda s: s.arrival_time)
