"""The coordinator's table of in-flight requests and which workers hold each one.

A request is *held* by a worker from the moment the coordinator sends it work (``ReserveKV`` to the decode worker,
``PrefillTask`` to the prefill worker) until that worker says it let go (``PrefillDone`` or ``RequestDone``), or the
worker is evicted. A record is deleted once it is finished or cancelled and no worker holds it. Accounting on workers
(backlog, reservation) is tracked by its own flags and released exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from diptych.proto.messages import Request


class Phase(str, Enum):
    QUEUED = "queued"
    RESERVING = "reserving"
    PREFILLING = "prefilling"
    HANDOFF = "handoff"
    DECODING = "decoding"
    ENDED = "ended"


@dataclass
class RequestRecord:
    request: Request
    frontend: bytes
    phase: Phase = Phase.QUEUED
    prefill_worker: str | None = None
    decode_worker: str | None = None
    prefill_blocks: int = 0
    decode_blocks: int = 0
    prefill_holds: bool = False
    decode_holds: bool = False
    prefill_accounted: bool = False
    """The prompt still counts in the prefill worker's backlog (until its first token)."""
    decode_accounted: bool = False
    """The decode reservation still counts on the decode worker (until it lets the request go)."""
    handoff_deadline: float | None = None
    admitted_time: float = 0.0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def releasable(self) -> bool:
        return self.phase is Phase.ENDED and not self.prefill_holds and not self.decode_holds


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

    def drop_if_released(self, record: RequestRecord) -> None:
        if record.releasable:
            self._records.pop(record.request_id, None)

    def held_by(self, worker_id: str) -> list[RequestRecord]:
        return [
            r for r in self._records.values()
            if (r.prefill_holds and r.prefill_worker == worker_id) or (r.decode_holds and r.decode_worker == worker_id)
        ]

    def overdue_handoffs(self, now: float) -> list[RequestRecord]:
        return [
            r for r in self._records.values()
            if r.phase is Phase.HANDOFF and r.handoff_deadline is not None and now > r.handoff_deadline
        ]

    def queued_prompt_tokens(self) -> int:
        """Prompt tokens of the requests still waiting for admission."""
        return sum(r.prompt_tokens for r in self._records.values() if r.phase is Phase.QUEUED)
