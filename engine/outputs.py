"""What one engine iteration produced."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampledToken:
    """One output token. ``index`` is its position among the request's output tokens (0 = first token, which a
    prefill worker samples). ``time`` is when the iteration that produced it ended (seconds since the epoch)."""

    request_id: str
    token_id: int
    index: int
    finish_reason: str | None
    time: float


@dataclass
class StepOutput:
    """Result of ``Engine.step``.

    ``prefilled`` lists ``prefill_only`` requests whose prefill completed in this iteration without finishing
    them: their KV is ready for ``Engine.export_kv``. ``finished`` lists requests that finished (their blocks are
    already free). ``num_prefill_tokens`` counts prompt tokens computed, ``num_decodes`` decode tokens;
    ``duration_s`` is the iteration's wall time in seconds (0 when nothing ran). ``admitted`` lists requests whose
    first prefill chunk ran in this iteration (their prefill started at ``start_time``, seconds since the epoch);
    a preempted request recomputing is not admitted again. ``preempted`` lists requests preempted by recompute at
    the start of this iteration (their blocks freed, their tokens kept: they wait to recompute).
    """

    tokens: list[SampledToken] = field(default_factory=list)
    prefilled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decodes: int = 0
    duration_s: float = 0.0
    admitted: list[str] = field(default_factory=list)
    start_time: float = 0.0
    preempted: list[str] = field(default_factory=list)
