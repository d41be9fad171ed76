"""The coordinator process: transport around the cluster core (``diptych.cluster``).

One ROUTER socket (``proto/README.md``, "control") serves frontends and workers. Each handler decodes a message,
calls the core (admission, placement, accounting, pools, ledger) and sends what the core decided. Every handler runs
on the one event loop, so the core is never touched concurrently. Admission runs after every event that can free
capacity or add work. Time comes from an injected clock (seconds since the epoch; ``time.time`` by default); the
watchdog wakes every ``watchdog_interval_s`` of real time, and sooner when a refused reservation is due again, and
reads the clock. Admitted requests are placed on their workers, through the decode worker's KV reservation round
trip (retried while the worker's engine refuses it: KV on demand), by ``reservations.Reservations``.

Identity (with a CURVE key set; ``docs/security.md``): every message carries the name of the key that sent it
(``recv_authenticated``), and ``access.authorize`` decides before any handler runs: a worker registers only under
its own key name and speaks only for itself and for the requests it holds; only frontend keys submit, read the status
and cancel (their own submissions). Refusals are logged here and tell the sender nothing about the deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import zmq
import zmq.asyncio

from diptych.cluster.core import ClusterCore
from diptych.cluster.overload import Shed
from diptych.cluster.placement import Placer
from diptych.cluster.pools import PoolManager
from diptych.cluster.requests import RequestRecord
from diptych.cluster.workers import WorkerRegistry
from diptych.policies.admission import ADMISSION_POLICIES, PendingRequest
from diptych.policies.pool import POOL_POLICIES, PoolStats
from diptych.proto import ProtocolError
from diptych.proto.messages import (
    CancelRequest,
    ClusterStatus,
    Heartbeat,
    KVReceived,
    KVReserved,
    PrefillDone,
    RegisterAck,
    RegisterWorker,
    RequestDone,
    RequestFailed,
    RequestLost,
    StatusQuery,
    SubmitRequest,
    TokenReport,
)
from diptych.proto.roles import Pool, RequestPhase, WorkerRole
from diptych.services.common.security import KeySet, ZapAuthenticator
from diptych.services.common.sockets import bind_address, make_socket, recv_authenticated, send_message
from diptych.services.coordinator.access import REFUSED, authorize
from diptych.services.coordinator.config import CoordinatorConfig
from diptych.services.coordinator.endpoints import Endpoint, Submission
from diptych.services.coordinator.reservations import Reservations, frontend_of
from diptych.services.coordinator.status import worker_status

log = logging.getLogger("diptych.coordinator")

UNKNOWN_WORKER = "unknown worker"
KV_INGRESS_ROLES = (WorkerRole.DECODE, WorkerRole.FLEX)


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since the epoch."""


