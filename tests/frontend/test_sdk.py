"""The SDK (diptych.client) against a real frontend process and a fake cluster: complete, stream, cancel, typed
errors, client timeouts, bad frames on the SDK socket, and the blocking Client."""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from diptych import proto
from diptych.client import AsyncClient, Client
from diptych.errors import (
    BadRequestError,
    DiptychError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    ServiceUnavailableError,
)
from tests.frontend.conftest import replying, text_ids


def out(request: proto.Request, index: int, ids: list[int], finish: str | None = None) -> proto.TokenOutput:
    return proto.TokenOutput(request_id=request.request_id, index=index, token_ids=ids, finish_reason=finish)


async def submitted(fe) -> proto.Request:
    return await asyncio.to_thread(fe.cluster.wait_submit)


async def cancelled(fe, request_id: str) -> proto.CancelRequest:
    return await asyncio.to_thread(fe.cluster.wait_cancel, request_id)


async def test_complete_and_sampling_mapping(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "héllo 🙂", finish_reason="stop")
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        done = await client.complete("ab", max_tokens=30, temperature=0.0, top_k=3, seed=9, stop="###",
                                     stop_token_ids=[5], ignore_eos=True, tier="strict", ttft_s=0.5, tbt_s=0.05)
    assert done.text == "héllo 🙂" and done.finish_reason == "stop"
    assert done.token_ids == text_ids(tokenizer, "héllo 🙂")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, len(done.token_ids))
    assert done.usage.total_tokens == 3 + len(done.token_ids)
    request = anon.cluster.wait_submit()
    assert request.sampling == proto.SamplingParams(max_tokens=30, temperature=0.0, top_k=3, seed=9, stop=["###"],
                                                    stop_token_ids=[5], ignore_eos=True)
    assert request.slo == proto.SLO(tier="strict", ttft_s=0.5, tbt_s=0.05)  # no keys: the requested tier
    assert request.client_id == "anonymous"


async def test_stop_after_tokens_is_carried_in_the_sampling_params(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "abcd")
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        await client.complete(prompt_token_ids=[1, 50], max_tokens=64, stop_after_tokens=4, ignore_eos=True)
        request = await submitted(anon)
        assert (request.sampling.max_tokens, request.sampling.stop_after_tokens) == (64, 4)
        chunks = [c async for c in client.stream("ab", max_tokens=9, stop_after_tokens=2)]
        assert chunks[-1].finish_reason is not None
        assert (await submitted(anon)).sampling.stop_after_tokens == 2


async def test_stream_with_token_ids(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "0123456789", per_batch=4)
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        chunks = [c async for c in client.stream(prompt_token_ids=[1, 50, 51], max_tokens=10)]
    assert "".join(c.text for c in chunks) == "0123456789"
    assert [c.token_ids for c in chunks] == [text_ids(tokenizer, s) for s in ("0", "1234", "5678", "9")]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 10
    assert anon.cluster.wait_submit().prompt_token_ids == [1, 50, 51]


async def test_cancel_ends_the_stream_and_cancels_in_the_cluster(anon, tokenizer):
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        stream = client.stream("x", max_tokens=50)
        first = asyncio.create_task(stream.__anext__())
        request = await submitted(anon)
        anon.cluster.push(request, out(request, 0, text_ids(tokenizer, "a")))
        assert (await first).text == "a"
        await client.cancel(stream.request_id)
        rest = [c async for c in stream]
        assert [c.finish_reason for c in rest] == ["abort"]
        assert (await cancelled(anon, request.request_id)).reason == "abort"


async def test_breaking_out_of_a_stream_cancels(anon, tokenizer):
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        async def consume_first() -> str:
            async for chunk in client.stream("x", max_tokens=50):
                return chunk.text
            return ""

        task = asyncio.create_task(consume_first())
        request = await submitted(anon)
        anon.cluster.push(request, out(request, 0, text_ids(tokenizer, "a")))
        assert await task == "a"
        assert (await cancelled(anon, request.request_id)).reason == "abort"


async def test_cancelling_the_awaiting_task_cancels(anon):
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        task = asyncio.create_task(client.complete("x"))
        request = await submitted(anon)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await cancelled(anon, request.request_id)).reason == "abort"


@pytest.mark.parametrize("code,error", [(429, RateLimitError), (503, ServiceUnavailableError),
                                        (500, ServerError)])
