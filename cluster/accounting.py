"""KV reservation and prefill-backlog accounting: what a placement adds to its workers, released exactly once.

The decoding worker is accounted the placement's expected footprint (``Placement.reserved_blocks``), not the blocks
its engine holds: engines allocate on demand and preempt, so the account spreads load and bounds queues, and real
memory may be over-committed by design (``cluster.placement``).

``commit`` adds a placement to its workers and marks the record accounted; ``release_prefill`` (the prompt left the
prefill worker's backlog: first token, prefill ended, or the request was let go) and ``release_decode`` (the decoding
worker let the request go) each undo their half once, whatever number of times they are called.
"""

from __future__ import annotations

from diptych.cluster.placement import Placement
from diptych.cluster.requests import RequestRecord
from diptych.cluster.workers import WorkerRegistry


def commit(registry: WorkerRegistry, record: RequestRecord, placement: Placement, now: float) -> None:
    """Account ``placement`` on its workers and record it on ``record`` (admitted at ``now``)."""
    prefill = registry.workers[placement.prefill_worker]
    decode = registry.workers[placement.decode_worker]
    decode.reserved_blocks += placement.reserved_blocks
    decode.decode_requests += 1
    prefill.backlog_tokens += placement.prompt_tokens
    prefill.backlog_blocks += placement.prefill_blocks
    prefill.prefill_requests += 1
    record.admitted_time = now
    record.prefill_worker, record.decode_worker = placement.prefill_worker, placement.decode_worker
    record.prefill_blocks, record.decode_reserved_blocks = placement.prefill_blocks, placement.reserved_blocks
    record.decode_blocks = placement.decode_blocks
    record.prefill_accounted = record.decode_accounted = True


def release_prefill(registry: WorkerRegistry, record: RequestRecord) -> bool:
    """Take the prompt out of the prefill worker's backlog, once; True if this call released it."""
    if not record.prefill_accounted:
        return False
    record.prefill_accounted = False
    worker = registry.get(record.prefill_worker or "")
    if worker is not None:
        worker.backlog_tokens -= record.prompt_tokens
        worker.backlog_blocks -= record.prefill_blocks
        worker.prefill_requests -= 1
    return True


def release_decode(registry: WorkerRegistry, record: RequestRecord) -> bool:
    """Give back the decoding worker's footprint (and its batch slot), once; True if this call released it."""
    if not record.decode_accounted:
        return False
    record.decode_accounted = False
    worker = registry.get(record.decode_worker or "")
    if worker is not None:
        worker.reserved_blocks -= record.decode_reserved_blocks
        worker.decode_requests -= 1
    return True
