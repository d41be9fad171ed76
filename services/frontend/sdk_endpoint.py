"""The SDK endpoint: a ROUTER socket speaking ``ClientGenerate``/``ClientCancel`` in, ``ClientChunk``/``ClientError``
out, one conversation per SDK connection (ZeroMQ identity).

Request ids are the SDK's and scoped to its connection: a duplicate of a running one is refused (400), and the
request runs in the cluster under a fresh id (logged as ``req=<id> sdk_req=<sdk id>``). Frames that do not decode
(malformed, unknown type, wrong protocol version) are answered with ``ClientError(request_id="", code=400)`` and the
endpoint goes on serving. A running request whose SDK connection is gone (a send fails) is cancelled.

``ClientGenerate.slo`` (tier, ttft_s, tbt_s; seconds) is resolved by ``slo.SloPolicy`` like the HTTP ``diptych``
extension; the final ``ClientChunk`` of a request always carries its timeline (``services.frontend.timeline``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio

from diptych import proto
from diptych.services.common.sockets import make_socket, recv_message, send_message
from diptych.services.frontend.api_errors import APIError, bad_request
from diptych.services.frontend.identity import ClientDirectory
from diptych.services.frontend.model_info import ModelInfo
from diptych.services.frontend.slo import SloPolicy
from diptych.services.frontend.tracker import RequestState, RequestTracker
from diptych.services.frontend.validation import Generation, check_prompt, check_sampling, completion_prompt_ids

log = logging.getLogger(__name__)


class SdkEndpoint:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, tracker: RequestTracker, info: ModelInfo,
                 directory: ClientDirectory, slo_policy: SloPolicy) -> None:
        self._sock = make_socket(ctx, zmq.ROUTER, bind=address)
        self._tracker = tracker
        self._info = info
        self._directory = directory
        self._slo_policy = slo_policy
        self._running: dict[tuple[bytes, str], tuple[RequestState, asyncio.Task]] = {}

    async def run(self) -> None:
        """Receive loop: never returns, never dies on bad input."""
        while True:
            peer, msg = await recv_message(self._sock, routed=True)
            assert peer is not None  # a ROUTER socket always names the peer
            try:
                await self._dispatch(peer, msg)
            except Exception:  # a bug handling one message must not take the endpoint down
                log.exception("error handling %s from SDK peer %r", type(msg).__name__, peer)
                request_id = getattr(msg, "request_id", "")
                await self._reply(peer, proto.ClientError(request_id=request_id, code=500, message="internal error"))

    async def _dispatch(self, peer: bytes, msg: object) -> None:
        if isinstance(msg, proto.ClientGenerate):
            await self._on_generate(peer, msg)
        elif isinstance(msg, proto.ClientCancel):
            self._on_cancel(peer, msg)
        elif isinstance(msg, proto.ProtocolError):
            log.warning("bad SDK frame from %r: %s", peer, msg)
            await self._reply(peer, proto.ClientError(request_id="", code=400, message=f"bad message: {msg}"))
        else:
            log.warning("unexpected %s from SDK peer %r", type(msg).__name__, peer)
            await self._reply(peer, proto.ClientError(request_id="", code=400,
                                                      message=f"{type(msg).__name__} is not an SDK message"))

    async def close(self, grace_s: float = 1.0) -> None:
        """Let the pumps deliver their final replies (the tracker was closed first), then stop them and close."""
        tasks = [task for _, task in self._running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sock.close()

    async def _on_generate(self, peer: bytes, msg: proto.ClientGenerate) -> None:
        arrival = time.time()
        key = (peer, msg.request_id)
        if key in self._running:
            await self._reply(peer, proto.ClientError(request_id=msg.request_id, code=400,
                                                      message="duplicate request_id"))
            return
        client = self._directory.authenticate(msg.api_key)
        if client is None:
            await self._reply(peer, proto.ClientError(request_id=msg.request_id, code=401,
                                                      message="incorrect or missing API key"))
            return
        try:
            gen = await self._validate(msg)
            requested = msg.slo or proto.SLO()
            slo = self._slo_policy.resolve(client.tier, requested.tier, requested.ttft_s, requested.tbt_s, "slo")
            state = self._tracker.submit(client, gen, slo, arrival, source="sdk", note=f"sdk_req={msg.request_id}")
        except APIError as exc:
            await self._reply(peer, proto.ClientError(request_id=msg.request_id, code=exc.status,
                                                      message=exc.message, retry_after_s=exc.retry_after_s))
            return
        task = asyncio.create_task(self._pump(peer, msg.request_id, state, msg.stream))
        self._running[key] = (state, task)

    async def _validate(self, msg: proto.ClientGenerate) -> Generation:
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            raise bad_request("set exactly one of prompt and prompt_token_ids", "prompt")
        if msg.prompt is not None:
            prompt_ids = await completion_prompt_ids(msg.prompt, self._info)
        else:
            prompt_ids = list(msg.prompt_token_ids or [])
            check_prompt(prompt_ids, self._info)
        return Generation(prompt_ids, check_sampling(msg.sampling, len(prompt_ids), self._info))

    def _on_cancel(self, peer: bytes, msg: proto.ClientCancel) -> None:
        running = self._running.get((peer, msg.request_id))
        if running is None:
            log.debug("cancel for sdk_req=%s that is not running", msg.request_id)
            return
        self._tracker.cancel(running[0].request_id, "abort")

    async def _pump(self, peer: bytes, sdk_id: str, state: RequestState, stream: bool) -> None:
        """Forward one request's output to its SDK connection: a chunk per delta (``stream``) or one at the end."""
        texts: list[str] = []
        token_ids: list[int] = []
        try:
            while True:
                event = await self._tracker.next_event(state)
                finished = event.finish_reason is not None
                if stream and (event.text or event.token_ids or finished):
                    chunk = proto.ClientChunk(request_id=sdk_id, text=event.text, token_ids=event.token_ids,
                                              finish_reason=event.finish_reason)
                elif finished:
                    chunk = proto.ClientChunk(request_id=sdk_id, text="".join(texts) + event.text,
                                              token_ids=token_ids + event.token_ids,
                                              finish_reason=event.finish_reason)
                else:
                    texts.append(event.text)
                    token_ids.extend(event.token_ids)
                    continue
                if finished:
                    chunk.prompt_tokens, chunk.completion_tokens = state.prompt_len, state.num_output_tokens
                    chunk.timeline = event.timeline
                await send_message(self._sock, chunk, to=peer)
                if finished:
                    return
        except APIError as exc:
            await self._reply(peer, proto.ClientError(request_id=sdk_id, code=exc.status, message=exc.message,
                                                      retry_after_s=exc.retry_after_s))
        except zmq.ZMQError as exc:
            log.info("req=%s sdk_req=%s SDK connection gone (%s); cancelling", state.request_id, sdk_id, exc)
        finally:
            self._tracker.release(state)
            self._running.pop((peer, sdk_id), None)

    async def _reply(self, peer: bytes | None, msg: proto.ClientError) -> None:
        if peer is None:
            return
        try:
            await send_message(self._sock, msg, to=peer)
        except zmq.ZMQError as exc:  # the peer left before its answer (ROUTER_MANDATORY: EHOSTUNREACH)
            log.info("cannot answer SDK peer %r: %s", peer, exc)
