"""The core's table of requests: phase, the workers placed for each, and which of them hold it.

A request is *held* by a worker from the moment the driver sends it work (a reservation to the decode worker, the
prefill task to the prefill worker) until that worker lets it go, or is evicted. A record is dropped once it has
ended and no worker holds it. The accounting a placement adds to its workers is tracked by its own flags
(``prefill_accounted``, ``decode_accounted``) and released exactly once (``cluster.accounting``).

A handoff reservation the decode worker refused (its engine had no free blocks at the time) is not held by it: the
request keeps its placement and accounting, and the driver sends the reservation again at ``reserve_retry_at``
(``ClusterCore.reservation_refused``, ``reservations_due``) until it is accepted, the request ends, a worker it is
placed on is evicted (``waiting_on``), or its ``deadline`` passes (``overdue``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diptych.proto.roles import RequestPhase


@dataclass(eq=False)
class RequestRecord:
    request_id: str
    client_id: str
    prompt_tokens: int
    max_tokens: int
    payload: Any = None
    """The driver's own data for the request (the coordinator: the request message and its frontend)."""
    phase: RequestPhase = RequestPhase.QUEUED
    prefill_worker: str | None = None
    decode_worker: str | None = None
    prefill_blocks: int = 0
    """KV blocks of the prompt counted in the prefill worker's backlog (0 when colocated)."""
    decode_reserved_blocks: int = 0
    """The expected footprint accounted on the decoding worker (KV blocks; 0 when colocated without reservation)."""
    decode_blocks: int = 0
    """KV blocks the decoding engine takes for the prompt (``ReserveKV.num_blocks``; ``Placement.decode_blocks``)."""
    prefill_holds: bool = False
    decode_holds: bool = False
    prefill_accounted: bool = False
    """The prompt still counts in the prefill worker's backlog (until its first token)."""
    decode_accounted: bool = False
    """The decode reservation still counts on the decoding worker (until it lets the request go)."""
    handoff_deadline: float | None = None
    refused_reservations: int = 0
    """Times the decode worker refused this request's reservation."""
    reserve_retry_at: float | None = None
    """When to send the refused reservation again (driver's clock, seconds); None while none waits to be sent."""
    admitted_time: float = 0.0
    deadline: float | None = None
    """When the request must have reached a prefill worker (driver's clock, seconds): a request still queued or
    reserving then ends with an error (``RequestTable.overdue``). None: no deadline."""

    @property
    def releasable(self) -> bool:
        return self.phase is RequestPhase.ENDED and not self.prefill_holds and not self.decode_holds


_BEFORE_PREFILL = (RequestPhase.QUEUED, RequestPhase.RESERVING)


class RequestTable:
    def __init__(self) -> None:
        self._records: dict[str, RequestRecord] = {}

    def add(self, record: RequestRecord) -> None:
        self._records[record.request_id] = record

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def drop_if_released(self, record: RequestRecord) -> bool:
        """Forget an ended record that no worker holds; True if it was dropped."""
        if record.releasable:
            self._records.pop(record.request_id, None)
            return True
        return False

    def held_by(self, worker_id: str) -> list[RequestRecord]:
        return [
            r for r in self._records.values()
            if (r.prefill_holds and r.prefill_worker == worker_id) or (r.decode_holds and r.decode_worker == worker_id)
        ]

    def waiting_on(self, worker_id: str) -> list[RequestRecord]:
        """Requests reserving decode KV that ``worker_id`` is placed for but does not hold: to prefill on it (not
        sent yet), or to decode on it with a refused reservation waiting to be sent again."""
        return [r for r in self._records.values()
                if r.phase is RequestPhase.RESERVING and (
                    (r.prefill_worker == worker_id and not r.prefill_holds)
                    or (r.decode_worker == worker_id and not r.decode_holds))]

    def reservations_due(self, now: float) -> list[RequestRecord]:
        """Requests whose refused reservation is to be sent again by ``now``."""
        return [r for r in self._records.values()
                if r.phase is RequestPhase.RESERVING and r.reserve_retry_at is not None and now >= r.reserve_retry_at]

    def next_reservation_retry(self) -> float | None:
        """The earliest ``reserve_retry_at`` of a reserving request, or None."""
        return min((r.reserve_retry_at for r in self._records.values()
                    if r.phase is RequestPhase.RESERVING and r.reserve_retry_at is not None), default=None)

    def overdue(self, now: float) -> list[RequestRecord]:
        """Requests past their ``deadline`` that have not reached a prefill worker (queued, or reserving)."""
        return [
            r for r in self._records.values()
            if r.phase in _BEFORE_PREFILL and r.deadline is not None and now > r.deadline
        ]

    def held_count(self) -> dict[str, int]:
        """Requests held per worker id (one pass over the table)."""
        counts: dict[str, int] = {}
        for r in self._records.values():
            holders = {r.prefill_worker if r.prefill_holds else None, r.decode_worker if r.decode_holds else None}
            for worker_id in holders - {None}:
                assert worker_id is not None
                counts[worker_id] = counts.get(worker_id, 0) + 1
        return counts

    def overdue_handoffs(self, now: float) -> list[RequestRecord]:
        return [
            r for r in self._records.values()
            if r.phase is RequestPhase.HANDOFF and r.handoff_deadline is not None and now > r.handoff_deadline
        ]