class Coordinator:
    def __init__(self, config: CoordinatorConfig, clock: Clock = time.time, keys: KeySet | None = None) -> None:
        """``keys``: the cluster's CURVE key set (``config.key_name`` must be in it); None: plaintext and no identity
        checks (``--insecure-no-curve``)."""
        self.config = config
        self.clock = clock
        self.policy = ADMISSION_POLICIES.create(config.admission_policy, **config.admission_knobs)
        self.workers = WorkerRegistry(config.heartbeat_timeout_s)
        self.placer = Placer(self.workers, config.max_prefill_backlog_tokens, config.max_decode_sequences,
                             expected_output_tokens=config.expected_output_tokens)
        self.pools = PoolManager(self.workers, POOL_POLICIES.create(config.pool_policy, **config.pool_knobs),
                                 config.pool_interval_s)
        self.core = ClusterCore(self.policy, self.workers, self.placer, self.pools, limits=config.queue_limits())
        self.requests = self.core.requests
        self.instance = uuid.uuid4().hex[:12]
        """This coordinator process's id in ``ClusterStatus``: a frontend that sees it change knows that the requests
        it had submitted are gone, and resubmits them (``services.frontend.migration``)."""
        self.endpoints: dict[str, Endpoint] = {}
        self.reservations = Reservations(self)
        self.ctx = zmq.asyncio.Context()
        self.keys = keys
        self.authenticator = ZapAuthenticator(self.ctx, keys) if keys is not None else None
        if self.authenticator is not None:
            self.authenticator.bind()  # before the CURVE socket binds; it serves once run() starts
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind=bind_address(config.address),
                                security=keys.server(config.key_name) if keys is not None else None)
        self.handlers: dict[type, Callable[[bytes, Any, str | None], Awaitable[None]]] = {
            SubmitRequest: self._on_submit, CancelRequest: self._on_cancel, RegisterWorker: self._on_register,
            Heartbeat: self._on_heartbeat, KVReserved: self.reservations.on_kv_reserved,
            PrefillDone: self._on_prefill_done, KVReceived: self._on_kv_received, TokenReport: self._on_token_report,
            RequestDone: self._on_request_done, StatusQuery: self._on_status_query,
        }

    # ------------------------------------------------------------------ main loops

    async def run(self, stop: asyncio.Event) -> None:
        log.info("listening on %s (admission=%s, pools=%s, %s)", self.config.address, self.policy.name,
                 self.pools.policy.name, f"CURVE key {self.config.key_name!r}" if self.keys else "no CURVE")
        tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watchdog_loop())]
        if self.authenticator is not None:
            tasks.append(asyncio.create_task(self.authenticator.serve(), name="zap"))
        await stop.wait()
        log.info("stopping: %d requests in flight, %d waiting", len(self.requests), len(self.policy))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sock.close()
        if self.authenticator is not None:
            await self.authenticator.stop()
        self.ctx.term()

    async def _receive_loop(self) -> None:
        while True:
            identity, user_id, msg = await recv_authenticated(self.sock, routed=True)
            if isinstance(msg, ProtocolError):
                log.warning("dropped a malformed message from %r (key %s): %s", identity, user_id, msg)
                continue
            assert identity is not None  # a ROUTER socket names every sender
            await self.handle(identity, msg, user_id)

    async def handle(self, identity: bytes, msg: Any, user_id: str | None = None) -> None:
        """Handle one decoded message from ``identity``, sent with the key named ``user_id`` (None without CURVE),
        then run admission. With a key set, a message ``access.authorize`` refuses is logged and dropped (a refused
        registration gets a bare ``RegisterAck``)."""
        handler = self.handlers.get(type(msg))
        if handler is None:
            log.warning("dropped a %s from %r: not a coordinator message", type(msg).__name__, identity)
            return
        if self.keys is not None:
            reason = authorize(msg, user_id, self.requests.get)
            if reason is not None:
                log.warning("refused %s from %r (key %s): %s", type(msg).__name__, identity, user_id, reason)
                if isinstance(msg, RegisterWorker):
                    await self._send(identity, RegisterAck(ok=False, error=REFUSED))
                return
        try:
            await handler(identity, msg, user_id)
            await self._admit()
        except Exception:  # one bad message must not take the coordinator down
            log.exception("error handling %s from %r", type(msg).__name__, identity)

    async def _watchdog_loop(self) -> None:
        """``watchdog`` every ``watchdog_interval_s``; in between, refused reservations as soon as they are due."""
        interval = self.config.watchdog_interval_s
        next_tick = self.clock() + interval
        while True:
            retry_at = self.requests.next_reservation_retry()
            wake_at = next_tick if retry_at is None else min(next_tick, retry_at)
            delay = wake_at - self.clock()
            if delay > 0:
                self.reservations.retry_scheduled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.reservations.retry_scheduled.wait(), delay)
                continue
            now = self.clock()
            if now >= next_tick:
                next_tick = now + interval
                await self.watchdog()
            else:
                await self.reservations.retry_due(now)
                await self._admit()

    async def watchdog(self) -> None:
        """Evict silent workers, fail overdue handoffs and requests, send refused reservations that are due again,
        complete drains and tick the pool policy, then admit."""
        now = self.clock()
        for worker in self.workers.silent(now):
            await self._evict(worker.worker_id, f"no heartbeat for {now - worker.last_heartbeat:.1f} s")
        for record in self.requests.overdue_handoffs(now):
            await self.fail(record, 503, "KV handoff timed out")
        for record in self.requests.overdue(now):
            await self.fail(record, 503, self._overdue_reason(record), retry_after_s=self.config.retry_after_s)
        await self.reservations.retry_due(now)
        for worker in self.pools.drained():
            self.pools.complete_drain(worker.worker_id, now)
        if self.pools.due(now):
            self.pools.decide(self._pool_stats(now), now)
        await self._admit()

    def _overdue_reason(self, record: RequestRecord) -> str:
        if record.refused_reservations:
            return (f"decode worker {record.decode_worker} had no free KV blocks for the request's prompt within "
                    f"{self.config.reserve_limit_s:g} s ({record.refused_reservations} reservations refused)")
        return f"no worker took the request within {self.config.queue_timeout_s:g} s"

    def _pool_stats(self, now: float) -> PoolStats | None:
        """``PoolStats`` from the workers' heartbeats: measured prefill throughput (unmeasured workers are assumed
        as fast as the measured ones; None until one is measured) and running decodes; no decode capacity."""
        measured = [self.endpoints[w.worker_id].load.prefill_tps for w in self.workers.in_pool(Pool.PREFILL)
                    if self.endpoints[w.worker_id].load.prefill_tps > 0]
        running = sum(self.endpoints[w.worker_id].load.num_running for w in self.workers.in_pool(Pool.DECODE))
        return self.pools.stats(now, self.core.queued_prompt_tokens, self.core.waiting_for_kv,
                                sum(measured) / len(measured) if measured else None, running)

    # ------------------------------------------------------------------ sending

    async def _send(self, identity: bytes, msg: Any) -> bool:
        try:
            await send_message(self.sock, msg, to=identity)
            return True
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer is gone
            log.warning("could not send %s to %r: %s", type(msg).__name__, identity, exc)
            return False

    async def send_worker(self, worker_id: str | None, msg: Any) -> None:
        """Send ``msg`` to the worker registered as ``worker_id``; nothing if none is (gone, or no id)."""
        endpoint = self.endpoints.get(worker_id) if worker_id else None
        if endpoint is not None:
            await self._send(endpoint.identity, msg)

    # ------------------------------------------------------------------ frontend messages

    async def _on_submit(self, identity: bytes, msg: SubmitRequest, user_id: str | None) -> None:
        request = msg.request
        rid = request.request_id
        if rid in self.requests:
            await self._send(identity, RequestFailed(request_id=rid, code=400, message=f"duplicate request id {rid}"))
            return
        prompt, max_tokens = len(request.prompt_token_ids), request.sampling.max_tokens
        context = min((e.max_model_len for e in self.endpoints.values()), default=None)
        if context is not None and prompt + max_tokens > context:
            reason = f"prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context of {context} tokens"
            log.info("req=%s refused: %s", rid, reason)
            await self._send(identity, RequestFailed(request_id=rid, code=400, message=reason))
            return
        if self.core.never_fits(prompt, max_tokens):  # an empty pool may still get a worker: such requests wait
            reason = f"prompt ({prompt} tokens) larger than any worker's KV pool"
            log.info("req=%s refused: %s", rid, reason)
            await self._send(identity, RequestFailed(request_id=rid, code=400, message=reason))
            return
        pending = PendingRequest(rid, request.client_id, prompt, max_tokens, request.arrival_time,
                                 weight=request.weight, tier=request.slo.tier)
        record = RequestRecord(rid, request.client_id, prompt, max_tokens,
                               payload=Submission(request, identity, user_id))
        now = self.clock()
        if self.config.queue_timeout_s is not None:
            record.deadline = now + self.config.queue_timeout_s
        rejection = self.core.submit(record, pending, now)
        if rejection is not None:
            code = rejection.code if isinstance(rejection, Shed) else 429
            log.info("req=%s client=%s rejected (%d): %s", rid, request.client_id, code, rejection.reason)
            await self._send(identity, RequestFailed(request_id=rid, code=code, message=rejection.reason,
                                                     retry_after_s=rejection.retry_after_s))
            return
        self.pools.on_arrival(prompt, now)
        log.info("req=%s client=%s queued (%d prompt tokens, max %d)", rid, request.client_id, prompt, max_tokens)

    async def _on_cancel(self, identity: bytes, msg: CancelRequest, user_id: str | None) -> None:
        record = self.requests.get(msg.request_id)
        if record is None or record.phase is RequestPhase.ENDED:
            return
        log.info("req=%s cancelled (%s) in phase %s", msg.request_id, msg.reason, record.phase.value)
        await self._end(record, msg.reason)

    # ------------------------------------------------------------------ admission

    async def _admit(self) -> None:
        for dispatch in self.core.admit(self.clock()):
            await self.reservations.dispatch(dispatch)

    # ------------------------------------------------------------------ worker messages

    async def _on_register(self, identity: bytes, msg: RegisterWorker, user_id: str | None) -> None:
        """Registration is idempotent for the worker itself: an id registered again from the same routing identity
        (a lost ack, a restarted worker: ``access.authorize`` has checked its key) replaces the old entry, whose
        requests fail as lost. Refusals are logged in full; the worker only learns that it was refused."""
        error = None
        if msg.role in KV_INGRESS_ROLES and not msg.kv_addr:
            error = f"a {msg.role} worker must give its KV ingress address"
        old = self.endpoints.get(msg.worker_id)
        if error is None and old is not None and (old.identity == identity or self.keys is not None):
            await self._evict(msg.worker_id, "it registered again")
        if error is None:
            error = self.workers.register(msg.worker_id, msg.role, msg.load.total_blocks, msg.layout.block_size,
                                          self.clock(), model=msg.model, layout=msg.layout)
        if error:
            log.warning("refused worker %s: %s", msg.worker_id, error)
            error = REFUSED if self.keys is not None else error
        else:
            self.endpoints[msg.worker_id] = Endpoint(identity, msg.kv_addr, msg.load, msg.max_model_len, msg.kv_share)
            log.info("worker %s joined as %s (%d KV blocks of %d tokens)", msg.worker_id, msg.role,
                     msg.load.total_blocks, msg.layout.block_size)
        await self._send(identity, RegisterAck(ok=not error, error=error or ""))

    async def _on_heartbeat(self, identity: bytes, msg: Heartbeat, user_id: str | None) -> None:
        if not self.workers.heartbeat(msg.worker_id, self.clock(), msg.load.total_blocks):
            await self._send(identity, RegisterAck(ok=False, error=UNKNOWN_WORKER))
            return
        self.endpoints[msg.worker_id].load = msg.load

    async def _on_prefill_done(self, identity: bytes, msg: PrefillDone, user_id: str | None) -> None:
        record = self.requests.get(msg.request_id)
        if record is None or not record.prefill_holds:
            return
        record.prefill_holds = False
        self.core.release_prefill(record)
        self.core.charge_output(record.client_id, 1)
        if record.phase is RequestPhase.PREFILLING:
            if msg.handed_off:
                record.phase = RequestPhase.HANDOFF
                record.handoff_deadline = self.clock() + self.config.handoff_timeout_s
            else:  # finished with its first token: release the decode reservation
                await self._end(record, "finished")
        self.requests.drop_if_released(record)

    async def _on_kv_received(self, identity: bytes, msg: KVReceived, user_id: str | None) -> None:
        record = self.requests.get(msg.request_id)
        if record is not None and record.phase in (RequestPhase.HANDOFF, RequestPhase.PREFILLING):
            record.phase, record.handoff_deadline = RequestPhase.DECODING, None
            log.debug("req=%s KV received by %s in %.1f ms", msg.request_id, msg.worker_id, msg.transfer_s * 1e3)

    async def _on_token_report(self, identity: bytes, msg: TokenReport, user_id: str | None) -> None:
        for rid, count in msg.counts.items():
            record = self.requests.get(rid)
            if record is not None and user_id is not None and user_id not in (record.prefill_worker,
                                                                              record.decode_worker):
                log.warning("dropped %s's token count for req=%s: the request is not on it", user_id, rid)
            elif record is not None:
                self.core.charge_output(record.client_id, count)
                self.core.release_prefill(record)  # colocated: its prompt has left the worker's prefill backlog

    async def _on_request_done(self, identity: bytes, msg: RequestDone, user_id: str | None) -> None:
        record = self.requests.get(msg.request_id)
        if record is None:
            return
        if msg.worker_id == record.decode_worker and record.decode_holds:
            record.decode_holds = False
            self.core.release_decode(record)
            if record.prefill_worker == record.decode_worker:
                self.core.release_prefill(record)
        elif msg.worker_id == record.prefill_worker and record.prefill_holds:
            record.prefill_holds = False
            self.core.release_prefill(record)
        if record.phase is not RequestPhase.ENDED:
            if msg.finish_reason == "error":
                await self.fail(record, 500, f"worker {msg.worker_id} failed the request")
            else:
                await self._end(record, msg.finish_reason)
        self.requests.drop_if_released(record)

    # ------------------------------------------------------------------ endings

    async def _end(self, record: RequestRecord, reason: str) -> None:
        """Mark ended, drop from the queue, release what no worker holds, and tell every worker still holding the
        request to let it go (their answers release the rest)."""
        self.core.release_unheld(record)
        for worker_id in self.core.end(record):
            await self.send_worker(worker_id, CancelRequest(request_id=record.request_id, reason=reason))

    async def fail(self, record: RequestRecord, code: int, message: str, retry_after_s: float | None = None) -> None:
        """Tell ``record``'s frontend that it failed (HTTP-like ``code``), then end it."""
        log.warning("req=%s failed (%d): %s", record.request_id, code, message)
        await self._send(frontend_of(record), RequestFailed(request_id=record.request_id, code=code, message=message,
                                                            retry_after_s=retry_after_s))
        await self._end(record, "error")

    async def _evict(self, worker_id: str, reason: str) -> None:
        log.warning("evicting worker %s: %s", worker_id, reason)
        self.endpoints.pop(worker_id, None)
        _, affected = self.core.evict(worker_id)
        for record in affected:
            if record.phase is not RequestPhase.ENDED:  # its frontend resubmits it (docs/reliability.md)
                log.warning("req=%s lost with worker %s in phase %s", record.request_id, worker_id,
                            record.phase.value)
                await self._send(frontend_of(record), RequestLost(request_id=record.request_id,
                                                                  reason=f"worker {worker_id} was lost ({reason})"))
                await self._end(record, "lost")
            self.requests.drop_if_released(record)

    async def _on_status_query(self, identity: bytes, msg: StatusQuery, user_id: str | None) -> None:
        held = self.requests.held_count()
        workers = {w.worker_id: worker_status(w, self.endpoints[w.worker_id], held.get(w.worker_id, 0))
                   for w in self.workers.workers.values()}
        await self._send(identity, ClusterStatus(
            prefill_workers=len(self.workers.in_pool(Pool.PREFILL)),
            decode_workers=len(self.workers.in_pool(Pool.DECODE)), waiting=len(self.policy),
            in_flight=len(self.requests), admission=self.policy.snapshot(), workers=workers,
            colocated_workers=len(self.workers.in_pool(Pool.COLOCATED)), pools=self.pools.snapshot(),
            clients=self.core.ledger.snapshot(), instance=self.instance,
        ))
