"""An ordered queue of waiting requests: FIFO, or shortest prompt first with an optional aging bound.

Used for one client's waiting requests (VTC, LCF) and for the single queue of SPF admission.

Invariants: ``head(now)`` is deterministic given the pushes and removals so far and ``now``; a request is in the
queue at most once (keyed by ``request_id``). Orders:

- ``"fifo"``: the oldest request (first pushed) is the head.
- ``"spf"``: the request with the fewest prompt tokens is the head, ties by push order. With ``aging_s`` set, the
  oldest request goes first once it has waited longer than ``aging_s`` seconds (``now - arrival_time > aging_s``),
  which bounds starvation of long prompts. ``aging_s=None`` (the default) disables aging.

Times in seconds, lengths in tokens.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from diptych.policies.admission import PendingRequest

QUEUE_ORDERS = ("fifo", "spf")


class RequestQueue:
    def __init__(self, order: str = "fifo", aging_s: float | None = None) -> None:
        if order not in QUEUE_ORDERS:
            raise ValueError(f"queue order must be one of {QUEUE_ORDERS}, got {order!r}")
        if aging_s is not None and order != "spf":
            raise ValueError("aging_s applies only to the 'spf' order (FIFO already serves the oldest first)")
        if aging_s is not None and aging_s < 0:
            raise ValueError("aging_s must be >= 0")
        self.order = order
        self.aging_s = aging_s
        self._by_age: OrderedDict[str, tuple[int, PendingRequest]] = OrderedDict()  # id -> (push number, request)
        self._by_prompt: list[tuple[int, int, str]] = []  # (prompt_tokens, push number, request_id), lazy deletion
        self._pushes = 0

    def push(self, request: PendingRequest) -> None:
        if request.request_id in self._by_age:
            raise ValueError(f"request {request.request_id!r} is already queued")
        self._by_age[request.request_id] = (self._pushes, request)
        if self.order == "spf":
            heapq.heappush(self._by_prompt, (request.prompt_tokens, self._pushes, request.request_id))
        self._pushes += 1

    def oldest(self) -> PendingRequest | None:
        """The request pushed first among those still queued."""
        entry = next(iter(self._by_age.values()), None)
        return entry[1] if entry is not None else None

    def head(self, now: float) -> PendingRequest | None:
        """The request this queue serves next at time ``now``."""
        oldest = self.oldest()
        if oldest is None or self.order == "fifo":
            return oldest
        if self.aging_s is not None and now - oldest.arrival_time > self.aging_s:
            return oldest
        while not self._is_live(self._by_prompt[0]):  # drop entries of requests already removed
            heapq.heappop(self._by_prompt)
        return self._by_age[self._by_prompt[0][2]][1]

    def _is_live(self, entry: tuple[int, int, str]) -> bool:
        """A heap entry is live while its request is queued from that same push (an id may be queued again)."""
        queued = self._by_age.get(entry[2])
        return queued is not None and queued[0] == entry[1]

    def remove(self, request_id: str) -> PendingRequest | None:
        """Drop ``request_id``; returns it, or None if it was not queued."""
        entry = self._by_age.pop(request_id, None)
        if len(self._by_prompt) > 2 * len(self._by_age) + 64:  # keep the lazily cleaned heap proportional
            self._by_prompt = [item for item in self._by_prompt if self._is_live(item)]
            heapq.heapify(self._by_prompt)
        return entry[1] if entry is not None else None

    def __len__(self) -> int:
        return len(self._by_age)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_age
