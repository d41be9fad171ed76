"""In-flight requests: from submission to the last token, whichever API (HTTP or SDK) they came from.

Each request has a ``RequestState``: the consumer (an HTTP handler or an SDK pump) awaits ``next_event`` and gets
``Delta`` values (text never splitting a character or containing a stop string) until one carries a
``finish_reason``, or an ``APIError``. ``run_token_stream`` is the one loop that reads the token-stream PULL socket
and dispatches ``TokenOutput`` values to their requests.

Invariants:
- outputs are applied in ``TokenOutput.index`` order: the first token comes from the prefill worker and later ones
  from the decode worker, so an output ahead of its turn waits in the request's reorder buffer; duplicates and
  outputs for unknown (finished, cancelled) requests are dropped;
- a request leaves ``_requests`` exactly once (finished, failed or cancelled) and its finish line (TTFT, mean TBT,
  queueing, latency) is logged then;
- the final ``Delta`` of a request (the one with a ``finish_reason``) carries its closed ``Timeline`` as a dict
  (``services.frontend.timeline``): phase events and token times are merged into it as outputs are applied;
- a request whose worker was lost (``RequestLost``) is resubmitted as prompt + the tokens applied so far under a
  new cluster id (``services.frontend.migration``); outputs are routed by cluster id, so the lost attempt's late
  outputs are dropped and the new attempt's continue the stream at ``index_base``;
- whenever the frontend gives up on a request that the cluster may still hold (client disconnect or cancel, stop
  string, timeout, shutdown), a ``CancelRequest`` is sent to the coordinator; a request the cluster already ended
  (a finish_reason arrived, or ``RequestFailed``) gets none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq.asyncio

from diptych import proto
from diptych.services.common.sockets import recv_authenticated
from diptych.services.frontend.api_errors import APIError
from diptych.services.frontend.coordinator_link import CoordinatorLink
from diptych.services.frontend.detokenizer import IncrementalDetokenizer
from diptych.services.frontend.identity import ClientIdentity
from diptych.services.frontend.migration import resubmission
from diptych.services.frontend.model_info import ModelInfo
from diptych.services.frontend.timeline import Timeline
from diptych.services.frontend.token_owners import TokenOwners
from diptych.services.frontend.validation import Generation

log = logging.getLogger(__name__)

_WORKER_FAILURES = {"abort": (503, "the request was aborted by the server"), "error": (500, "generation failed")}


@dataclass
class Delta:
    """Output since the previous delta. ``finish_reason`` is set on the last one ("stop", "length", or "abort" when
    the request was cancelled by its own client), and so is ``timeline`` (``Timeline.as_dict``)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    timeline: dict[str, Any] | None = None


@dataclass
class RequestState:
    """``timeline`` holds the request's times (seconds since the epoch), from its arrival on."""

    request_id: str
    client: ClientIdentity
    prompt_len: int
    sampling: proto.SamplingParams
    detokenizer: IncrementalDetokenizer
    timeline: Timeline
    next_index: int = 0
    num_output_tokens: int = 0
    pending: dict[int, proto.TokenOutput] = field(default_factory=dict)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: proto.Request | None = None
    """The request as first submitted."""
    cluster_id: str = ""
    """The id of its current attempt in the cluster (``request_id``, then ``<request_id>-m<n>`` after migrations)."""
    index_base: int = 0
    """Output index in the client's stream of the current attempt's first output."""
    output_ids: list[int] = field(default_factory=list)
    """Token ids applied to the client's stream so far."""
    migrations: int = 0
    tier: str = "default"
    """The SLO tier it was submitted under."""


