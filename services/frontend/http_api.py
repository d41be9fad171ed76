"""The OpenAI-compatible HTTP API: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events), ``GET /v1/models``; and ``GET /health`` (200 when the coordinator answers
and has at least one prefill and one decode worker, else 503; the body has the worker counts either way) and
``GET /admin/status`` (the coordinator's ``ClusterStatus`` as JSON, each worker's entry as
``services.coordinator.status`` builds it: KV accounting, preemptions, recomputed tokens, refused reservations; plus
this frontend's running requests; operator only: an admin key, or no keys configured at all, see
``identity.AdminAccess``) and ``GET /metrics`` (Prometheus,
``services.frontend.metrics``; operator only likewise); ``GET /v1/usage`` (the calling
client's own service: requests, input and output tokens).

Both generation endpoints accept the ``"diptych"`` extension object (``schemas.DiptychOptions``): ``tier``,
``ttft_s``, ``tbt_s`` (seconds; resolved by ``slo.SloPolicy`` into the ``Request.slo`` submitted) and ``timeline``
(true: the response carries the request's timeline, see ``responses``). ``services/frontend/README.md`` has examples.

Every error is an OpenAI-style body ``{"error": {...}}``; FastAPI's 422 validation responses are replaced by 400s.
Bad input is a 4xx, never a 500: a body over ``max_body_bytes`` is a 413 before it is parsed (``_BodyLimit``), and a
string anywhere in a generation request's JSON that is not valid Unicode (a lone surrogate) is a 400
(``validation.check_json_text``).
A streamed request waits for its first output before sending headers, so a refusal (429 with ``Retry-After``, 503)
is still a proper HTTP status; a failure after that is sent as a final ``data: {"error": ...}`` event.

No leaks: the request is released (cancelled in the cluster if still running) whenever the handler or the stream
ends for any reason; a client that disconnects while waiting for a non-streamed result, or for the first token, is
noticed through the ASGI ``http.disconnect`` message; mid-stream, Starlette cancels the stream on disconnect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diptych.services.frontend.api_errors import APIError
from diptych.services.frontend.coordinator_link import CoordinatorLink
from diptych.services.frontend.identity import AdminAccess, ClientDirectory, ClientIdentity
from diptych.services.frontend.metrics import FrontendMetrics
from diptych.services.frontend.model_info import ModelInfo
from diptych.services.frontend.responses import SSE_DONE, OpenAIFormatter, sse_event
from diptych.services.frontend.schemas import ChatCompletionRequest, CompletionRequest, DiptychOptions, SamplingFields
from diptych.services.frontend.slo import SloPolicy
from diptych.services.frontend.tracker import Delta, RequestState, RequestTracker
from diptych.services.frontend.validation import Generation, chat_generation, check_json_text, completion_generation

T = TypeVar("T")

STATUS_TIMEOUT_S = 1.5
"""How long /health and /admin/status wait for the coordinator's answer."""

DEFAULT_MAX_BODY_BYTES = 16 << 20
"""Largest HTTP request body accepted (``--max-body-bytes``); larger ones get 413 unread."""

CLIENT_CLOSED = 499
"""Status recorded for a request whose client went away (nginx's convention); the client never sees it."""


class _ClientGone(Exception):
    pass


