"""The prefill role: runs prompts in chunks under the batch policy's token budget, emits each request's first
token to its frontend, hands the request's KV to the decode worker that reserved room for it (GPU to GPU while
prefill runs, or as frames at its end: ``kv_sender``), then frees its own blocks.

Invariants: a request's blocks are freed on this worker exactly once: after its KV is handed off (exported, or
pushed and landed), on abort, or when it finishes with its first token. A request aborted after its KV push may
have started is announced to its decode worker with ``KVPushAborted`` (sent after the issued copies landed).
Colocated tasks are not this role's (``roles.colocated``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from diptych.engine.outputs import SampledToken, StepOutput
from diptych.proto.messages import (
    KVHandoff,
    KVPushAborted,
    PrefillDone,
    PrefillTask,
    Request,
    RequestDone,
    TokenOutput,
    WorkerLoad,
)
from diptych.proto.roles import Pool
from diptych.services.worker.links import WorkerLinks
from diptych.services.worker.roles.kv_sender import KVSender

log = logging.getLogger("diptych.prefill")


@dataclass
class PrefillJob:
    """A request this worker prefills. Times in seconds since the epoch; ``prefill_start`` is set when its first
    chunk runs. ``decode_kv_addr`` is empty for a colocated request (no handoff)."""

    request: Request
    decode_kv_addr: str
    admitted_time: float
    prefill_start: float = 0.0
    decode_worker_id: str = ""
    """The decode worker at ``decode_kv_addr`` (the server key its KV ingress holds)."""

    def events(self, prefill_end: float) -> dict[str, float]:
        return {"admitted": self.admitted_time, "prefill_start": self.prefill_start, "prefill_end": prefill_end}


def is_colocated(task: PrefillTask) -> bool:
    """Whether ``task`` runs its request from prompt to last token on this worker (``PrefillTask.colocated``)."""
    return task.colocated


def first_tokens(output: StepOutput, jobs: dict[str, PrefillJob]) -> dict[str, SampledToken]:
    """The first tokens of ``jobs``' requests in ``output`` (their prefill ended with this iteration), by request id;
    and the prefill start of the requests whose first chunk ran in it is recorded in their job."""
    for rid in output.admitted:
        if rid in jobs:
            jobs[rid].prefill_start = output.start_time
    return {tok.request_id: tok for tok in output.tokens if tok.index == 0 and tok.request_id in jobs}


class PrefillRole:
    kind = Pool.PREFILL

    def __init__(self, links: WorkerLinks) -> None:
        self.links = links
        self.engine = links.engine
        self._jobs: dict[str, PrefillJob] = {}
        self._sender = KVSender(links.engine)

    def kv_ingress(self) -> tuple[str, dict[str, Any]] | None:
        return None

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return []

    async def handle(self, msg: Any) -> bool:
        if not isinstance(msg, PrefillTask) or is_colocated(msg):
            return False
        request = msg.request
        rid = request.request_id
        try:
            await self.links.engine_call(self.engine.add_request, rid, request.prompt_token_ids, request.sampling,
                                         arrival_time=request.arrival_time, slo=request.slo, prefill_only=True)
        except (ValueError, KeyError) as exc:
            log.warning("req=%s refused: %s", rid, exc)
            if msg.decode_kv_addr:
                await self.links.push(msg.decode_kv_addr, KVPushAborted(request_id=rid,
                                                                        worker_id=self.links.worker_id),
                                      msg.decode_worker_id)
            await self.links.send_control(RequestDone(request_id=rid, worker_id=self.links.worker_id,
                                                      finish_reason="error"))
            return True
        self._jobs[rid] = PrefillJob(request=request, decode_kv_addr=msg.decode_kv_addr,
                                    admitted_time=msg.admitted_time or time.time(),
                                    decode_worker_id=msg.decode_worker_id)
        path = await self.links.engine_call(self._sender.begin, rid, msg.decode_worker_id, msg.decode_kv_share,
                                            msg.decode_blocks)
        log.debug("req=%s prefill queued (%d tokens) %s", rid, len(request.prompt_token_ids), path)
        return True

    def output_needs_engine(self, output: StepOutput) -> bool:
        # hands off and releases prefilled requests' KV; advances GPU-to-GPU pushes
        return bool(output.prefilled) or self._sender.has_pushes()

    def report(self, load: WorkerLoad) -> None:
        load.handoffs = self._sender.snapshot()

    async def after_step(self, output: StepOutput) -> None:
        if self._sender.has_pushes():
            self._sender.advance()
        firsts = first_tokens(output, self._jobs)
        streams: dict[tuple[str, str], list[TokenOutput]] = {}
        for rid, tok in firsts.items():
            job = self._jobs[rid]
            streams.setdefault((job.request.stream_addr, job.request.stream_key), []).append(TokenOutput(
                request_id=rid, index=tok.index, token_ids=[tok.token_id], finish_reason=tok.finish_reason,
                timestamps=[tok.time], events=job.events(tok.time)))
        await self.links.stream_tokens(streams)
        for rid in output.prefilled:
            prefilled = self._jobs.pop(rid, None)
            if prefilled is not None:
                await self._hand_off(prefilled, firsts[rid])
                await self.links.send_control(PrefillDone(
                    request_id=rid, worker_id=self.links.worker_id, handed_off=True,
                    prefill_start=prefilled.prefill_start, prefill_end=firsts[rid].time))
        for rid in output.finished:
            finished = self._jobs.get(rid)
            if finished is not None:  # finished with its first token: nothing to hand off
                self._sender.abandon(rid)
                await self.links.push(finished.decode_kv_addr, KVPushAborted(request_id=rid,
                                                                             worker_id=self.links.worker_id),
                                      finished.decode_worker_id)
                await self.links.send_control(PrefillDone(
                    request_id=rid, worker_id=self.links.worker_id, handed_off=False,
                    prefill_start=finished.prefill_start, prefill_end=firsts[rid].time))
        for rid in firsts:
            self._jobs.pop(rid, None)

    async def _hand_off(self, job: PrefillJob, first: SampledToken) -> None:
        rid = job.request.request_id
        sent_time = time.time()
        num_tokens = len(job.request.prompt_token_ids)
        path, frames = self._sender.finish(rid, num_tokens)
        msg = KVHandoff(request=job.request, first_token_id=first.token_id, first_token_time=first.time,
                        num_tokens=num_tokens, layout=self.engine.layout, blocks=frames, sent_time=sent_time,
                        path=path)
        await self.links.push(job.decode_kv_addr, msg, job.decode_worker_id)
        log.debug("req=%s KV handed to %s by %s (%d frames)", rid, job.decode_kv_addr, path, len(frames))

    async def prepare_abort(self, request_id: str) -> bool:
        if request_id in self._jobs:
            await self.links.engine_call(self._sender.abandon, request_id)
        return False

    async def aborted(self, request_id: str, held: bool) -> None:
        if not held:
            return
        job = self._jobs.pop(request_id, None)
        if job is not None:  # not handed off: the decode worker may free its blocks
            await self.links.push(job.decode_kv_addr, KVPushAborted(request_id=request_id,
                                                                    worker_id=self.links.worker_id),
                                  job.decode_worker_id)
