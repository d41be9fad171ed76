"""Bounds on the admission queue: beyond them a new request is shed at once with an explicit answer, so the queue
(and the memory behind it) stays bounded and a client learns when to come back instead of waiting without end.

``QueueLimits.check`` is pure: it reads the queue's counts and answers. Shedding is per client when the queue is
shared fairly (``per_client``: the VTC policy): a client holding at least its fair share of the full queue
(``max_requests / clients queued``) gets 429, any other client 503; without fair sharing every shed request gets 503.
Both carry ``retry_after_s``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

TOO_MANY_REQUESTS = 429
UNAVAILABLE = 503


@dataclass(frozen=True)
class Shed:
    """A request refused because the queue is full: HTTP ``code`` (429 or 503), why, and when to retry (seconds)."""

    code: int
    reason: str
    retry_after_s: float


@dataclass(frozen=True)
class QueueLimits:
    """``max_requests`` queued requests and ``max_tokens`` queued prompt tokens at most (None: no bound);
    ``retry_after_s`` is what a shed request is told."""

    max_requests: int | None = None
    max_tokens: int | None = None
    retry_after_s: float = 1.0
    per_client: bool = False

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or None for no bound)")
        if self.retry_after_s <= 0:
            raise ValueError("retry_after_s must be positive")

    def check(self, client_id: str, prompt_tokens: int, queued: Counter[str], queued_tokens: int) -> Shed | None:
        """None when a request of ``prompt_tokens`` from ``client_id`` may join a queue holding ``queued`` requests
        per client and ``queued_tokens`` prompt tokens; else the answer to shed it with. An empty queue always takes
        one request, however long."""
        total = sum(queued.values())
        if total == 0:
            return None
        if self.max_requests is not None and total >= self.max_requests:
            reason = f"admission queue full ({total} requests queued)"
        elif self.max_tokens is not None and queued_tokens + prompt_tokens > self.max_tokens:
            reason = f"admission queue full ({queued_tokens} prompt tokens queued)"
        else:
            return None
        if self.per_client and queued[client_id] * len(queued) >= total:
            return Shed(TOO_MANY_REQUESTS, f"{reason}; client {client_id} holds its share", self.retry_after_s)
        return Shed(UNAVAILABLE, reason, self.retry_after_s)
