"""The decode role: reserves KV blocks when the coordinator asks (no transfer without room), takes KV handoffs
into them, decodes with continuous batching, streams tokens to frontends and reports token counts to the
coordinator.

Invariants: KV that arrives for a request without a reservation here (cancelled meanwhile, or never reserved) is
dropped; every request this role owns ends in exactly one ``RequestDone`` (finished, aborted or failed), sent after
the final ``TokenReport`` for it, so the coordinator charges every token before it forgets the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from proto import ProtocolError
from proto.messages import (
    KVHandoff, KVReceived, KVReserved, Request, RequestDone, ReserveKV, TokenOutput, TokenReport,
)
from services.common.sockets import bind_address, make_socket, recv_message
from services.common.worker import Worker

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

    def kv_addr(self) -> str:
        return self._kv_addr

    def extra_tasks(self) -> list[asyncio.Task]:
        return [*super().extra_tasks(), asyncio.create_task(self._kv_loop())]

    async def handle_control(self, msg: Any) -> None:
        if not isinstance(msg, ReserveKV):
            await super().handle_control(msg)
            return
        ok = self.engine.reserve(msg.request_id, msg.num_blocks)  # safe during an iteration (Engine.reserve)
        if not ok:
            log.warning("req=%s reservation of %d blocks refused (%d free)", msg.request_id, msg.num_blocks,
                        self.engine.kv.allocator.num_free)
        await self.send_control(KVReserved(msg.request_id, self.worker_id, ok, "" if ok else "not enough free blocks"))

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
                elif not isinstance(msg, KVHandoff):
                    log.warning("dropped unexpected %s on the KV socket", type(msg).__name__)
                else:
                    await self._on_handoff(msg)
                self.wake()
        finally:
            self.kv_in.close()

    async def _on_handoff(self, msg: KVHandoff) -> None:
        request = msg.request
        rid = request.request_id
        if msg.layout != self.engine.layout:
            log.error("req=%s KV layout %s does not match ours %s", rid, msg.layout, self.engine.layout)
            if await self.engine_call(self.engine.abort, rid):
                await self.send_control(RequestDone(rid, self.worker_id, "error"))
            return
        started = time.time()
        try:
            await self.engine_call(self.engine.add_prefilled, rid, request.prompt_token_ids, msg.first_token_id,
                                   request.sampling, msg.blocks, msg.num_tokens, arrival_time=request.arrival_time,
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
