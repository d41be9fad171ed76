"""The frontend process: HTTP server (uvicorn, in this event loop), SDK endpoint, token-stream receive loop and
coordinator link, all on one asyncio loop.

Startup binds every socket before serving anything, so a port in use fails fast with a clear error. Shutdown (stop
event, or any component dying): refuse new requests, fail the running ones (503 to their clients, CancelRequest to
the coordinator), let uvicorn finish its connections, then close the sockets and the ZeroMQ context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator

import uvicorn
import zmq
import zmq.asyncio

from diptych.services.common.cli import NO_KEYS_ERROR
from diptych.services.common.security import ZapAuthenticator, load_keys
from diptych.services.common.sockets import bind_address, make_socket
from diptych.services.frontend.api_errors import APIError
from diptych.services.frontend.config import FrontendConfig
from diptych.services.frontend.coordinator_link import CoordinatorLink, frontend_identity
from diptych.services.frontend.http_api import create_app
from diptych.services.frontend.identity import ClientDirectory
from diptych.services.frontend.metrics import FrontendMetrics
from diptych.services.frontend.migration import watch_coordinator
from diptych.services.frontend.model_info import ModelInfo
from diptych.services.frontend.sdk_endpoint import SdkEndpoint
from diptych.services.frontend.slo import SloPolicy
from diptych.services.frontend.tracker import RequestTracker

log = logging.getLogger(__name__)

HTTP_GRACE_S = 5
"""Seconds uvicorn waits for open connections at shutdown (their requests have already been failed)."""
HTTP_KEEP_ALIVE_S = 65
"""Seconds an idle HTTP connection is kept open: longer than clients' own idle limits (httpx 5 s, the openai client,
load balancers' 60 s), so the client closes an idle connection first. With equal limits a client could send a
request on a connection the server is closing at that moment, and see a connection error without an answer (seen
under open-loop load)."""


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: ``run_service`` owns SIGTERM/SIGINT and sets the stop event."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        return model
    from diptych.engine.tiny_model import resolve_model  # imports torch, so only when the built-in model is needed

    return resolve_model(None)


async def serve(config: FrontendConfig, directory: ClientDirectory, slo_policy: SloPolicy,
                stop: asyncio.Event) -> int:
    """Run until ``stop`` is set, with clients and SLO tiers from ``identity.load_access``; returns the process exit
    status (0, or 1 when a component failed)."""
    try:
        assert config.served_model_name is not None  # set by FrontendConfig.__post_init__
        info = ModelInfo.load(resolve_model_path(config.model), config.served_model_name, config.max_model_len)
        _warm_up_tokenizer(info)
        if config.ssl_certfile:  # fail here, not at the first connection
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.ssl_certfile,
                                                                                config.ssl_keyfile)
        if config.keys_dir is None and not config.insecure_no_curve:
            raise ValueError(NO_KEYS_ERROR)
        keys = load_keys(config.keys_dir, config.key_name)
        link_security = keys.client(config.key_name, "coordinator") if keys else None
        stream_security = keys.server(config.key_name) if keys else None
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        http_sock = socket.create_server((config.host, config.http_port), family=family)
    except (OSError, ValueError, KeyError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    ctx = zmq.asyncio.Context()
    authenticator = ZapAuthenticator(ctx, keys) if keys else None
    try:
        if authenticator is not None:
            authenticator.start()
        coordinator = CoordinatorLink(ctx, config.coordinator_addr, frontend_identity(), link_security)
        stream_sock = make_socket(ctx, zmq.PULL, bind=bind_address(config.stream_addr), security=stream_security)
        metrics = FrontendMetrics(coordinator.query_status)
        tracker = RequestTracker(info, coordinator, config.stream_addr, config.request_timeout_s, config.key_name,
                                 on_retire=metrics.requests.on_retire)
        sdk = SdkEndpoint(ctx, config.sdk_addr, tracker, info, directory, slo_policy)
    except zmq.ZMQError as exc:
        log.error("cannot start: %s (sdk=%s, stream=%s)", exc, config.sdk_addr, config.stream_addr)
        http_sock.close()
        if authenticator is not None:
            await authenticator.stop()
        ctx.destroy(linger=0)
        return 1
    if directory.admin_open:
        log.warning("operator endpoints (/admin/status) are open to every caller: no API or admin keys configured")
    app = create_app(info, tracker, directory, slo_policy, coordinator, metrics, max_body_bytes=config.max_body_bytes)
    server = _EmbeddedServer(uvicorn.Config(app, lifespan="off", log_level="warning",
                                            timeout_graceful_shutdown=HTTP_GRACE_S,
                                            timeout_keep_alive=HTTP_KEEP_ALIVE_S,
                                            ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile))
    http_task = asyncio.create_task(server.serve(sockets=[http_sock]), name="http")
    background = [
        asyncio.create_task(tracker.run_token_stream(stream_sock), name="token-stream"),
        asyncio.create_task(coordinator.run_sender(), name="coordinator-send"),
        asyncio.create_task(coordinator.run_receiver(tracker.on_failed, tracker.on_lost, tracker.on_placed),
                            name="coordinator-recv"),
        asyncio.create_task(sdk.run(), name="sdk"),
        asyncio.create_task(watch_coordinator(coordinator, tracker.migrate_all), name="coordinator-watch"),
    ]
    log.info("serving model %r (max_model_len=%d, %s, SLO tiers %s) on %s://%s:%d, sdk=%s, stream=%s, "
             "coordinator=%s as %s%s", info.name, info.max_model_len,
             "API keys required" if directory.requires_key else "anonymous clients", slo_policy.describe(),
             config.http_scheme, config.host, http_sock.getsockname()[1], config.sdk_addr, config.stream_addr,
             config.coordinator_addr, coordinator.identity, f" (CURVE key {config.key_name!r})" if keys else "")

    stop_task = asyncio.create_task(stop.wait(), name="stop")
    done, _ = await asyncio.wait([stop_task, http_task, *background], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    for task in done - {stop_task}:
        status = 1
        log.error("%s stopped unexpectedly: %r", task.get_name(), task.exception() if not task.cancelled() else None)
    log.info("shutting down: %d running requests", len(tracker))

    tracker.close("the frontend is shutting down")
    server.should_exit = True
    await asyncio.gather(http_task, return_exceptions=True)
    await sdk.close()
    for task in [stop_task, *background]:
        task.cancel()
    await asyncio.gather(stop_task, *background, return_exceptions=True)
    await coordinator.close()
    stream_sock.close()
    if authenticator is not None:
        await authenticator.stop()
    ctx.term()
    log.info("stopped")
    return status


def _warm_up_tokenizer(info: ModelInfo) -> None:
    """Encode a prompt and render the chat template once (compiling it) so the first client does not wait for it."""
    info.encode("warm-up")
    with contextlib.suppress(APIError):  # no chat template: /v1/chat/completions refuses every request anyway
        info.encode_chat([{"role": "user", "content": "warm-up"}])
