"""The coordinator process: admission across clients, placement on workers, worker liveness.

One ROUTER socket (``proto/README.md``, "control") serves frontends and workers. Every handler runs on the one event
loop, so the state below is never touched concurrently. Admission runs after every event that can free capacity or
add work: it asks the admission policy for its head request and stops at the first that cannot be placed (the
policy's order is never bypassed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from diptych.policies.admission import ADMISSION_POLICIES, PendingRequest
from diptych.proto import ProtocolError
from diptych.proto.messages import (
    CancelRequest, ClusterStatus, Heartbeat, KVReceived, KVReserved, PrefillDone, PrefillTask, RegisterAck, RegisterWorker,
    RequestDone, RequestFailed, ReserveKV, StatusQuery, SubmitRequest, TokenReport,
)
from diptych.services.common.sockets import bind_address, make_socket, recv_message, send_message
from diptych.services.coordinator.config import CoordinatorConfig
from diptych.services.coordinator.ledger import ServiceLedger
from diptych.services.coordinator.placement import Placer
from diptych.services.coordinator.pools import PoolManager
from diptych.services.coordinator.requests import Phase, RequestRecord, RequestTable
from diptych.services.coordinator.workers import WorkerInfo, WorkerRegistry

log = logging.getLogger("diptych.coordinator")

UNKNOWN_WORKER = "unknown worker"


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.policy = ADMISSION_POLICIES.create(config.admission_policy, **config.admission_knobs)
        self.workers = WorkerRegistry(config.heartbeat_timeout_s)
        self.placer = Placer(self.workers, config.max_prefill_backlog_tokens, config.max_decode_sequences)
        self.pools = PoolManager(self.workers, config.pool_policy, config.pool_knobs, config.pool_interval_s)
        self.requests = RequestTable()
        self.ledger = ServiceLedger()
        self.ctx = zmq.asyncio.Context()
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind=bind_address(config.address))
        self._handlers = {
            SubmitRequest: self._on_submit, CancelRequest: self._on_cancel, RegisterWorker: self._on_register,
            Heartbeat: self._on_heartbeat, KVReserved: self._on_kv_reserved, PrefillDone: self._on_prefill_done,
            KVReceived: self._on_kv_received, TokenReport: self._on_token_report, RequestDone: self._on_request_done,
            StatusQuery: self._on_status_query,
        }

    # ------------------------------------------------------------------ main loops

    async def run(self, stop: asyncio.Event) -> None:
        log.info("listening on %s (admission=%s, pools=%s)", self.config.address, self.policy.name,
                 self.pools.policy.name)
        tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watchdog_loop())]
        await stop.wait()
        log.info("stopping: %d requests in flight, %d waiting", len(self.requests), len(self.policy))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sock.close()
        self.ctx.term()

    async def _receive_loop(self) -> None:
        while True:
            identity, msg = await recv_message(self.sock, routed=True)
            if isinstance(msg, ProtocolError):
                log.warning("dropped a malformed message from %r: %s", identity, msg)
                continue
            handler = self._handlers.get(type(msg))
            if handler is None:
                log.warning("dropped a %s from %r: not a coordinator message", type(msg).__name__, identity)
                continue
            try:
                await handler(identity, msg)
                await self._admit()
            except Exception:  # one bad message must not take the coordinator down
                log.exception("error handling %s from %r", type(msg).__name__, identity)

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.watchdog_interval_s)
            now = time.time()
            for worker in self.workers.silent(now):
                await self._evict(worker, f"no heartbeat for {now - worker.last_heartbeat:.1f} s")
            for record in self.requests.overdue_handoffs(now):
                await self._fail(record, 503, "KV handoff timed out")
            self.pools.tick(now, self.requests.queued_prompt_tokens(), self.placer.waiting_for == "decode")
            await self._admit()

    # ------------------------------------------------------------------ sending

    async def _send(self, identity: bytes, msg: Any) -> bool:
        try:
            await send_message(self.sock, msg, to=identity)
            return True
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer is gone
            log.warning("could not send %s to %r: %s", type(msg).__name__, identity, exc)
            return False

    async def _send_worker(self, worker_id: str | None, msg: Any) -> None:
        worker = self.workers.get(worker_id) if worker_id else None
        if worker is not None:
            await self._send(worker.identity, msg)

    # ------------------------------------------------------------------ frontend messages

    async def _on_submit(self, identity: bytes, msg: SubmitRequest) -> None:
        request = msg.request
        rid = request.request_id
        if rid in self.requests:
            await self._send(identity, RequestFailed(rid, 400, f"duplicate request id {rid}"))
            return
        prompt, max_tokens = len(request.prompt_token_ids), request.sampling.max_tokens
        if not self.placer.fits_anywhere(prompt, max_tokens):
            code = 503 if not self.workers.workers else 400
            reason = "no workers registered" if code == 503 else "request larger than any worker's KV pool"
            log.info("req=%s refused: %s", rid, reason)
            await self._send(identity, RequestFailed(rid, code, reason))
            return
        pending = PendingRequest(rid, request.client_id, prompt, max_tokens, request.arrival_time,
                                 weight=request.weight, tier=request.slo.tier)
        rejection = self.policy.add(pending, time.time())
        if rejection is not None:
            log.info("req=%s client=%s rejected: %s", rid, request.client_id, rejection.reason)
            await self._send(identity, RequestFailed(rid, 429, rejection.reason, rejection.retry_after_s))
            return
        self.requests.add(RequestRecord(request, identity))
        self.pools.on_arrival(prompt, time.time())
        log.info("req=%s client=%s queued (%d prompt tokens, max %d)", rid, request.client_id, prompt, max_tokens)

    async def _on_cancel(self, identity: bytes, msg: CancelRequest) -> None:
        record = self.requests.get(msg.request_id)
        if record is None or record.phase is Phase.ENDED:
            return
        log.info("req=%s cancelled (%s) in phase %s", msg.request_id, msg.reason, record.phase.value)
        await self._end(record, msg.reason)

    # ------------------------------------------------------------------ admission

    async def _admit(self) -> None:
        while (head := self.policy.peek()) is not None:
            record = self.requests.get(head.request_id)
            if record is None:  # defensive: a queued id with no record is dropped from the policy
                self.policy.remove(head.request_id)
                continue
            placement = self.placer.place(head.prompt_tokens, head.max_tokens)
            if placement is None:
                return
            self.policy.pop(time.time())
            self.placer.commit(placement)
            self.ledger.on_dispatch(record.request.client_id, head.prompt_tokens)
            record.admitted_time = time.time()
            record.prefill_worker, record.decode_worker = placement.prefill.worker_id, placement.decode.worker_id
            record.prefill_blocks, record.decode_blocks = placement.prefill_blocks, placement.decode_blocks
            record.decode_holds = record.prefill_accounted = record.decode_accounted = True
            log.info("req=%s admitted: prefill=%s decode=%s (%d decode blocks)", head.request_id,
                     placement.prefill.worker_id, placement.decode.worker_id, placement.decode_blocks)
            if placement.colocated:  # one worker runs it all: no reservation round trip, no handoff
                record.phase = Phase.DECODING
                await self._send(placement.decode.identity, PrefillTask(
                    record.request, placement.decode.worker_id, "", record.admitted_time))
            else:
                record.phase = Phase.RESERVING
                await self._send(placement.decode.identity, ReserveKV(head.request_id, placement.decode_blocks))

    # ------------------------------------------------------------------ worker messages

    async def _on_register(self, identity: bytes, msg: RegisterWorker) -> None:
        error = self.workers.register(msg, identity, time.time())
        if error:
            log.warning("refused worker %s: %s", msg.worker_id, error)
        else:
            log.info("worker %s joined as %s (%d KV blocks of %d tokens)", msg.worker_id, msg.role,
                     msg.load.total_blocks, msg.layout.block_size)
        await self._send(identity, RegisterAck(ok=not error, error=error or ""))

    async def _on_heartbeat(self, identity: bytes, msg: Heartbeat) -> None:
        if not self.workers.heartbeat(msg.worker_id, msg.load, time.time()):
            await self._send(identity, RegisterAck(ok=False, error=UNKNOWN_WORKER))

    async def _on_kv_reserved(self, identity: bytes, msg: KVReserved) -> None:
        record = self.requests.get(msg.request_id)
        if record is None or record.phase is not Phase.RESERVING:
            return
        if not msg.ok:
            record.decode_holds = False
            self._release_decode(record)
            self._release_prefill(record)
            await self._fail(record, 500, f"decode worker refused the reservation: {msg.error}")
            return
        prefill = self.workers.get(record.prefill_worker or "")
        decode = self.workers.get(record.decode_worker or "")
        if prefill is None or decode is None:
            await self._fail(record, 503, "a worker assigned to the request is gone")
            return
        record.phase, record.prefill_holds = Phase.PREFILLING, True
        await self._send(prefill.identity, PrefillTask(record.request, decode.worker_id, decode.kv_addr,
                                                       record.admitted_time, msg.block_ids, decode.kv_share))

    async def _on_prefill_done(self, identity: bytes, msg: PrefillDone) -> None:
        record = self.requests.get(msg.request_id)
        if record is None or not record.prefill_holds:
            return
        record.prefill_holds = False
        self._release_prefill(record)
        self._charge_output(record, 1)
        if record.phase is Phase.PREFILLING:
            if msg.handed_off:
                record.phase = Phase.HANDOFF
                record.handoff_deadline = time.time() + self.config.handoff_timeout_s
            else:  # finished with its first token: release the decode reservation
                await self._end(record, "finished")
        self.requests.drop_if_released(record)

    async def _on_kv_received(self, identity: bytes, msg: KVReceived) -> None:
        record = self.requests.get(msg.request_id)
        if record is not None and record.phase in (Phase.HANDOFF, Phase.PREFILLING):
            record.phase, record.handoff_deadline = Phase.DECODING, None
            log.debug("req=%s KV received by %s in %.1f ms", msg.request_id, msg.worker_id, msg.transfer_s * 1e3)

    async def _on_token_report(self, identity: bytes, msg: TokenReport) -> None:
        for rid, count in msg.counts.items():
            record = self.requests.get(rid)
            if record is not None:
                self._charge_output(record, count)
                self._release_prefill(record)  # colocated: its prompt has left the worker's prefill backlog

    async def _on_request_done(self, identity: bytes, msg: RequestDone) -> None:
        record = self.requests.get(msg.request_id)
        if record is None:
            return
        if msg.worker_id == record.decode_worker and record.decode_holds:
            record.decode_holds = False
            self._release_decode(record)
            if record.prefill_worker == record.decode_worker:
                self._release_prefill(record)
        elif msg.worker_id == record.prefill_worker and record.prefill_holds:
            record.prefill_holds = False
            self._release_prefill(record)
        if record.phase is not Phase.ENDED:
            if msg.finish_reason == "error":
                await self._fail(record, 500, f"worker {msg.worker_id} failed the request")
            else:
                await self._end(record, msg.finish_reason)
        self.requests.drop_if_released(record)

    def _charge_output(self, record: RequestRecord, count: int) -> None:
        self.policy.on_output_tokens(record.request.client_id, count)
        self.ledger.on_output(record.request.client_id, count)

    # ------------------------------------------------------------------ endings

    async def _end(self, record: RequestRecord, reason: str) -> None:
        """Mark ended, drop from the queue, and tell every worker still holding the request to let it go."""
        if record.phase is Phase.QUEUED:
            self.policy.remove(record.request_id)
        record.phase = Phase.ENDED
        if record.prefill_holds:
            await self._send_worker(record.prefill_worker, CancelRequest(record.request_id, reason))
        if record.decode_holds:
            await self._send_worker(record.decode_worker, CancelRequest(record.request_id, reason))
        self.requests.drop_if_released(record)

    async def _fail(self, record: RequestRecord, code: int, message: str) -> None:
        log.warning("req=%s failed (%d): %s", record.request_id, code, message)
        await self._send(record.frontend, RequestFailed(record.request_id, code, message))
        await self._end(record, "error")

    async def _evict(self, worker: WorkerInfo, reason: str) -> None:
        log.warning("evicting worker %s: %s", worker.worker_id, reason)
        self.workers.remove(worker.worker_id)
        self.placer.forget(worker.worker_id)
        for record in self.requests.held_by(worker.worker_id):
            if record.prefill_worker == worker.worker_id:
                record.prefill_holds = False
            if record.decode_worker == worker.worker_id:
                record.decode_holds = False
            if record.phase is not Phase.ENDED:
                await self._fail(record, 503, f"worker {worker.worker_id} was lost ({reason})")
            self.requests.drop_if_released(record)

    def _release_prefill(self, record: RequestRecord) -> None:
        worker = self.workers.get(record.prefill_worker or "")
        if record.prefill_accounted:
            record.prefill_accounted = False
            if worker is not None:
                worker.backlog_tokens -= record.prompt_tokens
                worker.backlog_blocks -= record.prefill_blocks

    def _release_decode(self, record: RequestRecord) -> None:
        worker = self.workers.get(record.decode_worker or "")
        if record.decode_accounted:
            record.decode_accounted = False
            if worker is not None:
                worker.reserved_blocks -= record.decode_blocks
                self.placer.release_decode(worker.worker_id)

    async def _on_status_query(self, identity: bytes, msg: StatusQuery) -> None:
        workers = {
            w.worker_id: {"role": w.role, "pool": w.pool, "draining_to": w.draining_to,
                          "reserved_blocks": w.reserved_blocks, "total_blocks": w.total_blocks,
                          "free_blocks": w.load.free_blocks, "backlog_tokens": w.backlog_tokens,
                          "requests": len(self.requests.held_by(w.worker_id)), "prefill_tps": w.load.prefill_tps,
                          "shares_kv_pool": bool(w.kv_share), "kv_handoffs": w.load.handoffs}
            for w in self.workers.workers.values()
        }
        await self._send(identity, ClusterStatus(
            prefill_workers=len(self.workers.in_pool("prefill")), decode_workers=len(self.workers.in_pool("decode")),
            waiting=len(self.policy), in_flight=len(self.requests), admission=self.policy.snapshot(), workers=workers,
            colocated_workers=len(self.workers.in_pool("colocated")), pools=self.pools.snapshot(),
            clients=self.ledger.snapshot(),
        ))