class _TrackedStream(StreamingResponse):
    """A server-sent-event response that runs ``on_close`` however it ends (done, failed, disconnected)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(info: ModelInfo, tracker: RequestTracker, directory: ClientDirectory, slo_policy: SloPolicy,
               coordinator: CoordinatorLink, metrics: FrontendMetrics | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="Diptych", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc, request.headers.get("content-type", ""))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(_ClientGone)
    async def client_gone(_: Request, __: _ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    def authenticate(request: Request) -> ClientIdentity:
        client = directory.authenticate(_bearer_key(request))
        if client is None:
            raise _unauthenticated()
        return client

    def authorize_admin(request: Request) -> None:
        """Operator endpoints. The refusals say nothing about which keys exist or what the endpoint would show."""
        access = directory.admin_access(_bearer_key(request))
        if access is AdminAccess.FORBIDDEN:
            raise APIError(403, "This endpoint needs an operator key", code="forbidden")
        if access is AdminAccess.UNAUTHENTICATED:
            raise _unauthenticated()

    @app.get("/health")
    async def health() -> JSONResponse:
        status = await coordinator.query_status(STATUS_TIMEOUT_S)
        body: dict[str, Any] = {"model": info.name, "running_requests": len(tracker)}
        if status is None:
            return JSONResponse({"status": "coordinator unreachable", **body}, status_code=503)
        body.update(prefill_workers=status.prefill_workers, decode_workers=status.decode_workers,
                    colocated_workers=status.colocated_workers)
        ready = status.colocated_workers > 0 or (status.prefill_workers > 0 and status.decode_workers > 0)
        return JSONResponse({"status": "ok" if ready else "no workers", **body}, status_code=200 if ready else 503)

    if metrics is not None:
        @app.get("/metrics", dependencies=[Depends(authorize_admin)])
        async def prometheus_metrics() -> Response:
            return Response(await metrics.render(), media_type=metrics.content_type)

    @app.get("/admin/status", dependencies=[Depends(authorize_admin)])
    async def admin_status() -> dict[str, Any]:
        status = await coordinator.query_status(STATUS_TIMEOUT_S)
        if status is None:
            raise APIError(503, "the coordinator did not answer")
        return {**dataclasses.asdict(status), "frontend": {"model": info.name, "running_requests": len(tracker)}}

    @app.get("/v1/usage")
    async def usage(client: ClientIdentity = Depends(authenticate)) -> dict[str, Any]:
        status = await coordinator.query_status(STATUS_TIMEOUT_S)
        if status is None:
            raise APIError(503, "the coordinator did not answer")
        own = status.clients.get(client.client_id, {})
        return {"object": "usage", "client_id": client.client_id,
                **{k: own.get(k, 0) for k in ("requests", "input_tokens", "output_tokens", "service")}}

    @app.get("/v1/models")
    async def models(_: ClientIdentity = Depends(authenticate)) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": started,
                                            "owned_by": "diptych", "max_model_len": info.max_model_len}]}

    @app.post("/v1/completions", dependencies=[Depends(_valid_unicode)])
    async def completions(body: CompletionRequest, request: Request,
                          client: ClientIdentity = Depends(authenticate)) -> Response:
        arrival = time.time()
        return await _generate(request, body, await completion_generation(body, info), client, arrival, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(_valid_unicode)])
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               client: ClientIdentity = Depends(authenticate)) -> Response:
        arrival = time.time()
        return await _generate(request, body, await chat_generation(body, info), client, arrival, chat=True)

    async def _generate(request: Request, body: SamplingFields, gen: Generation, client: ClientIdentity,
                        arrival: float, *, chat: bool) -> Response:
        options = body.diptych or DiptychOptions()
        slo = slo_policy.resolve(client.tier, options.tier, options.ttft_s, options.tbt_s, param="diptych")
        state = tracker.submit(client, gen, slo, arrival, source="http")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = OpenAIFormatter(chat=chat, request_id=state.request_id, model=info.name, include_usage=include_usage,
                              include_timeline=options.timeline)
        headers = {"X-Request-Id": state.request_id}
        streaming = False
        try:
            if not body.stream:
                final = await _unless_disconnected(request, _collect(tracker, state))
                return JSONResponse(fmt.body(final.text, final.finish_reason, state.prompt_len,
                                             state.num_output_tokens, final.timeline), headers=headers)
            first = await _unless_disconnected(request, tracker.next_event(state))
            streaming = True
            return _TrackedStream(_sse(tracker, state, fmt, first), lambda: tracker.release(state), headers)
        finally:
            if not streaming:
                tracker.release(state)

    return app


class _BodyLimit:
    """ASGI middleware: a request whose body exceeds ``max_bytes`` gets 413 before anything parses it (a larger
    ``Content-Length`` is refused unread; a chunked body is read up to the limit). The body read is replayed to the
    app, then ``receive`` passes through (the handlers watch it for ``http.disconnect``)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self._max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self._max_bytes:
                await self._refuse(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self._app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(413, f"request body larger than {self._max_bytes} bytes", code="request_too_large")
        await JSONResponse(err.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)


async def _valid_unicode(request: Request) -> None:
    """400 for a generation request whose JSON holds a string that is not valid Unicode (checked before the body's
    fields are, so no value reaches a tokenizer, an error message or a socket)."""
    try:
        body = await request.json()
    except ValueError:  # not JSON: the body's own validation says so
        return
    check_json_text(body)


def _bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def _unauthenticated() -> APIError:
    return APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


async def _collect(tracker: RequestTracker, state: RequestState) -> Delta:
    """The whole output as one final ``Delta`` (text of every delta, finish_reason and timeline of the last)."""
    texts, token_ids = [], []
    while True:
        event = await tracker.next_event(state)
        texts.append(event.text)
        token_ids.extend(event.token_ids)
        if event.finish_reason is not None:
            return Delta("".join(texts), token_ids, event.finish_reason, event.timeline)


async def _sse(tracker: RequestTracker, state: RequestState, fmt: OpenAIFormatter,
               event: Delta) -> AsyncIterator[bytes]:
    for chunk in fmt.opening_chunks():
        yield chunk
    try:
        while True:
            if event.text:
                yield fmt.text_chunk(event.text)
            if event.finish_reason is not None:
                yield fmt.finish_chunk(event.finish_reason, event.timeline)
                if fmt.include_usage:
                    yield fmt.usage_chunk(state.prompt_len, state.num_output_tokens)
                break
            event = await tracker.next_event(state)
    except APIError as exc:
        yield sse_event(exc.body())
    yield SSE_DONE


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the HTTP client disconnects first (then raise ``_ClientGone``)."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        work_task.cancel()
        watch_task.cancel()
    if not work_task.done() or work_task.cancelled():
        raise _ClientGone()
    return work_task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_error(exc: RequestValidationError, content_type: str) -> APIError:
    """FastAPI's validation error -> a 400 naming the first offending parameter."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "))
    if first.get("type") == "extra_forbidden" and loc:  # only DiptychOptions forbids unknown fields
        return APIError(400, f"unknown field '{'.'.join(loc)}'; the {loc[0]} object takes "
                             f"{', '.join(DiptychOptions.model_fields)}", param=loc[0])
    if not loc:
        if content_type and "json" not in content_type:
            return APIError(400, f"send the body as JSON with 'Content-Type: application/json', not {content_type!r}")
        return APIError(400, "request body must be a JSON object")
    return APIError(400, f"invalid value for '{'.'.join(loc)}': {first.get('msg', 'invalid')}", param=loc[0])
