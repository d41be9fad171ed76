"""RPM: a per-client requests-per-minute limit in front of FCFS (the VTC paper's rate-limit baseline).

A request is rejected at arrival when its client already had ``limit`` accepted requests in the last ``window_s``
seconds (a sliding window: an acceptance at time t counts while ``now - t < window_s``). The rejection's
``retry_after_s`` is the time until the oldest counted acceptance leaves the window, i.e. the earliest moment a retry
can succeed. Accepted requests are served first come, first served. Rejected requests do not count; cancelled ones
still do (they were accepted). Not work-conserving: capacity idles while rejected clients wait.

Times in seconds.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from diptych.policies.admission import ADMISSION_POLICIES, FCFSAdmission, PendingRequest, Rejection
from diptych.policies.knobs import Knob


@ADMISSION_POLICIES.register("rpm")
class RPMAdmission(FCFSAdmission):
    """FCFS behind a per-client sliding-window rate limit. Knobs: ``limit`` (accepted requests per window per
    client; 5 as in the paper's RPM(5) run), ``window_s`` (60.0)."""

    summary = "FCFS behind a per-client requests-per-minute limit (429 beyond it)"
    knobs = (
        Knob("limit", int, 5, "accepted requests per window per client"),
        Knob("window_s", float, 60.0, "sliding window, seconds"),
    )

    def __init__(self, limit: int = 5, window_s: float = 60.0) -> None:
        super().__init__()
        if limit <= 0 or window_s <= 0:
            raise ValueError("limit and window_s must be positive")
        self.limit = limit
        self.window_s = window_s
        self._accepted_at: dict[str, deque[float]] = {}
        self.rejected: dict[str, int] = {}

    def add(self, request: PendingRequest, now: float) -> Rejection | None:
        client = request.client_id
        recent = self._accepted_at.setdefault(client, deque())
        self._expire(recent, now)
        if len(recent) >= self.limit:
            self.rejected[client] = self.rejected.get(client, 0) + 1
            retry_after = max(0.0, recent[0] + self.window_s - now)
            return Rejection(
                f"rate limit: client {client!r} already had {self.limit} requests in the last {self.window_s:g} s",
                retry_after_s=retry_after,
            )
        recent.append(now)
        return super().add(request, now)

    def _expire(self, recent: deque[float], now: float) -> None:
        while recent and now - recent[0] >= self.window_s:
            recent.popleft()

    def snapshot(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "waiting": len(self),
            "limit": self.limit,
            "window_s": self.window_s,
            "accepted_in_window": {client: len(times) for client, times in self._accepted_at.items()},
            "rejected": dict(self.rejected),
        }
