"""SPF admission: shortest prompt first across all clients, with an optional aging bound.

The head is the waiting request with the fewest prompt tokens (ties: arrival order). With ``aging_s`` set, a request
that has waited longer than ``aging_s`` seconds goes first (oldest first), bounding the starvation of long prompts;
``aging_s=None`` (default) is pure SPF. Time is the policy's clock (see ``policies.admission``).
"""

from __future__ import annotations

from diptych.policies.admission import ADMISSION_POLICIES, AdmissionPolicy, PendingRequest, Rejection
from diptych.policies.knobs import Knob
from diptych.policies.request_queue import RequestQueue


@ADMISSION_POLICIES.register("spf")
class SPFAdmission(AdmissionPolicy):
    """Shortest prompt first. Knob: ``aging_s`` (seconds, None = off)."""

    summary = "shortest prompt first across clients (optional aging bound)"
    knobs = (Knob("aging_s", float, None, "seconds after which a waiting request goes first (None: off)",
                  optional=True),)

    def __init__(self, aging_s: float | None = None) -> None:
        self.aging_s = aging_s
        self._queue = RequestQueue("spf", aging_s)
        self._clock = float("-inf")

    def add(self, request: PendingRequest, now: float) -> Rejection | None:
        self._clock = max(self._clock, now)
        self._queue.push(request)
        return None

    def peek(self, now: float | None = None) -> PendingRequest | None:
        if now is not None:
            self._clock = max(self._clock, now)
        return self._queue.head(self._clock)

    def pop(self, now: float) -> PendingRequest:
        head = self.peek()
        if head is None:
            raise IndexError("pop from an empty admission queue")
        self._queue.remove(head.request_id)
        self._clock = max(self._clock, now)
        return head

    def remove(self, request_id: str) -> bool:
        return self._queue.remove(request_id) is not None

    def __len__(self) -> int:
        return len(self._queue)
