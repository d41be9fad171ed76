"""Coordinator admission: which waiting request is dispatched next, across clients.

The coordinator drives an ``AdmissionPolicy`` like this (times in seconds, lengths in tokens)::

    rejection = policy.add(pending, now)            # None, or a Rejection (e.g. a rate limit)
    while (head := policy.peek()) is not None:     # or peek(now): moves the policy's clock (aging) first
        if not can_place(head):                     # no prefill room or no decode KV: stop, never skip ahead
            break
        policy.pop(now)                             # removes ``head`` and charges its input
        dispatch(head)
    policy.on_output_tokens(client_id, count)       # as decode workers report tokens
    policy.remove(request_id)                       # a waiting request was cancelled

Invariants: ``peek()`` is deterministic given the calls so far; ``pop()`` returns exactly what ``peek()`` returned;
``len(policy)`` is the number of waiting requests. Policies import neither torch nor ZeroMQ.

Clock: policies whose order depends on time (SPF aging) judge it at the latest ``now`` they were given (``add``,
``peek(now)``, ``pop``); the clock never moves backwards. ``pop(now)`` removes what ``peek()`` returns at that clock,
then advances the clock to ``now``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

from diptych.policies.knobs import Knob
from diptych.policies.registry import Registry


@dataclass
class PendingRequest:
    """A request waiting for admission. ``weight`` is its client's fairness weight (> 0)."""

    request_id: str
    client_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_time: float
    weight: float = 1.0
    tier: str = "default"


@dataclass
class Rejection:
    """Why a request was refused at arrival; ``retry_after_s`` tells the client when to try again."""

    reason: str
    retry_after_s: float | None = None


class AdmissionPolicy(ABC):
    name: str = ""
    knobs: ClassVar[tuple[Knob, ...]] = ()
    """The constructor's keyword arguments (``policies.knobs``)."""

    @abstractmethod
    def add(self, request: PendingRequest, now: float) -> Rejection | None:
        """Queue ``request`` (or refuse it)."""

    @abstractmethod
    def peek(self, now: float | None = None) -> PendingRequest | None:
        """The request that should be dispatched next, without removing it. ``now``, when given, first moves the
        policy's clock forward (only time-dependent orders care)."""

    @abstractmethod
    def pop(self, now: float) -> PendingRequest:
        """Remove and return ``peek()``'s request, charging its client for the input."""

    @abstractmethod
    def remove(self, request_id: str) -> bool:
        """Drop a waiting request (cancelled). True if it was waiting."""

    def on_output_tokens(self, client_id: str, count: int) -> None:  # noqa: B027 (an optional hook: no-op by default)
        """``count`` more output tokens were generated for ``client_id``."""

    @abstractmethod
    def __len__(self) -> int: ...

    def snapshot(self) -> dict[str, Any]:
        """Observable state (counters, per-client service) for the admin endpoint and metrics."""
        return {"policy": self.name, "waiting": len(self)}


ADMISSION_POLICIES: Registry[AdmissionPolicy] = Registry("admission")


@ADMISSION_POLICIES.register("fcfs")
class FCFSAdmission(AdmissionPolicy):
    """First come, first served across all clients."""

    summary = "first come, first served across all clients"

    def __init__(self) -> None:
        self._queue: deque[PendingRequest] = deque()

    def add(self, request: PendingRequest, now: float) -> Rejection | None:
        self._queue.append(request)
        return None

    def peek(self, now: float | None = None) -> PendingRequest | None:
        return self._queue[0] if self._queue else None

    def pop(self, now: float) -> PendingRequest:
        return self._queue.popleft()

    def remove(self, request_id: str) -> bool:
        for i, request in enumerate(self._queue):
            if request.request_id == request_id:
                del self._queue[i]
                return True
        return False

    def __len__(self) -> int:
        return len(self._queue)