class RequestTracker:
    def __init__(self, info: ModelInfo, coordinator: CoordinatorLink, stream_addr: str, timeout_s: float,
                 stream_key: str = "frontend",
                 on_retire: Callable[[RequestState, str], None] | None = None) -> None:
        """``stream_key``: the name of this frontend's CURVE key, which workers expect at ``stream_addr``.
        ``on_retire(state, outcome)`` is called once per request as it leaves (finished, failed or cancelled)."""
        self._on_retire = on_retire
        self._info = info
        self._coordinator = coordinator
        self._stream_addr = stream_addr
        self._stream_key = stream_key
        self._owners = TokenOwners(lambda cluster_id: cluster_id in self._by_cluster_id)
        self._timeout_s = timeout_s
        self._requests: dict[str, RequestState] = {}
        self._by_cluster_id: dict[str, RequestState] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------ consumer side

    def submit(self, client: ClientIdentity, gen: Generation, slo: proto.SLO, arrival: float, source: str,
               note: str = "") -> RequestState:
        """Register a validated request and send it to the coordinator. Raises APIError(503) after ``close``.
        ``arrival`` is when the frontend received it (seconds since the epoch, before validation and tokenization).
        ``source`` ("http", "sdk") and ``note`` only go into the admission log line."""
        if self._closed:
            raise APIError(503, "the frontend is shutting down")
        state = RequestState(request_id=uuid.uuid4().hex, client=client, prompt_len=len(gen.prompt_token_ids),
                             sampling=gen.sampling, timeline=Timeline(arrival), tier=slo.tier,
                             detokenizer=IncrementalDetokenizer(self._info.tokenizer, gen.sampling.stop))
        self._requests[state.request_id] = state
        request = proto.Request(request_id=state.request_id, client_id=client.client_id,
                                prompt_token_ids=gen.prompt_token_ids, sampling=gen.sampling,
                                arrival_time=state.timeline.arrival, stream_addr=self._stream_addr, slo=slo,
                                weight=client.weight, stream_key=self._stream_key)
        state.request, state.cluster_id = request, request.request_id
        self._by_cluster_id[state.cluster_id] = state
        self._coordinator.post(proto.SubmitRequest(request=request))
        log.info("req=%s admitted via %s client=%s prompt_tokens=%d max_tokens=%d tier=%s tbt_s=%g ttft_s=%s%s",
                 state.request_id, source, client.client_id, state.prompt_len, gen.sampling.max_tokens, slo.tier,
                 slo.tbt_s, "-" if slo.ttft_s is None else f"{slo.ttft_s:g}", f" {note}" if note else "")
        return state

    async def next_event(self, state: RequestState) -> Delta:
        """The request's next delta. Raises APIError when it failed, or 504 (and cancels it) when no output came
        for ``timeout_s`` seconds."""
        try:
            event = await asyncio.wait_for(state.queue.get(), self._timeout_s)
        except asyncio.TimeoutError:
            self.cancel(state.request_id, "timeout")
            raise APIError(504, f"no output for {self._timeout_s:g} s; the request was cancelled") from None
        if isinstance(event, APIError):
            raise event
        return event

    def release(self, state: RequestState) -> None:
        """Call when the consumer is done with ``state`` for any reason: cancels the request if still running."""
        self.cancel(state.request_id, "abort")

    def cancel(self, request_id: str, reason: str) -> bool:
        """Stop a running request (its consumer gets a final ``Delta`` with finish_reason "abort"); tell the
        coordinator why ("abort", "stop", "timeout"). Returns False when the request is not running."""
        state = self._requests.get(request_id)
        if state is None:
            return False
        self._coordinator.post(proto.CancelRequest(request_id=state.cluster_id, reason=reason))
        state.timeline.close("abort", time.time())
        state.queue.put_nowait(Delta("", [], "abort", state.timeline.as_dict()))
        self._retire(state, f"cancelled:{reason}")
        return True

    def close(self, message: str) -> None:
        """Refuse new requests; fail the running ones with 503 and cancel them in the cluster."""
        self._closed = True
        for request_id in list(self._requests):
            self._fail(request_id, 503, message)

    # ------------------------------------------------------------ cluster side

    async def run_token_stream(self, sock: zmq.asyncio.Socket) -> None:
        """Receive loop of the token-stream PULL socket."""
        while True:
            _, sender, msg = await recv_authenticated(sock)
            if isinstance(msg, proto.TokenBatch):
                self._apply_outputs(self._owners.admit(sender, msg.outputs))
            elif isinstance(msg, proto.ProtocolError):
                log.warning("dropping a malformed token-stream message: %s", msg)
            else:
                log.warning("dropping unexpected %s on the token stream", type(msg).__name__)

    def on_placed(self, msg: proto.RequestPlaced) -> None:
        """The workers a request runs on: only they may stream its outputs (``token_owners``)."""
        self._apply_outputs(self._owners.place(msg))

    def _apply_outputs(self, outputs: list[proto.TokenOutput]) -> None:
        for output in outputs:
            try:
                self.on_output(output)
            except Exception:  # e.g. a token id the tokenizer cannot decode: fail that request only
                log.exception("req=%s cannot apply output %d", output.request_id, output.index)
                self._fail(output.request_id, 500, "internal error while processing the output")

    def on_output(self, output: proto.TokenOutput) -> None:
        state = self._by_cluster_id.get(output.request_id)
        if state is None:
            log.debug("req=%s dropping output %d for a request that is not running", output.request_id,
                      output.index)
            return
        if state.index_base:
            output = dataclasses.replace(output, index=output.index + state.index_base)
        if output.index < state.next_index or output.index in state.pending:
            log.debug("req=%s dropping duplicate output %d", output.request_id, output.index)
            return
        state.pending[output.index] = output
        while state.request_id in self._requests and state.next_index in state.pending:
            self._apply(state, state.pending.pop(state.next_index))

    def on_failed(self, msg: proto.RequestFailed) -> None:
        state = self._by_cluster_id.get(msg.request_id)
        if state is None:
            log.debug("req=%s failure for a request that is not running: %s", msg.request_id, msg.message)
            return
        state.queue.put_nowait(APIError(msg.code, msg.message, retry_after_s=msg.retry_after_s))
        self._retire(state, f"error:{msg.code}", detail=msg.message)

    def on_lost(self, msg: proto.RequestLost) -> None:
        """A worker holding the request was lost and the coordinator let it go: resubmit it from the tokens already
        streamed (``services.frontend.migration``), or fail it with 503 when it may not be resubmitted."""
        state = self._by_cluster_id.get(msg.request_id)
        if state is not None:
            self._migrate(state, msg.reason)

    def migrate_all(self, reason: str) -> None:
        """The coordinator restarted: the requests it held are gone. Resubmit every running request like a lost
        one, cancelling its old attempt in case the new coordinator received it."""
        for state in list(self._requests.values()):
            self._coordinator.post(proto.CancelRequest(request_id=state.cluster_id, reason="abort"))
            self._migrate(state, reason)

    def _migrate(self, state: RequestState, reason: str) -> None:
        if state.request is None:
            return
        again = resubmission(state.request, state.output_ids, state.migrations + 1)
        if again is None:
            state.queue.put_nowait(APIError(503, f"the request was lost: {reason}"))
            self._retire(state, "error:503", detail=f"lost: {reason}")
            return
        del self._by_cluster_id[state.cluster_id]
        self._owners.forget(state.cluster_id)
        state.migrations += 1
        state.cluster_id, state.index_base = again.request_id, state.next_index
        state.pending.clear()
        self._by_cluster_id[state.cluster_id] = state
        self._coordinator.post(proto.SubmitRequest(request=again))
        log.warning("req=%s migrated as %s after %d output tokens: %s", state.request_id, again.request_id,
                    len(state.output_ids), reason)

    def _fail(self, request_id: str, status: int, message: str) -> None:
        """Fail a request the cluster may still be running: its client gets ``status``, the cluster a cancel."""
        state = self._by_cluster_id.get(request_id) or self._requests.get(request_id)
        if state is not None:
            self._coordinator.post(proto.CancelRequest(request_id=state.cluster_id, reason="abort"))
            state.queue.put_nowait(APIError(status, message))
            self._retire(state, f"error:{status}", detail=message)

    def _apply(self, state: RequestState, output: proto.TokenOutput) -> None:
        """Apply the in-order ``output``: detokenize, check stop strings, deliver, retire when finished."""
        state.next_index += len(output.token_ids)
        if output.finish_reason in _WORKER_FAILURES:
            status, message = _WORKER_FAILURES[output.finish_reason]
            state.queue.put_nowait(APIError(status, message))
            self._retire(state, f"error:{status}", detail=f"worker finish_reason={output.finish_reason}")
            return
        ids, texts, stopped = [], [], False
        for position, token in enumerate(output.token_ids):
            ids.append(token)
            is_last = position == len(output.token_ids) - 1
            if is_last and output.finish_reason == "stop" and token in state.sampling.stop_token_ids:
                break  # like EOS, a stop token ends the output without appearing in the text
            texts.append(state.detokenizer.push([token]))
            if state.detokenizer.stopped:
                stopped = True
                break
        now = time.time()
        state.timeline.record(output, len(ids), now)
        state.num_output_tokens += len(ids)
        state.output_ids.extend(ids)
        finish = "stop" if stopped else output.finish_reason
        timeline = None
        if finish is not None:
            if not stopped:
                texts.append(state.detokenizer.flush())
            state.timeline.close(finish, now)
            timeline = state.timeline.as_dict()
        text = "".join(texts)
        if text or ids or finish:
            state.queue.put_nowait(Delta(text, ids, finish, timeline))
        if stopped and output.finish_reason is None:
            self._coordinator.post(proto.CancelRequest(request_id=state.cluster_id, reason="stop"))
        if finish is not None:
            self._retire(state, finish)

    def _retire(self, state: RequestState, outcome: str, detail: str = "") -> None:
        del self._requests[state.request_id]
        self._by_cluster_id.pop(state.cluster_id, None)
        self._owners.forget(state.cluster_id)
        log.info("req=%s finished client=%s prompt_tokens=%d output_tokens=%d finish=%s %s latency=%.3fs%s",
                 state.request_id, state.client.client_id, state.prompt_len, state.num_output_tokens, outcome,
                 state.timeline.summary(), time.time() - state.timeline.arrival, f" ({detail})" if detail else "")
        if self._on_retire is not None:
            self._on_retire(state, outcome)
