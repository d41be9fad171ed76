"""What a worker's roles may use of their process: its engine (through the engine thread), its control socket to
the coordinator, PUSH sockets to frontends and decode workers, and the loop's wake-up.

With a CURVE key set (``keys``) every socket uses the worker's key (``key_name``, its worker id by default): the
control socket and each PUSH socket expect the server key of their peer (``coordinator``, the request's
``stream_key``, the decode worker's id), and a bound PULL socket admits the cluster's keys through this context's
ZAP handler (the receiver checks which key sent what).

Invariant: the engine is touched by one thread at a time (``EngineThread``): roles call it through ``engine_call``,
or directly only from ``Role.after_step`` of an output that needs the engine (``Role.output_needs_engine``), or for
``reserve``/``reserved_blocks`` (safe beside ``step``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from diptych.engine.protocol import WorkerEngine
from diptych.proto.messages import TokenBatch, TokenOutput
from diptych.services.common.engine_thread import EngineThread
from diptych.services.common.security import CurveClient, KeySet, ZapAuthenticator
from diptych.services.common.sockets import KV_MAX_MSG_BYTES, bind_address, make_socket, send_message

T = TypeVar("T")


class WorkerLinks:
    def __init__(self, worker_id: str, engine: WorkerEngine, coordinator_addr: str, keys: KeySet | None = None,
                 key_name: str | None = None) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.engine_thread = EngineThread(engine, worker_id)
        self.ctx = zmq.asyncio.Context()
        self.keys = keys
        self.key_name = key_name or worker_id
        self.authenticator = ZapAuthenticator(self.ctx, keys) if keys is not None else None
        if self.authenticator is not None:
            self.authenticator.bind()  # before any PULL socket binds; served by ``background``
        self.control = make_socket(self.ctx, zmq.DEALER, connect=coordinator_addr, identity=worker_id,
                                   security=self._client("coordinator"))
        self._push_sockets: dict[tuple[str, str], zmq.asyncio.Socket] = {}
        self.woken = asyncio.Event()
        """Set when a message may have given the engine work (the engine loop waits on it when idle)."""

    async def engine_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call an engine method from the loop: at once between iterations, else right after the current one."""
        return await self.engine_thread.call(fn, *args, **kwargs)

    async def send_control(self, msg: Any) -> None:
        await send_message(self.control, msg)

    async def push(self, addr: str, msg: Any, server_key: str) -> None:
        """Send ``msg`` over a PUSH socket connected to ``addr`` (a frontend's token stream or a decode worker's KV
        ingress) whose server key is named ``server_key``, connecting on first use."""
        sock = self._push_sockets.get((addr, server_key))
        if sock is None:
            sock = self._push_sockets[addr, server_key] = make_socket(self.ctx, zmq.PUSH, connect=addr,
                                                                      security=self._client(server_key))
        await send_message(sock, msg)

    async def stream_tokens(self, streams: dict[tuple[str, str], list[TokenOutput]]) -> None:
        """Push token outputs to the frontends that own their requests (one message per frontend), keyed by
        ``(stream_addr, stream_key)`` of their requests."""
        for (addr, key), outputs in streams.items():
            await self.push(addr, TokenBatch(outputs=outputs), key)

    def bind_pull(self, addr: str) -> zmq.asyncio.Socket:
        """A PULL socket bound where peers reach ``addr``, taking KV-sized frames (the owner closes it)."""
        return make_socket(self.ctx, zmq.PULL, bind=bind_address(addr), max_msg_bytes=KV_MAX_MSG_BYTES,
                           security=self.keys.server(self.key_name) if self.keys is not None else None)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Loops the worker runs while it runs: answering CURVE handshakes on its bound sockets (none without keys)."""
        return [self.authenticator.serve()] if self.authenticator is not None else []

    def _client(self, server_key: str) -> CurveClient | None:
        return self.keys.client(self.key_name, server_key) if self.keys is not None else None

    def wake(self) -> None:
        self.woken.set()

    def close(self) -> None:
        """Stop the engine thread (after the step in flight) and close the sockets."""
        self.engine_thread.close()
        for sock in [self.control, *self._push_sockets.values()]:
            sock.close()
        if self.authenticator is not None:
            self.authenticator.close()
        self.ctx.term()
