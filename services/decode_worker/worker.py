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
from dataclasses import dataclass, field
from typing import Any

import zmq

from diptych.proto import ProtocolError
from diptych.proto.messages import (
    HANDOFF_CUDA_IPC, KVHandoff, KVPushAborted, KVReceived, KVReserved, Request, RequestDone, ReserveKV, TokenOutput,
    TokenReport,
)
from diptych.services.common.sockets import bind_address, make_socket, recv_message
from diptych.services.common.worker import Worker
from diptych.services.decode_worker.held_blocks import HeldBlocks

log = logging.getLogger("diptych.decode")


@dataclass
class DecodeJob:
    """A request this worker decodes. ``pending_events`` (phase times, seconds since the epoch) ride on its next
    streamed output."""

    stream_addr: str
    pending_events: dict[str, float] = field(default_factory=dict)


class DecodeWorker(Worker):
    role = "decode"
    can_decode = True

    def __init__(self, args: Any, engine: Any) -> None:
        super().__init__(args, engine)
        self._kv_addr: str = args.kv_addr
        self.kv_in = make_socket(self.ctx, zmq.PULL, bind=bind_address(args.kv_addr))
        self._decoding: dict[str, DecodeJob] = {}
        self._share = _share_pool(engine)
        self._held = HeldBlocks()

    def kv_addr(self) -> str:
        return self._kv_addr

    def kv_share(self) -> dict:
        return self._share

    def extra_tasks(self) -> list[asyncio.Task]:
        tasks = [*super().extra_tasks(), asyncio.create_task(self._kv_loop())]
        if self._share:
            tasks.append(asyncio.create_task(self._free_expired_loop()))
        return tasks

    async def handle_control(self, msg: Any) -> None:
        if not isinstance(msg, ReserveKV):
            await super().handle_control(msg)
            return
        ok = self.engine.reserve(msg.request_id, msg.num_blocks)  # safe during an iteration (Engine.reserve)
        if not ok:
            log.warning("req=%s reservation of %d blocks refused (%d free)", msg.request_id, msg.num_blocks,
                        self.engine.kv.allocator.num_free)
        block_ids = self.engine.reserved_blocks(msg.request_id) if ok and self._share else []
        await self.send_control(KVReserved(msg.request_id, self.worker_id, ok, "" if ok else "not enough free blocks",
                                           block_ids))

    async def abort(self, request_id: str) -> bool:
        if self._share:  # a prefill worker may be writing into the reservation: keep its blocks until it stops
            blocks = await self.engine_call(self.engine.take_reservation, request_id)
            if blocks is not None:
                await self._free(self._held.hold(request_id, blocks, time.monotonic()))
                self.forget(request_id)
                return True
        return await super().abort(request_id)

    async def _push_stopped(self, request_id: str) -> None:
        await self._free(self._held.push_stopped(request_id, time.monotonic()))

    async def _free(self, blocks: list[int]) -> None:
        if blocks:
            await self.engine_call(self.engine.free_blocks, blocks)

    async def _free_expired_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            blocks = self._held.expired(time.monotonic())
            if blocks:
                log.warning("freed %d KV blocks of aborted requests whose prefill worker never said it stopped "
                            "pushing", len(blocks))
                await self._free(blocks)

    def adopt(self, request: Request, events: dict[str, float]) -> None:
        """Take over a colocated request at its first token: stream it (with its prefill ``events``) and report it
        from now on."""
        self._decoding[request.request_id] = DecodeJob(request.stream_addr, events)

    async def _kv_loop(self) -> None:
        try:
            while True:
                _, msg = await recv_message(self.kv_in)
                if isinstance(msg, ProtocolError):
                    log.warning("dropped a malformed KV message: %s", msg)
                elif isinstance(msg, KVHandoff):
                    await self._on_handoff(msg)
                elif isinstance(msg, KVPushAborted):
                    if self._share:
                        await self._push_stopped(msg.request_id)
                else:
                    log.warning("dropped unexpected %s on the KV socket", type(msg).__name__)
                self.wake()
        finally:
            self.kv_in.close()

    async def _on_handoff(self, msg: KVHandoff) -> None:
        request = msg.request
        rid = request.request_id
        if rid in self._held:  # aborted while its pusher was busy; the pusher is done now
            await self._push_stopped(rid)
            return
        if msg.layout != self.engine.layout:
            log.error("req=%s KV layout %s does not match ours %s", rid, msg.layout, self.engine.layout)
            if await self.engine_call(self.engine.abort, rid):
                await self.send_control(RequestDone(rid, self.worker_id, "error"))
            return
        started = time.time()
        try:
            frames = None if msg.path == HANDOFF_CUDA_IPC else msg.blocks  # GPU to GPU: already in our blocks
            await self.engine_call(self.engine.add_prefilled, rid, request.prompt_token_ids, msg.first_token_id,
                                   request.sampling, frames, msg.num_tokens, arrival_time=request.arrival_time,
                                   slo=request.slo, first_token_time=msg.first_token_time)
        except KeyError:
            log.info("req=%s KV dropped: no reservation (cancelled meanwhile)", rid)
            return
        except ValueError as exc:
            log.error("req=%s KV rejected: %s", rid, exc)
            await self.engine_call(self.engine.abort, rid)
            await self.send_control(RequestDone(rid, self.worker_id, "error"))
            return
        landed = time.time()
        self._decoding[rid] = DecodeJob(request.stream_addr,
                                        {"handoff_start": msg.sent_time or started, "handoff_end": landed})
        await self.send_control(KVReceived(rid, self.worker_id, msg.num_tokens, landed - started))

    async def after_step(self, output: Any) -> None:
        await super().after_step(output)  # a colocated request's first token is adopted there first
        streams: dict[str, list[TokenOutput]] = {}
        counts: dict[str, int] = {}
        finish_reasons: dict[str, str] = {}
        for tok in output.tokens:
            job = self._decoding.get(tok.request_id)
            if job is None:
                continue
            events, job.pending_events = job.pending_events, {}
            streams.setdefault(job.stream_addr, []).append(
                TokenOutput(tok.request_id, tok.index, [tok.token_id], tok.finish_reason, [tok.time], events))
            counts[tok.request_id] = counts.get(tok.request_id, 0) + 1
            if tok.finish_reason:
                finish_reasons[tok.request_id] = tok.finish_reason
        await self.stream_tokens(streams)
        if counts:
            await self.send_control(TokenReport(self.worker_id, counts))
        for rid in output.finished:
            if self._decoding.pop(rid, None) is not None:
                await self.send_control(RequestDone(rid, self.worker_id, finish_reasons.get(rid, "stop")))

    def forget(self, request_id: str) -> None:
        self._decoding.pop(request_id, None)
        super().forget(request_id)


def _share_pool(engine: Any) -> dict:
    """The engine's KV pool shared for GPU-to-GPU pushes (``engine.kv_transfer.share_pool``), or {} when it is not on
    a GPU (CPU engines, ``--engine sim``)."""
    pool = getattr(engine.kv, "pool", None)
    if pool is None or pool.device.type != "cuda":
        return {}
    from diptych.engine.kv_transfer import share_pool  # imports torch: only engines with KV tensors

    share = share_pool(engine.kv)
    log.info("KV pool shared for GPU-to-GPU pushes (GPU %s, %d blocks)", share["device_uuid"], engine.kv.num_blocks)
    return share
