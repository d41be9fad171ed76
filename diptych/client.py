"""Python SDK for Diptych: talks to a frontend's SDK endpoint (ZeroMQ, ``proto`` messages) directly.

    async with AsyncClient("tcp://127.0.0.1:5601", api_key="...") as client:
        done = await client.complete("Hello", max_tokens=32, temperature=0)
        async for chunk in client.stream("Hello", max_tokens=32, tier="strict", ttft_s=0.5):
            print(chunk.text, end="")

    with Client() as client:                      # the same API, blocking
        print(client.complete("Hello").text)

Generation keywords are the fields of ``proto.SamplingParams`` (max_tokens, temperature, top_p, top_k, seed, stop,
stop_token_ids, ignore_eos, and ``stop_after_tokens``: a benchmark knob, stop after exactly that many output tokens
whatever ``max_tokens`` allows), those of ``proto.SLO`` (``tier``, and ``ttft_s``/``tbt_s`` in seconds: targets of this
request; the server refuses an unknown tier or a non-positive target with BadRequestError, and with API keys a
target tighter than the key's tier allows), and ``timeline`` (default True: ``Completion.timeline`` and the last
``StreamChunk.timeline`` hold the request's timeline, which the server always sends; False leaves them None);
anything else is a TypeError, and an SLO keyword of the wrong type a BadRequestError before anything is sent.

A timeline is a dict of times in seconds since the epoch: ``arrival`` (the frontend got the request), ``admitted``,
``prefill_start``, ``prefill_end``, ``handoff_start``, ``handoff_end`` (each absent when that phase did not
happen), ``first_token``, ``token_times`` (one per output token), ``finish``, and ``finish_reason``.

Invariants: one receive loop per client demultiplexes replies by request id; a request left unfinished (the
iterator broken out of, closed or garbage-collected, the awaiting task cancelled, a timeout) is cancelled on the
server with ``ClientCancel``; every failure is a ``diptych.errors.DiptychError`` subclass. ``timeout_s`` bounds the
wait for each reply (seconds), not the whole generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from diptych import proto
from diptych.errors import BadRequestError, DiptychError, RequestTimeoutError, error_for_status
from diptych.services.common.sockets import make_socket, recv_message, send_message

DEFAULT_ADDRESS = "tcp://127.0.0.1:5601"
DEFAULT_TIMEOUT_S = 120.0

_SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(proto.SamplingParams))
_SLO_KEYS = frozenset(f.name for f in dataclasses.fields(proto.SLO))

T = TypeVar("T")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StreamChunk:
    """Output since the previous chunk; ``text`` never splits a character. The last chunk has ``finish_reason``
    ("stop", "length", or "abort" when cancelled), ``usage`` and the server's ``timeline`` (None when cancelled by
    this client, or requested with ``timeline=False``)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    timeline: dict[str, Any] | None = None


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timeline: dict[str, Any] | None = None


