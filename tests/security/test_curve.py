"""CURVE on real ZeroMQ sockets: only the cluster's keys reach a server socket, and each message carries the name
of the key that sent it."""

from __future__ import annotations

import asyncio
import logging
import stat

import pytest
import zmq
import zmq.asyncio

from diptych import proto
from diptych.services.common.security import CurveClient, KeyPair, KeySet, ZapAuthenticator, generate_key_set
from diptych.services.common.sockets import (
    KV_MAX_MSG_BYTES,
    make_socket,
    recv_authenticated,
    recv_message,
    send_message,
)

NO_ANSWER_S = 1.0


@pytest.fixture
def keys(tmp_path) -> KeySet:
    return generate_key_set(tmp_path / "keys", ["coordinator", "frontend", "prefill-0"])


def test_generate_writes_secrets_private_and_keeps_existing_keys(tmp_path, keys):
    root = tmp_path / "keys"
    assert keys.names() == ["coordinator", "frontend", "prefill-0"]
    assert stat.S_IMODE((root / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "private" / "frontend.key_secret").stat().st_mode) == 0o600
    assert "secret-key" not in (root / "public" / "frontend.key").read_text()
    again = generate_key_set(root, ["frontend", "decode-0"])
    assert again.public_key("frontend") == keys.public_key("frontend")
    assert again.names() == ["coordinator", "decode-0", "frontend", "prefill-0"]
    pair = again.own("decode-0")
    assert again.name_of(pair.public) == "decode-0" and len(pair.secret) == 40


def test_load_rejects_what_is_not_a_key_set(tmp_path, keys):
    with pytest.raises(ValueError):
        KeySet.load(tmp_path)
    with pytest.raises(KeyError, match="known: coordinator"):
        keys.public_key("decode-7")
    with pytest.raises(ValueError, match="invalid key name"):
        generate_key_set(tmp_path / "keys", ["../evil"])
    (tmp_path / "keys" / "private" / "prefill-0.key_secret").unlink()
    with pytest.raises(ValueError, match="prefill-0"):
        keys.own("prefill-0")


def test_a_secret_readable_by_others_is_warned_about(tmp_path, keys, caplog):
    (tmp_path / "keys" / "private" / "frontend.key_secret").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="diptych.services.common.security"):
        keys.own("frontend")
    assert "chmod 600" in caplog.text


async def _exchange(keys: KeySet, client_security, *, authenticator: bool = True):
    """A CURVE ROUTER (the coordinator) and one DEALER with ``client_security``; returns what the server received
    within NO_ANSWER_S (or None) and the authenticator's refusal count."""
    ctx = zmq.asyncio.Context()
    auth = ZapAuthenticator(ctx, keys)
    if authenticator:
        auth.start()
    server = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0", security=keys.server("coordinator"))
    address = server.getsockopt_string(zmq.LAST_ENDPOINT)
    client = make_socket(ctx, zmq.DEALER, connect=address, identity="w", security=client_security)
    try:
        await send_message(client, proto.StatusQuery())
        try:
            received = await asyncio.wait_for(recv_authenticated(server, routed=True), NO_ANSWER_S)
        except asyncio.TimeoutError:
            received = None
        return received, auth.refused
    finally:
        client.close(linger=0)
        server.close(linger=0)
        await auth.stop()
        ctx.term()


def test_a_client_with_the_cluster_key_gets_through_named(keys):
    received, refused = asyncio.run(_exchange(keys, keys.client("frontend", "coordinator")))
    assert received is not None and refused == 0
    assert received.peer == b"w" and received.user_id == "frontend"
    assert isinstance(received.message, proto.StatusQuery)


def test_a_client_without_keys_gets_no_answer(keys):
    received, _ = asyncio.run(_exchange(keys, None))  # a plaintext peer fails the CURVE handshake
    assert received is None


