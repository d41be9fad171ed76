"""The frontend's DEALER connection to the coordinator's control socket.

Outgoing messages (``SubmitRequest``, ``CancelRequest``, ``StatusQuery``) are posted synchronously into an outbox
and sent by one task, so a cancel can be issued from any context (a ``finally`` block of a cancelled task included)
and messages leave in the order they were posted. Incoming ``RequestFailed``, ``RequestLost`` and
``RequestPlaced`` messages go to callbacks;
``ClusterStatus`` replies answer every ``query_status`` call waiting at that moment (a status is a snapshot, so any
reply serves any waiter); anything else is logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from diptych import proto
from diptych.services.common.security import CurveClient
from diptych.services.common.sockets import make_socket, recv_message, send_message

log = logging.getLogger(__name__)


def frontend_identity() -> str:
    """``frontend-<pid>-<random>``: unique among the coordinator's peers, also across restarts."""
    return f"frontend-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class CoordinatorLink:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, identity: str,
                 security: CurveClient | None = None) -> None:
        self.identity = identity
        self._sock = make_socket(ctx, zmq.DEALER, connect=address, identity=identity, security=security)
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._status_waiters: list[asyncio.Future[proto.ClusterStatus]] = []
        self._on_failed: Callable[[proto.RequestFailed], None] | None = None

    def post(self, msg: Any) -> None:
        """Queue ``msg`` for the coordinator; never blocks."""
        self._outbox.put_nowait(msg)

    async def query_status(self, timeout_s: float) -> proto.ClusterStatus | None:
        """The coordinator's current ``ClusterStatus``, or None when it does not answer within ``timeout_s``."""
        waiter = asyncio.get_running_loop().create_future()
        self._status_waiters.append(waiter)
        self.post(proto.StatusQuery())
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            if waiter in self._status_waiters:
                self._status_waiters.remove(waiter)

    async def run_sender(self) -> None:
        """Send the outbox in order. A message that cannot be encoded or sent is logged and dropped, never ends the
        task; a ``SubmitRequest`` among them fails its request with a 400 through the ``on_failed`` callback of
        ``run_receiver`` (the server starts both before any request arrives)."""
        while True:
            msg = await self._outbox.get()
            try:
                await send_message(self._sock, msg)
            except (zmq.ZMQError, ValueError, TypeError, proto.ProtocolError) as exc:
                log.error("could not send %s to the coordinator: %s", type(msg).__name__, exc)
                if isinstance(msg, proto.SubmitRequest) and self._on_failed is not None:
                    self._on_failed(proto.RequestFailed(request_id=msg.request.request_id, code=400,
                                                        message="the request could not be encoded"))

    async def run_receiver(self, on_failed: Callable[[proto.RequestFailed], None],
                           on_lost: Callable[[proto.RequestLost], None] | None = None,
                           on_placed: Callable[[proto.RequestPlaced], None] | None = None) -> None:
        self._on_failed = on_failed
        while True:
            _, msg = await recv_message(self._sock)
            if isinstance(msg, proto.RequestFailed):
                on_failed(msg)
            elif isinstance(msg, proto.RequestPlaced) and on_placed is not None:
                on_placed(msg)
            elif isinstance(msg, proto.RequestLost) and on_lost is not None:
                on_lost(msg)
            elif isinstance(msg, proto.ClusterStatus):
                waiters, self._status_waiters = self._status_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(msg)
            elif isinstance(msg, proto.ProtocolError):
                log.warning("dropping a malformed message from the coordinator: %s", msg)
            else:
                log.warning("dropping unexpected %s from the coordinator", type(msg).__name__)

    async def close(self) -> None:
        """Send what is still queued (the cancels of a shutdown), then close; LINGER bounds the wait."""
        while not self._outbox.empty():
            await send_message(self._sock, self._outbox.get_nowait())
        self._sock.close()
