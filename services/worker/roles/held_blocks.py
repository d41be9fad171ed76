"""Blocks of aborted reservations that a prefill worker may still be writing into, GPU to GPU.

A decode worker that shares its KV pool cannot free an aborted request's reservation at once: the prefill worker
pushing into it may have copies in flight. It keeps the blocks here until that prefill worker says it stopped
(``KVPushAborted``, or the request's ``KVHandoff``: every copy landed), or until ``timeout_s`` has passed (the
request was cancelled before any prefill worker got it, or that worker died, which ends its copies).

The two events may come in either order: a stop that arrives before the abort is remembered (for ``timeout_s``), and
the abort then frees the blocks at once. Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

HOLD_TIMEOUT_S = 30.0


class HeldBlocks:
    def __init__(self, timeout_s: float = HOLD_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._held: dict[str, tuple[list[int], float]] = {}
        """Request id -> (its blocks, when they may be freed without word from the pusher)."""
        self._stopped: dict[str, float] = {}
        """Request ids whose pusher stopped before the abort -> when to forget them."""

    def hold(self, request_id: str, blocks: list[int], now: float) -> list[int]:
        """An aborted reservation's blocks: returns those free to go now (all, if its pusher already stopped), and
        holds them otherwise."""
        if self._stopped.pop(request_id, None) is not None:
            return blocks
        self._held[request_id] = (blocks, now + self.timeout_s)
        return []

    def push_stopped(self, request_id: str, now: float) -> list[int]:
        """The pusher into ``request_id``'s reservation will write no more: returns its held blocks, to be freed
        (none if the abort has not come yet: then it is remembered)."""
        entry = self._held.pop(request_id, None)
        if entry is not None:
            return entry[0]
        self._stopped[request_id] = now + self.timeout_s
        return []

    def expired(self, now: float) -> list[int]:
        """Blocks held past their timeout (returned once, to be freed); stale stop notices are forgotten."""
        freed: list[int] = []
        for request_id, (blocks, deadline) in list(self._held.items()):
            if deadline <= now:
                del self._held[request_id]
                freed.extend(blocks)
        for request_id, deadline in list(self._stopped.items()):
            if deadline <= now:
                del self._stopped[request_id]
        return freed

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def __len__(self) -> int:
        """Number of requests whose blocks are held."""
        return len(self._held)
