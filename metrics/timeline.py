"""Per-request timelines: what happened to each request and when. The common output of the live load generator
and the simulator, so their runs are summarised by the same code (``metrics.summary``).

All times are seconds on one clock: the simulator's virtual time, or for a live run seconds since the epoch
(``summarize`` only uses differences). Field names follow the services' phase events (``proto.messages.TokenOutput
.events``): ``admitted`` (left the coordinator's admission queue), ``prefill_start`` / ``prefill_end`` (first chunk
started / last chunk ended on the prefill or colocated worker), ``handoff_start`` / ``handoff_end`` (KV sent by the
prefill worker / landed in the decode worker's pool; None on colocated workers), ``first_token``, ``token_times``
(every output token, the first included), ``finish`` (last token, or when the request failed).

``status``: ``finished``, ``rejected`` (refused at admission, e.g. a rate limit; ``finish`` = refusal time),
``failed`` (an error after admission) or ``unfinished`` (still running when the run stopped).

File format (``save_timelines`` / ``load_timelines``): one JSON object
``{"format": "diptych-timelines/1", "meta": {...}, "requests": [RequestTimeline as a dict, ...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT = "diptych-timelines/1"
STATUSES = ("finished", "rejected", "failed", "unfinished")


@dataclass
class RequestTimeline:
    request_id: str
    client_id: str
    arrival: float
    prompt_len: int
    output_len: int
    tier: str = "default"
    tbt_slo_s: float | None = None
    ttft_slo_s: float | None = None
    weight: float = 1.0
    admitted: float | None = None
    prefill_start: float | None = None
    prefill_end: float | None = None
    handoff_start: float | None = None
    handoff_end: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    status: str = "unfinished"
    num_tokens: int | None = None
    prefill_worker: str | None = None
    decode_worker: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"request {self.request_id}: status must be one of {STATUSES}, got {self.status!r}")
        if self.num_tokens is None:
            self.num_tokens = len(self.token_times)
        if self.first_token is None and self.token_times:
            self.first_token = self.token_times[0]

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name for f in fields(RequestTimeline)}
_PHASES = ("admitted", "prefill_start", "prefill_end", "handoff_start", "handoff_end")


def from_service_timeline(spec: Any, timeline: dict[str, Any] | None, status: str | None = None) -> RequestTimeline:
    """A ``RequestTimeline`` for request ``spec`` (a ``workloads.spec.RequestSpec``) from the timeline the frontend
    returns on a request's final chunk (``services/frontend/timeline.py``: ``arrival``, the phase times,
    ``first_token``, ``token_times``, ``finish``, ``finish_reason``). ``status`` overrides the one derived from
    ``finish_reason`` (e.g. ``rejected`` for a 429). Times stay on the service's clock (seconds since the epoch)."""
    timeline = timeline or {}
    reason = timeline.get("finish_reason")
    if status is None:
        status = "finished" if reason in ("stop", "length") else ("failed" if reason else "unfinished")
    tokens = [float(t) for t in timeline.get("token_times", [])]
    return RequestTimeline(
        request_id=spec.request_id, client_id=spec.client_id, arrival=float(timeline.get("arrival", 0.0)),
        prompt_len=spec.prompt_len, output_len=spec.output_len, tier=spec.tier, tbt_slo_s=spec.tbt_slo_s,
        ttft_slo_s=spec.ttft_slo_s, weight=spec.weight,
        **{phase: timeline.get(phase) for phase in _PHASES},
        first_token=timeline.get("first_token", tokens[0] if tokens else None), token_times=tokens,
        finish=timeline.get("finish"), status=status,
    )


def timeline_from_dict(data: dict[str, Any]) -> RequestTimeline:
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"unknown timeline fields: {sorted(unknown)}")
    return RequestTimeline(**data)


def save_timelines(timelines: Iterable[RequestTimeline], path: str | Path, meta: dict[str, Any] | None = None) -> None:
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "meta": meta or {}, "requests": [t.to_dict() for t in timelines]}, f)


def load_timelines(path: str | Path) -> tuple[list[RequestTimeline], dict[str, Any]]:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a timelines file (expected format {FORMAT!r})")
    return [timeline_from_dict(r) for r in data["requests"]], data.get("meta", {})