def test_a_key_outside_the_set_is_refused_and_logged(keys, caplog):
    public, secret = zmq.curve_keypair()
    stranger = CurveClient(KeyPair("stranger", public, secret), keys.public_key("coordinator"))
    with caplog.at_level(logging.WARNING, logger="diptych.services.common.security"):
        received, refused = asyncio.run(_exchange(keys, stranger))
    assert received is None and refused >= 1
    assert f"key {public.decode()} is not in the cluster's key set" in caplog.text
    assert "127.0.0.1" in caplog.text


def test_a_client_expecting_another_server_key_gets_nothing(keys):
    received, _ = asyncio.run(_exchange(keys, keys.client("frontend", "prefill-0")))
    assert received is None


def test_without_an_authenticator_curve_servers_admit_nobody(keys):
    received, _ = asyncio.run(_exchange(keys, keys.client("frontend", "coordinator"), authenticator=False))
    assert received is None


def test_plain_sockets_carry_no_user_id():
    async def main():
        ctx = zmq.asyncio.Context()
        pull = make_socket(ctx, zmq.PULL, bind="tcp://127.0.0.1:0")
        push = make_socket(ctx, zmq.PUSH, connect=pull.getsockopt_string(zmq.LAST_ENDPOINT))
        await send_message(push, proto.StatusQuery())
        received = await asyncio.wait_for(recv_authenticated(pull), 5)
        await send_message(push, proto.StatusQuery())
        plain = await asyncio.wait_for(recv_message(pull), 5)
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
        return received, plain

    received, plain = asyncio.run(main())
    assert received.user_id is None and isinstance(received.message, proto.StatusQuery)
    assert plain[0] is None and isinstance(plain[1], proto.StatusQuery)


def test_an_authenticator_bound_before_the_loop_admits_once_it_serves(keys):
    ctx = zmq.asyncio.Context()
    auth = ZapAuthenticator(ctx, keys)
    auth.bind()  # as a service does when it makes its sockets before its loop runs
    server = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0", security=keys.server("coordinator"))
    client = make_socket(ctx, zmq.DEALER, connect=server.getsockopt_string(zmq.LAST_ENDPOINT), identity="p",
                         security=keys.client("prefill-0", "coordinator"))

    async def main():
        serving = asyncio.create_task(auth.serve())
        await send_message(client, proto.StatusQuery())
        received = await asyncio.wait_for(recv_authenticated(server, routed=True), 5)
        serving.cancel()
        await auth.stop()
        return received

    try:
        received = asyncio.run(main())
    finally:
        client.close(linger=0)
        server.close(linger=0)
        ctx.term()
    assert received.user_id == "prefill-0"


def test_a_kv_sized_message_arrives_over_curve(keys):
    """Frames of a large model's KV blocks (2 MiB each) through asyncio CURVE sockets (pyzmq can report EAGAIN once
    for such a message: ``recv_authenticated`` waits again)."""

    async def main():
        server_ctx, client_ctx = zmq.asyncio.Context(), zmq.asyncio.Context()
        auth = ZapAuthenticator(server_ctx, keys)
        auth.start()
        pull = make_socket(server_ctx, zmq.PULL, bind="tcp://127.0.0.1:0", max_msg_bytes=KV_MAX_MSG_BYTES,
                           security=keys.server("coordinator"))
        push = make_socket(client_ctx, zmq.PUSH, connect=pull.getsockopt_string(zmq.LAST_ENDPOINT),
                           security=keys.client("prefill-0", "coordinator"))
        try:
            await push.send_multipart([*proto.encode(proto.StatusQuery()), *(bytes(2 << 20) for _ in range(4))])
            return await asyncio.wait_for(recv_authenticated(pull), 10)
        finally:
            push.close(linger=0)
            pull.close(linger=0)
            await auth.stop()
            server_ctx.term()
            client_ctx.term()

    received = asyncio.run(main())
    assert received.user_id == "prefill-0"