async def test_cluster_failures_are_typed(anon, code, error):
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        task = asyncio.create_task(client.complete("x"))
        request = await submitted(anon)
        anon.cluster.fail(request.request_id, code, "no luck", retry_after_s=1.5 if code == 429 else None)
        with pytest.raises(error) as info:
            await task
    assert info.value.status == code and info.value.message == "no luck"
    assert info.value.retry_after_s == (1.5 if code == 429 else None)


async def test_bad_requests_are_typed(anon):
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        for kwargs in [dict(prompt=""), dict(prompt_token_ids=[]), dict(prompt="x", max_tokens=0),
                       dict(prompt="x", max_tokens=600), dict(prompt_token_ids=[1, 99999]),
                       dict(prompt="x", top_p=1.5), dict(prompt="x", temperature=-1.0),
                       dict(prompt="x", stop_after_tokens=0)]:
            with pytest.raises(BadRequestError) as info:
                await client.complete(**kwargs)
            assert info.value.status == 400
        with pytest.raises(TypeError):
            await client.complete("x", frequency_penalty=1.0)
        with pytest.raises(TypeError):
            await client.complete("x", prompt_token_ids=[1])
    assert not anon.cluster.received(proto.SubmitRequest)


async def test_client_timeout_raises_and_cancels(anon):
    async with AsyncClient(anon.sdk_addr, timeout_s=0.5) as client:
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await client.complete("x")
        assert time.monotonic() - started < 5
        request = await submitted(anon)
        assert (await cancelled(anon, request.request_id)).reason == "abort"


async def test_duplicate_request_id_is_400(anon):
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        first = asyncio.create_task(client.complete("x", request_id="same"))
        request = await submitted(anon)
    # a raw connection, so the SDK's own duplicate check does not intervene
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(anon.sdk_addr)
    generate = proto.ClientGenerate(request_id="dup", prompt="x", prompt_token_ids=None,
                                    sampling=proto.SamplingParams())
    try:
        await sock.send_multipart(proto.encode(generate))
        await asyncio.to_thread(anon.cluster.wait_submit)
        await sock.send_multipart(proto.encode(generate))
        reply = proto.decode(await asyncio.wait_for(sock.recv_multipart(), 5))
        assert isinstance(reply, proto.ClientError) and (reply.request_id, reply.code) == ("dup", 400)
    finally:
        sock.close(linger=0)
        ctx.term()
    with pytest.raises(DiptychError):  # the client closed while "same" was running
        await first
    assert (await cancelled(anon, request.request_id)).reason == "abort"


async def test_malformed_frames_get_client_error_and_serving_goes_on(anon, tokenizer):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(anon.sdk_addr)
    wrong_version = msgpack.packb({"v": proto.PROTOCOL_VERSION + 1, "t": "client_cancel", "b": {"request_id": "r"}})
    bad_body = msgpack.packb({"v": proto.PROTOCOL_VERSION, "t": "client_generate", "b": {"request_id": 5}})
    not_for_us = proto.encode(proto.CancelRequest(request_id="r"))
    try:
        for frames in [[b"\xc1garbage"], [wrong_version], [bad_body], not_for_us, [b""]]:
            await sock.send_multipart(frames)
            reply = proto.decode(await asyncio.wait_for(sock.recv_multipart(), 5))
            assert isinstance(reply, proto.ClientError), reply
            assert (reply.request_id, reply.code) == ("", 400)
        assert "version" in proto.decode(await _roundtrip(sock, [wrong_version])).message
    finally:
        sock.close(linger=0)
        ctx.term()
    anon.cluster.responder = replying(tokenizer, "still here")
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        assert (await client.complete("x")).text == "still here"


async def _roundtrip(sock, frames):
    await sock.send_multipart(frames)
    return await asyncio.wait_for(sock.recv_multipart(), 5)


def test_blocking_client(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "sync works", finish_reason="stop")
    with Client(anon.sdk_addr, timeout_s=10) as client:
        assert client.complete("x").text == "sync works"
        assert "".join(c.text for c in client.stream("x")) == "sync works"
        anon.cluster.reset()  # no responder: this one waits for tokens pushed below
        stream = client.stream("x", max_tokens=40)
        assert stream.request_id
        feeder = threading.Thread(target=lambda: feed_one_token(anon, tokenizer))
        feeder.start()
        for chunk in stream:
            assert chunk.text == "a"
            break
        stream.close()
        feeder.join()
    assert anon.cluster.wait_message(proto.CancelRequest).reason == "abort"


def feed_one_token(fe, tokenizer) -> None:
    request = fe.cluster.wait_submit()
    fe.cluster.push(request, out(request, 0, text_ids(tokenizer, "a")))
