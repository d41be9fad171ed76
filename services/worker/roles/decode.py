"""The decode role: reserves KV blocks when the coordinator asks (no transfer without room), takes KV handoffs
into them, decodes with continuous batching, streams tokens to frontends and reports token counts to the
coordinator. A worker whose KV pool is on a GPU shares it at registration, so prefill workers on its host push KV
into its reservations GPU to GPU (``KVHandoff.path``); the rest send frames.

Invariants: KV that arrives for a request without a reservation here (cancelled meanwhile, or never reserved) is
dropped; every request this role owns ends in exactly one ``RequestDone`` (finished, aborted or failed), sent after
the final ``TokenReport`` for it, so the coordinator charges every token before it forgets the request. A shared
pool's aborted reservations go back to the pool only when no push can still write into them (``HeldBlocks``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from diptych.engine.outputs import StepOutput
from diptych.engine.protocol import WorkerEngine
from diptych.proto import ProtocolError
from diptych.proto.messages import (
    HANDOFF_CUDA_IPC,
    KVHandoff,
    KVPushAborted,
    KVReceived,
    KVReserved,
    Request,
    RequestDone,
    ReserveKV,
    TokenOutput,
    TokenReport,
    WorkerLoad,
)
from diptych.proto.roles import Pool
from diptych.services.common.sockets import recv_authenticated
from diptych.services.worker.links import WorkerLinks
from diptych.services.worker.roles.held_blocks import HeldBlocks

log = logging.getLogger("diptych.decode")

EXPIRY_CHECK_INTERVAL_S = 1.0
"""How often held blocks of aborted shared reservations are checked for their timeout (seconds)."""


@dataclass
class DecodeJob:
    """A request this worker decodes. ``pending_events`` (phase times, seconds since the epoch) ride on its next
    streamed output."""

    stream_addr: str
    stream_key: str
    pending_events: dict[str, float] = field(default_factory=dict)


class DecodeRole:
    kind = Pool.DECODE

    def __init__(self, links: WorkerLinks, kv_addr: str) -> None:
        """``kv_addr``: this worker's KV ingress address, as prefill workers reach it (bound here)."""
        self.links = links
        self.engine = links.engine
        self._kv_addr = kv_addr
        self.kv_in = links.bind_pull(kv_addr)
        self._decoding: dict[str, DecodeJob] = {}
        self._share = _share_pool(links.engine)
        self._held = HeldBlocks()
        self._pushers: dict[str, str] = {}
        """Request id -> the worker whose key may push its KV here (from ``ReserveKV``), while reserved."""

    def kv_ingress(self) -> tuple[str, dict[str, Any]] | None:
        return self._kv_addr, self._share

    def background(self) -> list[Coroutine[Any, Any, None]]:
        loops = [self._kv_loop()]
        if self._share:
            loops.append(self._free_expired_loop())
        return loops

    async def handle(self, msg: Any) -> bool:
        if not isinstance(msg, ReserveKV):
            return False
        ok = self.engine.reserve(msg.request_id, msg.num_blocks)  # safe during an iteration (Engine.reserve)
        if ok:
            self._pushers[msg.request_id] = msg.prefill_worker_id
        if not ok:  # the coordinator retries: the pool is full of growing sequences now
            log.info("req=%s reservation of %d blocks refused (%d free)", msg.request_id, msg.num_blocks,
                     self.engine.kv.allocator.num_free)
        block_ids = self.engine.reserved_blocks(msg.request_id) if ok and self._share else []
        await self.links.send_control(KVReserved(request_id=msg.request_id, worker_id=self.links.worker_id, ok=ok,
                                                 error="" if ok else "not enough free blocks", block_ids=block_ids))
        return True

    def adopt(self, request: Request, events: dict[str, float]) -> None:
        """Take over a request prefilled on this worker at its first token (``roles.colocated``): stream it (with
        its prefill ``events``) and report it from now on."""
        self._decoding[request.request_id] = DecodeJob(stream_addr=request.stream_addr, stream_key=request.stream_key,
                                                       pending_events=events)

    async def prepare_abort(self, request_id: str) -> bool:
        if not self._share:
            return False
        # a prefill worker may be writing into the reservation: keep its blocks until it stops
        blocks = await self.links.engine_call(self.engine.take_reservation, request_id)
        if blocks is None:
            return False
        await self._free(self._held.hold(request_id, blocks, time.monotonic()))
        return True

    async def aborted(self, request_id: str, held: bool) -> None:
        if held:
            self._decoding.pop(request_id, None)
            if request_id not in self._held:  # a shared pool's held blocks wait for their pusher to stop
                self._pushers.pop(request_id, None)

    def report(self, load: WorkerLoad) -> None:
        pass

    async def _push_stopped(self, request_id: str) -> None:
        self._pushers.pop(request_id, None)
        await self._free(self._held.push_stopped(request_id, time.monotonic()))

    async def _free(self, blocks: list[int]) -> None:
        if blocks:
            await self.links.engine_call(self.engine.free_blocks, blocks)

    async def _free_expired_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_INTERVAL_S)
            blocks = self._held.expired(time.monotonic())
            if blocks:
                log.warning("freed %d KV blocks of aborted requests whose prefill worker never said it stopped "
                            "pushing", len(blocks))
                await self._free(blocks)

    async def _kv_loop(self) -> None:
        try:
            while True:
                _, sender, msg = await recv_authenticated(self.kv_in)
                if isinstance(msg, ProtocolError):
                    log.warning("dropped a malformed KV message (key %s): %s", sender, msg)
                elif sender is not None and not self._may_push(sender, msg):
                    continue
                elif isinstance(msg, KVHandoff):
                    await self._on_handoff(msg)
                elif isinstance(msg, KVPushAborted):
                    self._pushers.pop(msg.request_id, None)
                    if self._share:
                        await self._push_stopped(msg.request_id)
                else:
                    log.warning("dropped unexpected %s on the KV socket", type(msg).__name__)
                self.links.wake()
        finally:
            self.kv_in.close()

    def _may_push(self, sender: str, msg: Any) -> bool:
        """With CURVE: KV messages about a request come only from the prefill worker the coordinator named in its
        ``ReserveKV``, while this role expects them (refusals logged; a late message about a request no longer
        expected is dropped quietly)."""
        request_id = msg.request.request_id if isinstance(msg, KVHandoff) else getattr(msg, "request_id", None)
        pusher = self._pushers.get(request_id) if isinstance(request_id, str) else None
        if pusher == sender:
            return True
        if pusher is None:
            log.debug("req=%s dropped %s from %s: no KV expected", request_id, type(msg).__name__, sender)
        else:
            log.warning("req=%s refused %s from key %s: its KV comes from %s", request_id, type(msg).__name__,
                        sender, pusher)
        return False

    async def _fail(self, request_id: str) -> None:
        await self.links.send_control(RequestDone(request_id=request_id, worker_id=self.links.worker_id,
                                                  finish_reason="error"))

    async def _on_handoff(self, msg: KVHandoff) -> None:
        request = msg.request
        rid = request.request_id
        if rid in self._held:  # aborted while its pusher was busy; the pusher is done now
            await self._push_stopped(rid)
            return
        if msg.layout != self.engine.layout:
            log.error("req=%s KV layout %s does not match ours %s", rid, msg.layout, self.engine.layout)
            if await self.links.engine_call(self.engine.abort, rid):
                await self._fail(rid)
            return
        started = time.time()
        self._pushers.pop(rid, None)
        try:
            frames = None if msg.path == HANDOFF_CUDA_IPC else msg.blocks  # GPU to GPU: already in our blocks
            await self.links.engine_call(self.engine.add_prefilled, rid, request.prompt_token_ids,
                                         msg.first_token_id, request.sampling, frames, msg.num_tokens,
                                         arrival_time=request.arrival_time, slo=request.slo,
                                         first_token_time=msg.first_token_time)
        except KeyError:
            log.info("req=%s KV dropped: no reservation (cancelled meanwhile)", rid)
            return
        except ValueError as exc:
            log.error("req=%s KV rejected: %s", rid, exc)
            await self.links.engine_call(self.engine.abort, rid)
            await self._fail(rid)
            return
        landed = time.time()
        self._decoding[rid] = DecodeJob(stream_addr=request.stream_addr, stream_key=request.stream_key, pending_events={
            "handoff_start": msg.sent_time or started, "handoff_end": landed})
        await self.links.send_control(KVReceived(request_id=rid, worker_id=self.links.worker_id,
                                                 num_tokens=msg.num_tokens, transfer_s=landed - started))

    def output_needs_engine(self, output: StepOutput) -> bool:
        return False

    async def after_step(self, output: StepOutput) -> None:
        for rid in output.preempted:  # its next token tells the frontend (timeline phase "preempted")
            job = self._decoding.get(rid)
            if job is not None:
                log.debug("req=%s preempted: its KV is recomputed", rid)
                events = job.pending_events
                events.setdefault("preempted", output.start_time)
                events["preemptions"] = events.get("preemptions", 0) + 1
        streams: dict[tuple[str, str], list[TokenOutput]] = {}
        counts: dict[str, int] = {}
        finish_reasons: dict[str, str] = {}
        for tok in output.tokens:
            job = self._decoding.get(tok.request_id)
            if job is None:
                continue
            events, job.pending_events = job.pending_events, {}
            streams.setdefault((job.stream_addr, job.stream_key), []).append(TokenOutput(
                request_id=tok.request_id, index=tok.index, token_ids=[tok.token_id], finish_reason=tok.finish_reason,
                timestamps=[tok.time], events=events))
            counts[tok.request_id] = counts.get(tok.request_id, 0) + 1
            if tok.finish_reason:
                finish_reasons[tok.request_id] = tok.finish_reason
        await self.links.stream_tokens(streams)
        if counts:
            await self.links.send_control(TokenReport(worker_id=self.links.worker_id, counts=counts))
        for rid in output.finished:
            if self._decoding.pop(rid, None) is not None:
                await self.links.send_control(RequestDone(request_id=rid, worker_id=self.links.worker_id,
                                                          finish_reason=finish_reasons.get(rid, "stop")))


def _share_pool(engine: WorkerEngine) -> dict[str, Any]:
    """The engine's KV pool shared for GPU-to-GPU pushes (``engine.kv_transfer.share_pool``), or {} when it is not on
    a GPU (CPU engines, ``--engine sim``)."""
    pool = getattr(engine.kv, "pool", None)
    if pool is None or pool.device.type != "cuda":
        return {}
    from diptych.engine.kv_transfer import share_pool  # imports torch: only engines with KV tensors

    share: dict[str, Any] = share_pool(engine.kv)  # type: ignore[arg-type]  # a pool with tensors: a KVCachePool
    log.info("KV pool shared for GPU-to-GPU pushes (GPU %s)", share["device_uuid"])
    return share
