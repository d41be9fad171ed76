"""The prefill role: runs prompts in chunks under the batch policy's token budget, emits each request's first
token to its frontend, hands the request's KV to the decode worker that reserved room for it (GPU to GPU while
prefill runs, or as frames at its end: ``kv_sender``), then frees its own blocks.

Invariants: a request's blocks are freed on this worker exactly once: after its KV is handed off (exported, or
pushed and landed), on abort, or when it finishes with its first token. A request aborted after its KV push may
have started is announced to its decode worker with ``KVPushAborted`` (sent after the issued copies landed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from diptych.proto.messages import KVHandoff, KVPushAborted, PrefillDone, PrefillTask, Request, RequestDone, TokenOutput
from diptych.services.common.worker import Worker
from diptych.services.prefill_worker.kv_sender import KVSender

log = logging.getLogger("diptych.prefill")


@dataclass
class PrefillJob:
    """Times in seconds since the epoch; ``prefill_start`` is set when the first chunk runs."""

    request: Request
    decode_kv_addr: str
    admitted_time: float
    prefill_start: float = 0.0

    def events(self, prefill_end: float) -> dict[str, float]:
        return {"admitted": self.admitted_time, "prefill_start": self.prefill_start, "prefill_end": prefill_end}


class PrefillWorker(Worker):
    role = "prefill"

    def __init__(self, args: Any, engine: Any) -> None:
        super().__init__(args, engine)
        self._jobs: dict[str, PrefillJob] = {}
        self._sender = KVSender(engine)

    async def handle_control(self, msg: Any) -> None:
        if not isinstance(msg, PrefillTask):
            await super().handle_control(msg)
            return
        request = msg.request
        full = msg.decode_worker_id == self.worker_id  # colocated: this worker decodes the request too
        if full and not self.can_decode:
            log.error("req=%s sent to decode on %s, a prefill-only worker", request.request_id, self.worker_id)
            await self.send_control(RequestDone(request.request_id, self.worker_id, "error"))
            return
        try:
            await self.engine_call(self.engine.add_request, request.request_id, request.prompt_token_ids,
                                   request.sampling, arrival_time=request.arrival_time, slo=request.slo,
                                   prefill_only=not full)
        except (ValueError, KeyError) as exc:
            log.warning("req=%s refused: %s", request.request_id, exc)
            if msg.decode_kv_addr:
                await self.push(msg.decode_kv_addr, KVPushAborted(request.request_id, self.worker_id))
            await self.send_control(RequestDone(request.request_id, self.worker_id, "error"))
            return
        self._jobs[request.request_id] = PrefillJob(request, msg.decode_kv_addr, msg.admitted_time or time.time())
        path = ""
        if not full:
            path = await self.engine_call(self._sender.begin, request.request_id, msg.decode_worker_id,
                                          msg.decode_kv_share, msg.decode_blocks)
        log.debug("req=%s prefill queued (%d tokens) %s", request.request_id, len(request.prompt_token_ids), path)

    can_decode = False
    """Workers that also have the decode role (``FlexWorker``) take colocated requests: ``adopt`` hands them to
    the decode role at their first token."""

    def output_needs_engine(self, output: Any) -> bool:
        # hands off and releases prefilled requests' KV; advances GPU-to-GPU pushes
        return bool(output.prefilled) or self._sender.has_pushes() or super().output_needs_engine(output)

    def load(self) -> Any:
        load = super().load()
        load.handoffs = self._sender.snapshot()
        return load

    async def after_step(self, output: Any) -> None:
        if self._sender.has_pushes():
            self._sender.advance()
        for rid in output.admitted:
            if rid in self._jobs:
                self._jobs[rid].prefill_start = output.start_time
        streams: dict[str, list[TokenOutput]] = {}
        first_tokens = {}
        for tok in output.tokens:  # a first token: its request's prefill ended with this iteration
            job = self._jobs.get(tok.request_id)
            if job is None or tok.index != 0:
                continue
            first_tokens[tok.request_id] = tok
            if not job.decode_kv_addr:  # colocated: the decode role streams this and every later token
                self.adopt(job.request, job.events(tok.time))
                continue
            streams.setdefault(job.request.stream_addr, []).append(TokenOutput(
                tok.request_id, tok.index, [tok.token_id], tok.finish_reason, [tok.time], job.events(tok.time)))
        await self.stream_tokens(streams)
        for rid in output.prefilled:
            job = self._jobs.pop(rid, None)
            if job is not None:
                await self._hand_off(job, first_tokens[rid].token_id, first_tokens[rid].time)
                await self.send_control(PrefillDone(rid, self.worker_id, True, job.prefill_start,
                                                    first_tokens[rid].time))
        for rid in output.finished:
            job = self._jobs.get(rid)
            if job is not None and job.decode_kv_addr:  # finished with its first token: nothing to hand off
                self._sender.abandon(rid)
                await self.push(job.decode_kv_addr, KVPushAborted(rid, self.worker_id))
                await self.send_control(PrefillDone(rid, self.worker_id, False, job.prefill_start,
                                                    first_tokens[rid].time))
        for rid in first_tokens:
            self._jobs.pop(rid, None)
        await super().after_step(output)

    async def _hand_off(self, job: PrefillJob, first_token: int, first_token_time: float) -> None:
        rid = job.request.request_id
        sent_time = time.time()
        num_tokens = len(job.request.prompt_token_ids)
        path, frames = self._sender.finish(rid, num_tokens)
        msg = KVHandoff(job.request, first_token, first_token_time, num_tokens, self.engine.layout, frames, sent_time,
                        path)
        await self.push(job.decode_kv_addr, msg)
        log.debug("req=%s KV handed to %s by %s (%d frames)", rid, job.decode_kv_addr, path, len(frames))

    async def abort(self, request_id: str) -> bool:
        job = self._jobs.get(request_id)
        if job is not None and job.decode_kv_addr:
            await self.engine_call(self._sender.abandon, request_id)
        held = await super().abort(request_id)
        if held and job is not None and job.decode_kv_addr:  # not handed off: the decode worker may free its blocks
            await self.push(job.decode_kv_addr, KVPushAborted(request_id, self.worker_id))
        return held

    def forget(self, request_id: str) -> None:
        self._jobs.pop(request_id, None)
        super().forget(request_id)
