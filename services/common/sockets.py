"""ZeroMQ sockets configured the way every Diptych service needs them, and typed send/receive over ``proto``.

- ``LINGER`` is always set (the default of -1 can hang shutdown forever).
- ROUTER sockets set ``ROUTER_MANDATORY`` so a message to an unknown peer raises instead of vanishing.
- ``recv_message`` turns malformed frames into a logged drop (or an error reply, by the caller) rather than a crash.
- ``MAXMSGSIZE`` is always set (``max_msg_bytes``): a peer cannot make a receiver buffer an arbitrarily large frame.
- ``security``: CURVE server or client options from ``services.common.security``, applied before the socket
  binds or connects; ``recv_authenticated`` also returns the ZAP user id (the sender's key name) of each message.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import zmq
import zmq.asyncio

from diptych import proto
from diptych.services.common.security import SocketSecurity

log = logging.getLogger(__name__)

LINGER_MS = 500
CONTROL_MAX_MSG_BYTES = 8 << 20
"""Largest frame a control, SDK or token-stream socket accepts (bytes): a long prompt's token ids or a cluster status
fit many times over."""
KV_MAX_MSG_BYTES = 64 << 20
"""Largest frame a KV ingress accepts (bytes): one KV block of a large model (a 16-token block of a 70B Llama with
grouped-query attention is about 5 MiB in bf16)."""


def make_socket(ctx: zmq.asyncio.Context, kind: int, *, bind: str | None = None, connect: str | None = None,
                identity: str | None = None, security: SocketSecurity | None = None,
                max_msg_bytes: int = CONTROL_MAX_MSG_BYTES) -> zmq.asyncio.Socket:
    """Create a socket of ``kind`` (``zmq.ROUTER`` ...) and bind or connect it to a ``tcp://``/``ipc://`` address,
    with ``security``'s CURVE options when given (a ``CurveServer`` needs the context's ``ZapAuthenticator``).
    ``max_msg_bytes`` (``zmq.MAXMSGSIZE``): a peer sending a larger frame is disconnected, not buffered."""
    sock = ctx.socket(kind)
    if security is not None:
        security.apply(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if bind is not None:
        sock.bind(bind)
    if connect is not None:
        sock.connect(connect)
    return sock


async def send_message(sock: zmq.asyncio.Socket, msg: Any, *, to: bytes | None = None) -> None:
    """Send ``msg`` (a registered proto message); ``to`` is the peer identity on a ROUTER socket.

    Payload frames go zero-copy; the caller must not modify them until this returns."""
    frames = proto.encode(msg)
    if to is not None:
        frames = [to, *frames]
    await sock.send_multipart(frames, copy=False)


class Received(NamedTuple):
    """One received message: ``peer`` is the ROUTER identity (None unless routed), ``user_id`` the name of the key
    that authenticated the connection (None without CURVE), ``message`` the decoded message or a ProtocolError."""

    peer: bytes | None
    user_id: str | None
    message: Any


async def recv_authenticated(sock: zmq.asyncio.Socket, *, routed: bool = False) -> Received:
    """Receive one message with the authenticated user id of the connection it came on."""
    while True:
        try:
            frames = await sock.recv_multipart(copy=False)
            break
        except zmq.Again:  # pyzmq's asyncio recv can report EAGAIN once for a large CURVE message: wait again
            continue
    identity = None
    if routed:
        identity, frames = frames[0].bytes, frames[1:]
    user_id = _user_id(frames[0]) if frames else None
    try:
        return Received(identity, user_id, proto.decode([f.buffer for f in frames]))
    except proto.ProtocolError as exc:
        return Received(identity, user_id, exc)


async def recv_message(sock: zmq.asyncio.Socket, *, routed: bool = False) -> tuple[bytes | None, Any]:
    """Receive one message. Returns (peer identity or None, message), or (identity, ProtocolError) when the frames
    could not be decoded: the caller decides whether to answer with an error or drop it."""
    peer, _, message = await recv_authenticated(sock, routed=routed)
    return peer, message


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP user id on this connection
        return None
    return user_id if isinstance(user_id, str) and user_id else None


def bind_address(addr: str) -> str:
    """The address to bind for one peers connect to: the same interface, never a wider one.

    ``tcp://127.0.0.1:5600`` binds loopback only; a host name binds the interface it resolves to; all interfaces only
    when asked for explicitly (``tcp://0.0.0.0:port`` or ``tcp://*:port``, normalised to ``*``). Other transports
    (``ipc://``, ``inproc://``) are returned unchanged."""
    if addr.startswith("tcp://"):
        host, sep, port = addr[len("tcp://"):].rpartition(":")
        if not sep or not host or not port:
            raise ValueError(f"{addr!r} is not tcp://host:port")
        if host == "0.0.0.0":
            return f"tcp://*:{port}"
    return addr