class AsyncClient:
    """Asynchronous client; use from one event loop. Safe for many concurrent requests."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER, connect=address)
        self._pending: dict[str, asyncio.Queue] = {}
        self._outbox: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    async def complete(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                       request_id: str | None = None, **params: Any) -> Completion:
        """Generate and return the whole completion."""
        msg, timeline = self._generate(prompt, prompt_token_ids, request_id, params, stream=False)
        texts, token_ids = [], []
        async with contextlib.aclosing(self._run(msg, timeline)) as chunks:
            async for chunk in chunks:
                texts.append(chunk.text)
                token_ids.extend(chunk.token_ids)
                if chunk.finish_reason is not None:
                    return Completion(msg.request_id, "".join(texts), token_ids, chunk.finish_reason,
                                      chunk.usage or Usage(), chunk.timeline)
        raise DiptychError("the reply ended without a finish reason", request_id=msg.request_id)

    def stream(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
               request_id: str | None = None, **params: Any) -> AsyncStream:
        """Generate, yielding ``StreamChunk`` values as tokens arrive. ``.request_id`` names the request; it is
        sent when iteration starts."""
        msg, timeline = self._generate(prompt, prompt_token_ids, request_id, params, stream=True)
        return AsyncStream(msg.request_id, self._run(msg, timeline))

    async def cancel(self, request_id: str) -> None:
        """Cancel a running request; its stream ends with a chunk whose finish_reason is "abort"."""
        queue = self._pending.get(request_id)
        if queue is not None:
            self._post(proto.ClientCancel(request_id=request_id))
            queue.put_nowait(proto.ClientChunk(request_id=request_id, text="", token_ids=[], finish_reason="abort"))

    async def close(self) -> None:
        """Cancel running requests (their waiters get DiptychError), then close the socket."""
        if self._closed:
            return
        self._closed = True
        for request_id, queue in list(self._pending.items()):
            self._post(proto.ClientCancel(request_id=request_id))
            queue.put_nowait(DiptychError("the client was closed", request_id=request_id))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._outbox is not None:  # the cancels posted above, and anything the sender had not sent yet
            while not self._outbox.empty():
                await send_message(self._sock, self._outbox.get_nowait())
        self._sock.close()
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    # ------------------------------------------------------------ internals

    def _generate(self, prompt: str | None, prompt_token_ids: list[int] | None, request_id: str | None,
                  params: dict[str, Any], *, stream: bool) -> tuple[proto.ClientGenerate, bool]:
        """The message to send, and whether to keep the timeline (the ``timeline`` keyword)."""
        timeline = params.pop("timeline", True)
        unknown = set(params) - _SAMPLING_KEYS - _SLO_KEYS
        if unknown:
            raise TypeError(f"unknown generation parameters: {sorted(unknown)}")
        if (prompt is None) == (prompt_token_ids is None):
            raise TypeError("pass exactly one of prompt and prompt_token_ids")
        if not isinstance(timeline, bool):
            raise TypeError(f"timeline must be True or False, not {timeline!r}")
        sampling = {k: v for k, v in params.items() if k in _SAMPLING_KEYS}
        if isinstance(sampling.get("stop"), str):
            sampling["stop"] = [sampling["stop"]]
        slo = {k: v for k, v in params.items() if k in _SLO_KEYS}
        msg = proto.ClientGenerate(
            request_id=request_id or uuid.uuid4().hex, prompt=prompt,
            prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else None,
            sampling=proto.SamplingParams(**sampling), api_key=self.api_key,
            slo=_slo(slo) if slo else None, stream=stream)
        return msg, timeline

    async def _run(self, msg: proto.ClientGenerate, timeline: bool) -> AsyncGenerator[StreamChunk, None]:
        """Send ``msg`` and yield its chunks until the last; cancels the request if left before that. ``timeline``
        False drops the final chunk's timeline."""
        if self._closed:
            raise DiptychError("the client is closed")
        if msg.request_id in self._pending:
            raise DiptychError(f"request id {msg.request_id!r} is already running")
        self._start()
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[msg.request_id] = queue
        finished = False
        try:
            self._post(msg)
            while not finished:
                try:
                    reply = await asyncio.wait_for(queue.get(), self.timeout_s)
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(f"no reply within {self.timeout_s:g} s; the request was cancelled",
                                              request_id=msg.request_id) from None
                if isinstance(reply, DiptychError):
                    finished = True
                    raise reply
                if isinstance(reply, proto.ClientError):
                    finished = True
                    raise error_for_status(reply.code, reply.message, request_id=msg.request_id,
                                           retry_after_s=reply.retry_after_s)
                finished = reply.finish_reason is not None
                if finished:  # forget the request now, not when the caller gets around to closing us
                    self._forget(msg.request_id, queue)
                yield StreamChunk(msg.request_id, reply.text, list(reply.token_ids), reply.finish_reason,
                                  Usage(reply.prompt_tokens, reply.completion_tokens) if finished else None,
                                  reply.timeline if timeline else None)
        finally:
            self._forget(msg.request_id, queue)
            if not finished and not self._closed:
                self._post(proto.ClientCancel(request_id=msg.request_id))

    def _forget(self, request_id: str, queue: asyncio.Queue) -> None:
        if self._pending.get(request_id) is queue:
            del self._pending[request_id]

    def _start(self) -> None:
        if self._outbox is None:
            self._outbox = asyncio.Queue()
            self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._receive_loop())]

    def _post(self, msg: Any) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    async def _send_loop(self) -> None:
        assert self._outbox is not None
        while True:
            await send_message(self._sock, await self._outbox.get())

    async def _receive_loop(self) -> None:
        while True:
            _, msg = await recv_message(self._sock)
            if isinstance(msg, (proto.ClientChunk, proto.ClientError)) and msg.request_id:
                queue = self._pending.get(msg.request_id)
                if queue is not None:  # else: a late reply to a request already finished or cancelled
                    queue.put_nowait(msg)
                continue
            # Not attributable to one request: the server could not decode our frames (e.g. another protocol
            # version), or we cannot decode its replies. Fail everything running rather than let it time out.
            if isinstance(msg, proto.ClientError):
                error = error_for_status(msg.code, msg.message, retry_after_s=msg.retry_after_s)
            else:
                error = DiptychError(f"cannot decode the server's reply: {msg}")
            for queue in self._pending.values():
                queue.put_nowait(error)


class AsyncStream:
    """Async iterator over one request's chunks. Breaking out of it, ``aclose()``, or dropping it cancels the
    request on the server (if it has not finished)."""

    def __init__(self, request_id: str, chunks: AsyncIterator[StreamChunk]) -> None:
        self.request_id = request_id
        self._chunks = chunks

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


class Client:
    """Blocking client with ``AsyncClient``'s methods; runs an event loop in a background thread."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="diptych-client", daemon=True)
        self._thread.start()
        self._async = self._call(_make_async_client(address, api_key, timeout_s))

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        return self._call(self._async.complete(prompt, **kwargs))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Stream:
        astream = self._async.stream(prompt, **kwargs)
        return Stream(astream.request_id, self._iterate(astream))

    def cancel(self, request_id: str) -> None:
        self._call(self._async.cancel(request_id))

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def _iterate(self, astream: AsyncStream) -> Iterator[StreamChunk]:
        try:
            while True:
                try:
                    yield self._call(astream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._thread.is_alive():
                self._call(astream.aclose())


class Stream:
    """Iterator over one request's chunks (blocking). Breaking out of it, ``close()``, or dropping it cancels the
    request on the server (if it has not finished)."""

    def __init__(self, request_id: str, chunks: Iterator[StreamChunk]) -> None:
        self.request_id = request_id
        self._chunks = chunks

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]


def _slo(params: dict[str, Any]) -> proto.SLO:
    """The SLO keywords as a ``proto.SLO``; BadRequestError for a wrong type (values are checked by the server)."""
    tier = params.get("tier", proto.SLO.tier)
    if not isinstance(tier, str):
        raise BadRequestError(f"tier must be a string, not {tier!r}")
    targets = {}
    for name in ("ttft_s", "tbt_s"):
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BadRequestError(f"{name} must be a number of seconds, not {value!r}")
        targets[name] = None if value is None else float(value)
    return proto.SLO(tier=tier, **targets)


async def _make_async_client(address: str, api_key: str | None, timeout_s: float) -> AsyncClient:
    return AsyncClient(address, api_key, timeout_s)  # created on the loop thread, which owns its sockets
