"""What a worker's roles may use of their process: its engine (through the engine thread), its control socket to
the coordinator, PUSH sockets to frontends and decode workers, and the loop's wake-up.

Invariant: the engine is touched by one thread at a time (``EngineThread``): roles call it through ``engine_call``,
or directly only from ``Role.after_step`` of an output that needs the engine (``Role.output_needs_engine``), or for
``reserve``/``reserved_blocks`` (safe beside ``step``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from diptych.engine.protocol import WorkerEngine
from diptych.proto.messages import TokenBatch, TokenOutput
from diptych.services.common.engine_thread import EngineThread
from diptych.services.common.sockets import bind_address, make_socket, send_message

T = TypeVar("T")


class WorkerLinks:
    def __init__(self, worker_id: str, engine: WorkerEngine, coordinator_addr: str) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.engine_thread = EngineThread(engine, worker_id)
        self.ctx = zmq.asyncio.Context()
        self.control = make_socket(self.ctx, zmq.DEALER, connect=coordinator_addr, identity=worker_id)
        self._push_sockets: dict[str, zmq.asyncio.Socket] = {}
        self.woken = asyncio.Event()
        """Set when a message may have given the engine work (the engine loop waits on it when idle)."""

    async def engine_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call an engine method from the loop: at once between iterations, else right after the current one."""
        return await self.engine_thread.call(fn, *args, **kwargs)

    async def send_control(self, msg: Any) -> None:
        await send_message(self.control, msg)

    async def push(self, addr: str, msg: Any) -> None:
        """Send ``msg`` over a PUSH socket connected to ``addr`` (a frontend's token stream or a decode worker's KV
        ingress), connecting on first use."""
        sock = self._push_sockets.get(addr)
        if sock is None:
            sock = self._push_sockets[addr] = make_socket(self.ctx, zmq.PUSH, connect=addr)
        await send_message(sock, msg)

    async def stream_tokens(self, by_addr: dict[str, list[TokenOutput]]) -> None:
        """Push token outputs to the frontends that own their requests (one message per frontend)."""
        for addr, outputs in by_addr.items():
            await self.push(addr, TokenBatch(outputs=outputs))

    def bind_pull(self, addr: str) -> zmq.asyncio.Socket:
        """A PULL socket bound where peers reach ``addr`` (the owner closes it)."""
        return make_socket(self.ctx, zmq.PULL, bind=bind_address(addr))

    def wake(self) -> None:
        self.woken.set()

    def close(self) -> None:
        """Stop the engine thread (after the step in flight) and close the sockets."""
        self.engine_thread.close()
        for sock in [self.control, *self._push_sockets.values()]:
            sock.close()
        self.ctx.term()
