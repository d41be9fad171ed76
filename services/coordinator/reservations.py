"""The coordinator's side of placing an admitted request (``cluster.core.Dispatch``) on its workers.

A colocated request goes to its one worker at once (a ``PrefillTask`` with ``colocated`` set: no reservation, no
handoff). A disaggregated one first reserves KV on its decode worker: ``ReserveKV`` asks for the prompt's blocks
(``RequestRecord.decode_blocks``) and the worker answers ``KVReserved``; once accepted, while the request is still
reserving, the prefill worker gets the ``PrefillTask`` with the granted block ids and the decode worker's KV ingress.
With a key set, the frontend first learns the request's workers (``RequestPlaced``), before any output can leave
them.

KV on demand: a decode worker's engine may refuse a handoff reservation (no free blocks at the moment, because its
sequences grew). That is not a failure: the request keeps its place and the reservation is sent again after a
backoff (``ClusterCore.reservation_refused``) until it is accepted, the request is cancelled, its worker is
evicted, or ``CoordinatorConfig.reserve_limit_s`` passes (503). ``retry_scheduled`` wakes the coordinator's watchdog
loop to recompute when the next refused reservation is due (``retry_due`` sends those due at a time, seconds since
the epoch).

Everything runs on the coordinator's event loop and goes out through its sends (``Coordinator._send``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from diptych.cluster.core import Dispatch
from diptych.cluster.requests import RequestRecord
from diptych.proto.messages import KVReserved, PrefillTask, Request, RequestPlaced, ReserveKV
from diptych.proto.roles import RequestPhase
from diptych.services.coordinator.endpoints import Submission

if TYPE_CHECKING:
    from diptych.services.coordinator.server import Coordinator

log = logging.getLogger("diptych.coordinator")


class Reservations:
    """The placement of admitted requests for one ``Coordinator``, whose state (core, endpoints, clock) it uses."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.retry_scheduled = asyncio.Event()
        """Set when a refused reservation is scheduled: the watchdog loop recomputes when to wake."""

    async def dispatch(self, dispatch: Dispatch) -> None:
        """Send what admission decided for one request: its task to a colocated worker, or the reservation."""
        coordinator = self.coordinator
        record = coordinator.requests.get(dispatch.request_id)
        endpoint = coordinator.endpoints[dispatch.decode_worker]
        assert record is not None
        log.info("req=%s admitted: prefill=%s decode=%s (%d decode blocks)", dispatch.request_id,
                 dispatch.prefill_worker, dispatch.decode_worker, dispatch.decode_blocks)
        if coordinator.keys is not None:  # the frontend takes outputs only from these workers; before any can leave one
            await coordinator._send(frontend_of(record), RequestPlaced(
                request_id=dispatch.request_id, workers=sorted({dispatch.prefill_worker, dispatch.decode_worker})))
        if dispatch.colocated:  # one worker runs it all: no reservation round trip, no handoff
            await coordinator._send(endpoint.identity, PrefillTask(
                request=_request(record), decode_worker_id=dispatch.decode_worker, decode_kv_addr="",
                admitted_time=record.admitted_time, colocated=True))
        else:
            await self.send(record)

    async def send(self, record: RequestRecord) -> None:
        """Ask the decode worker to reserve the prompt's blocks (``RequestRecord.decode_blocks``) for the handoff."""
        await self.coordinator.send_worker(record.decode_worker, ReserveKV(
            request_id=record.request_id, num_blocks=record.decode_blocks,
            prefill_worker_id=record.prefill_worker or ""))

    async def retry_due(self, now: float) -> None:
        """Send again the refused reservations due by ``now``."""
        for record in self.coordinator.core.reservations_due(now):
            log.debug("req=%s asking %s again to reserve %d blocks (refused %d times)", record.request_id,
                      record.decode_worker, record.decode_blocks, record.refused_reservations)
            await self.send(record)

    async def on_kv_reserved(self, identity: bytes, msg: KVReserved, user_id: str | None) -> None:
        """A refused reservation (the engine had no room at the moment) holds nothing on the worker: a reserving
        request keeps its place and asks again later; an ended one (cancelled meanwhile) is released."""
        coordinator = self.coordinator
        record = coordinator.requests.get(msg.request_id)
        if record is None or msg.worker_id != record.decode_worker:
            return
        if not msg.ok and record.decode_holds:
            if record.phase is RequestPhase.RESERVING:
                now = coordinator.clock()
                delay = coordinator.core.reservation_refused(record, now)
                if record.deadline is None:
                    record.deadline = now + coordinator.config.reserve_timeout_s
                log.debug("req=%s reservation refused by %s (%s); asking again in %.0f ms", msg.request_id,
                          msg.worker_id, msg.error, delay * 1e3)
                self.retry_scheduled.set()
            else:
                record.decode_holds = False
                coordinator.core.release_decode(record)
                coordinator.requests.drop_if_released(record)
            return
        if not msg.ok or record.phase is not RequestPhase.RESERVING:
            return
        prefill = coordinator.endpoints.get(record.prefill_worker or "")
        decode = coordinator.endpoints.get(record.decode_worker or "")
        if prefill is None or decode is None or record.decode_worker is None:
            await coordinator.fail(record, 503, "a worker assigned to the request is gone")
            return
        record.phase, record.prefill_holds = RequestPhase.PREFILLING, True
        await coordinator._send(prefill.identity, PrefillTask(
            request=_request(record), decode_worker_id=record.decode_worker, decode_kv_addr=decode.kv_addr,
            admitted_time=record.admitted_time, decode_blocks=msg.block_ids, decode_kv_share=decode.kv_share))


def frontend_of(record: RequestRecord) -> bytes:
    """The routing identity of the frontend that submitted ``record``."""
    submission: Submission = record.payload
    return submission.frontend


def _request(record: RequestRecord) -> Request:
    submission: Submission = record.payload
    return submission.request
