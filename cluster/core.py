"""The cluster core: workers, placement, accounting, pools and the service ledger behind one object that speaks
request ids, worker ids and counts and returns plain records. No I/O and no clock of its own: every call that needs
the time takes ``now`` (seconds, the driver's clock).

The admission loop (``admit``): after every event that can free capacity or add work, the driver calls ``admit``; it
asks the admission policy for its head request, places it or stops at the first request that cannot be placed (the
policy's order is never bypassed), pops it, accounts the placement and returns what to dispatch.

A refused handoff reservation (the decode engine had no free blocks at the time: other sequences grew) is not a
failure: ``reservation_refused`` keeps the request's place and accounting and schedules the reservation again after
``RESERVE_RETRY_S`` (doubling from the first to the second), and ``reservations_due`` hands the driver those to send.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from diptych.cluster import accounting
from diptych.cluster.ledger import ServiceLedger
from diptych.cluster.overload import QueueLimits, Shed
from diptych.cluster.placement import Placer
from diptych.cluster.pools import PoolManager
from diptych.cluster.requests import RequestRecord, RequestTable
from diptych.cluster.workers import WorkerRegistry, WorkerState
from diptych.policies.admission import AdmissionPolicy, PendingRequest, Rejection
from diptych.proto.roles import Pool, RequestPhase

RESERVE_RETRY_S = (0.05, 1.0)
"""Delay before a refused reservation is sent again (seconds): the first, doubled after each refusal up to the
second."""


@dataclass(slots=True)
class Dispatch:
    """Request ``request_id`` was admitted: it prefills on ``prefill_worker`` and decodes on ``decode_worker``
    (the same worker when ``colocated``), whose engine takes ``decode_blocks`` KV blocks for its prompt when it
    arrives (the handoff reservation) and allocates the rest on demand."""

    request_id: str
    prefill_worker: str
    decode_worker: str
    decode_blocks: int
    prefill_blocks: int
    colocated: bool


class ClusterCore:
    """``limits`` bounds the admission queue (None: unbounded, as in the simulator)."""

    def __init__(self, admission: AdmissionPolicy, registry: WorkerRegistry, placer: Placer,
                 pools: PoolManager, limits: QueueLimits | None = None) -> None:
        self.admission = admission
        self.workers = registry
        self.placer = placer
        self.pools = pools
        self.requests = RequestTable()
        self.ledger = ServiceLedger()
        self.limits = limits
        self.queued_prompt_tokens = 0
        """Prompt tokens of the requests waiting for admission."""
        self.queued_by_client: Counter[str] = Counter()
        """Requests waiting for admission, per client (clients with none are not listed)."""

    # ------------------------------------------------------------------ arrivals and admission

    def fits_anywhere(self, prompt_tokens: int, max_tokens: int) -> bool:
        return self.placer.fits_anywhere(prompt_tokens, max_tokens)

    def never_fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether the request is too large for the workers there are (False while a pool it needs is empty: a
        worker may join it)."""
        return self.placer.never_fits(prompt_tokens, max_tokens)

    def submit(self, record: RequestRecord, pending: PendingRequest, now: float) -> Rejection | Shed | None:
        """Queue ``record`` with the admission policy, or return why not (nothing recorded): ``Shed`` when the
        queue is at its ``limits``, else the policy's rejection."""
        if self.limits is not None:
            shed = self.limits.check(record.client_id, record.prompt_tokens, self.queued_by_client,
                                     self.queued_prompt_tokens)
            if shed is not None:
                return shed
        rejection = self.admission.add(pending, now)
        if rejection is not None:
            return rejection
        self.requests.add(record)
        self._queued(record, +1)
        return None

    def _queued(self, record: RequestRecord, sign: int) -> None:
        self.queued_prompt_tokens += sign * record.prompt_tokens
        count = self.queued_by_client[record.client_id] + sign
        if count:
            self.queued_by_client[record.client_id] = count
        else:
            del self.queued_by_client[record.client_id]

    def admit(self, now: float) -> list[Dispatch]:
        """Place and account queued requests in the admission policy's order until one cannot be placed."""
        policy = self.admission
        dispatches = []
        while (head := policy.peek()) is not None:
            record = self.requests.get(head.request_id)
            if record is None:  # defensive: a queued id with no record is dropped from the policy
                policy.remove(head.request_id)
                continue
            placement = self.placer.place(head.prompt_tokens, head.max_tokens)
            if placement is None:
                break
            policy.pop(now)
            self._queued(record, -1)
            accounting.commit(self.workers, record, placement, now)
            self.ledger.on_dispatch(record.client_id, head.prompt_tokens)
            colocated = placement.colocated
            record.phase = RequestPhase.DECODING if colocated else RequestPhase.RESERVING
            record.decode_holds = True  # the prefill worker holds it once it is sent its task
            dispatches.append(Dispatch(record.request_id, placement.prefill_worker, placement.decode_worker,
                                       placement.decode_blocks, placement.prefill_blocks, colocated))
        return dispatches

    @property
    def waiting_for_kv(self) -> bool:
        """The admission queue's head waits for decode KV (not for a prefill worker)."""
        return self.placer.waiting_for is Pool.DECODE

    def charge_output(self, client_id: str, count: int) -> None:
        """``count`` output tokens of ``client_id`` were produced: charge the admission policy and the ledger."""
        self.admission.on_output_tokens(client_id, count)
        self.ledger.on_output(client_id, count)

    # ------------------------------------------------------------------ refused reservations

    def reservation_refused(self, record: RequestRecord, now: float) -> float:
        """The decode worker refused ``record``'s reservation and holds nothing for it: the request keeps its
        placement and accounting, and its reservation is due again after ``RESERVE_RETRY_S``. Returns that delay
        (seconds)."""
        record.decode_holds = False
        record.refused_reservations += 1
        first, longest = RESERVE_RETRY_S
        delay = min(first * 2 ** (record.refused_reservations - 1), longest)
        record.reserve_retry_at = now + delay
        worker = self.workers.get(record.decode_worker or "")
        if worker is not None:
            worker.refused_reservations += 1
        return delay

    def reservations_due(self, now: float) -> list[RequestRecord]:
        """The reserving requests whose refused reservation the driver must send again now; each counts as held by
        its decode worker from here (as at dispatch)."""
        due = self.requests.reservations_due(now)
        for record in due:
            record.reserve_retry_at = None
            record.decode_holds = True
        return due

    # ------------------------------------------------------------------ releases and endings

    def release_prefill(self, record: RequestRecord) -> bool:
        return accounting.release_prefill(self.workers, record)

    def release_decode(self, record: RequestRecord) -> bool:
        return accounting.release_decode(self.workers, record)

    def release_unheld(self, record: RequestRecord) -> None:
        """Release the accounting of the halves of ``record`` that no worker holds (a request ended before its
        prompt reached the prefill worker, or before the decode worker was told of it): nothing else would."""
        if not record.prefill_holds:
            self.release_prefill(record)
        if not record.decode_holds:
            self.release_decode(record)

    def end(self, record: RequestRecord) -> list[str]:
        """Mark ``record`` ended (dropped from the admission queue if still there); returns the ids of the workers
        that still hold it and must be told to let it go (the record is dropped once none does)."""
        if record.phase is RequestPhase.QUEUED:
            self.admission.remove(record.request_id)
            self._queued(record, -1)
        record.phase = RequestPhase.ENDED
        holders = []
        if record.prefill_holds and record.prefill_worker:
            holders.append(record.prefill_worker)
        if record.decode_holds and record.decode_worker:
            holders.append(record.decode_worker)
        self.requests.drop_if_released(record)
        return holders

    def evict(self, worker_id: str) -> tuple[WorkerState | None, list[RequestRecord]]:
        """Remove the worker; the requests it held, and those reserving KV that it is placed for but does not hold
        (``RequestTable.waiting_on``), no longer count as held or accounted there. Returns the worker and those
        requests (the driver migrates or fails the ones not ended yet, then drops them)."""
        worker = self.workers.remove(worker_id)
        affected = self.requests.held_by(worker_id) + self.requests.waiting_on(worker_id)
        for record in affected:
            if record.prefill_worker == worker_id:
                record.prefill_holds = record.prefill_accounted = False
            if record.decode_worker == worker_id:
                record.decode_holds = record.decode_accounted = False
        return worker, affected
