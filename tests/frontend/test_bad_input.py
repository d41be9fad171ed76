"""Bad input on a real frontend process: every case is a 4xx with an OpenAI-shaped JSON error (HTTP) or a
``ClientError`` (SDK), never a 500 or a dead process, and the frontend serves the next request normally.

The slow-tokenizer case runs its own frontend with a huge ``--max-model-len`` so a multi-megabyte prompt passes the
character check and really gets tokenized: meanwhile another request's stream must keep flowing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import msgpack
import pytest
import zmq

from diptych import proto
from tests.frontend.conftest import _launch, _stop, _wait_ready, replying

SURROGATE = "a\ud800b"


def raw_json(body: dict) -> bytes:
    """JSON with lone surrogates spelled as ``\\ud800`` escapes (what a client can send on the wire)."""
    return json.dumps(body, ensure_ascii=True).encode()


def post(fe, path: str, body: dict | bytes, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return httpx.post(fe.http_url + path, content=content, json=None if content else body,
                      headers={"Content-Type": "application/json"}, timeout=30, **kwargs)


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= error.keys()
    return error


def assert_still_serving(fe, tokenizer) -> None:
    fe.cluster.responder = replying(tokenizer, "fine")
    resp = httpx.post(fe.http_url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "fine"
    assert fe.proc.poll() is None


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "stop": [SURROGATE]}),
    ("/v1/completions", {"prompt": "hi", "stop": SURROGATE}),
    ("/v1/completions", {"prompt": SURROGATE}),
    ("/v1/completions", {"prompt": [SURROGATE]}),
    ("/v1/completions", {"prompt": "hi", "model": SURROGATE}),
    ("/v1/completions", {"prompt": "hi", "user": SURROGATE}),
    ("/v1/completions", {"prompt": "hi", "diptych": {"tier": SURROGATE}}),
    ("/v1/completions", {"prompt": "hi", SURROGATE: 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}),
    ("/v1/chat/completions", {"messages": [{"role": SURROGATE, "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}),
    ("/v1/chat/completions", {"model": SURROGATE, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [SURROGATE]}),
])
def test_lone_surrogates_are_a_400(anon, tokenizer, path, body):
    error = assert_openai_error(post(anon, path, raw_json(body)), 400)
    assert "surrogate" in error["message"]
    assert anon.cluster.received(proto.SubmitRequest) == []
    assert_still_serving(anon, tokenizer)


def test_an_echoed_bad_model_name_is_escaped_and_clipped(anon):
    error = assert_openai_error(post(anon, "/v1/completions", {"prompt": "hi", "model": "m" * 100_000}), 404)
    assert len(error["message"]) < 1000


def test_a_huge_prompt_is_refused_without_tokenizing(anon, tokenizer):
    started = time.monotonic()
    error = assert_openai_error(post(anon, "/v1/completions", {"prompt": "x" * 10_000_000}), 400)
    assert time.monotonic() - started < 5.0  # the blocking tokenizer took 15 s on this input
    assert error["param"] == "prompt" and "characters" in error["message"]
    error = assert_openai_error(post(anon, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x" * 10_000_000}]}), 400)
    assert error["param"] == "messages"
    assert_still_serving(anon, tokenizer)


def test_a_body_over_the_limit_is_a_413(anon, tokenizer):
    huge = b'{"prompt": "x", "user": "' + b"u" * (17 << 20) + b'"}'
    assert_openai_error(post(anon, "/v1/completions", huge), 413)

    def chunked():
        yield b'{"prompt": "x", "user": "'
        for _ in range(17):
            yield b"u" * (1 << 20)
        yield b'"}'

    resp = httpx.post(anon.http_url + "/v1/completions", content=chunked(),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert_openai_error(resp, 413)
    assert_still_serving(anon, tokenizer)


def test_long_user_and_role_are_a_400(anon):
    assert_openai_error(post(anon, "/v1/completions", {"prompt": "hi", "user": "u" * 1_000_000}), 400)
    assert_openai_error(post(anon, "/v1/chat/completions", {"messages": [{"role": "r" * 1000, "content": "x"}]}),
                        400)


def test_too_many_or_too_long_stop_strings_are_a_400(anon):
    for stop in (["s"] * 65, ["s" * 1025]):
        error = assert_openai_error(post(anon, "/v1/completions", {"prompt": "hi", "stop": stop}), 400)
        assert error["param"] == "stop"


# ---------------------------------------------------------------- SDK socket


def sdk_exchange(fe, frames: list[bytes]) -> proto.ClientError:
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fe.sdk_addr)
    try:
        sock.send_multipart(frames)
        assert sock.poll(20_000), "no answer from the SDK endpoint"
        reply = proto.decode(sock.recv_multipart())
    finally:
        sock.close()
    assert isinstance(reply, proto.ClientError), reply
    return reply


def generate_frame(**fields) -> bytes:
    body = {"request_id": "r1", "prompt": "hi", "prompt_token_ids": None, "sampling": {}, **fields}
    return msgpack.packb({"v": proto.PROTOCOL_VERSION, "t": "client_generate", "b": body}, use_bin_type=True)


@pytest.mark.parametrize("fields", [
    {"request_id": "r" * (1 << 20)},
    {"request_id": ""},
    {"api_key": "k" * (2 << 20)},
    {"sampling": {"stop": ["s"] * 100_000}},
    {"prompt_token_ids": [-1], "prompt": None},
])
def test_sdk_oversized_or_out_of_range_fields_are_a_400(anon, tokenizer, fields):
    reply = sdk_exchange(anon, [generate_frame(**fields)])
    assert reply.code == 400
    assert_still_serving(anon, tokenizer)


def test_sdk_frames_over_the_socket_limit_are_dropped(anon, tokenizer):
    """A 100 MB request id never reaches the decoder: the socket's MAXMSGSIZE disconnects that peer."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(anon.sdk_addr)
    try:
        sock.send_multipart([generate_frame(request_id="r" * (100 << 20))])
        assert not sock.poll(2000)
    finally:
        sock.close()
    assert_still_serving(anon, tokenizer)


def test_sdk_invalid_utf8_and_a_huge_prompt_are_a_400(anon, tokenizer):
    bad_utf8 = generate_frame(prompt="hi").replace(b"\xa2hi", b"\xa2\xed\xa0")  # "hi" -> an encoded lone surrogate
    assert sdk_exchange(anon, [bad_utf8]).code == 400
    reply = sdk_exchange(anon, [generate_frame(prompt="x" * 6_000_000)])
    assert (reply.request_id, reply.code) == ("r1", 400) and "characters" in reply.message
    assert_still_serving(anon, tokenizer)


def test_sdk_stop_string_over_the_wire_limit_is_a_400(anon):
    reply = sdk_exchange(anon, [generate_frame(sampling={"stop": ["s" * 2000]})])
    assert reply.code == 400


# ---------------------------------------------------------------- tokenizing off the event loop


@pytest.fixture(scope="module")
def long_context(tiny_model, tmp_path_factory):
    """A frontend whose context is far beyond the tiny model's, so megabyte prompts are really tokenized."""
    fe = _launch(tiny_model, str(tmp_path_factory.mktemp("long")), "long", "--max-model-len", "1000000",
                 "--max-body-bytes", str(64 << 20))
    try:
        _wait_ready(fe)
        yield fe
    finally:
        _stop(fe)


@pytest.mark.slow
async def test_streams_keep_flowing_while_a_large_prompt_is_tokenized(long_context, tokenizer):
    fe = long_context
    fe.cluster.reset()
    token = tokenizer("a", add_special_tokens=False).input_ids[0]
    gaps: list[float] = []

    async def stream_one() -> None:
        async with httpx.AsyncClient(timeout=60) as http, http.stream(
                "POST", fe.http_url + "/v1/completions",
                json={"prompt": "x", "stream": True, "max_tokens": 10_000}) as resp:
            last = None
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    streamer = asyncio.create_task(stream_one())
    request = await asyncio.to_thread(fe.cluster.wait_submit)
    stop_pushing = threading.Event()

    def push_tokens() -> None:
        index = 0
        while not stop_pushing.is_set():
            fe.cluster.push(request, proto.TokenOutput(request_id=request.request_id, index=index, token_ids=[token]))
            index += 1
            time.sleep(0.02)
        fe.cluster.push(request, proto.TokenOutput(request_id=request.request_id, index=index, token_ids=[token],
                                                   finish_reason="length"))

    pusher = threading.Thread(target=push_tokens, daemon=True)
    pusher.start()
    await asyncio.sleep(0.5)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as http:
        big = await http.post(fe.http_url + "/v1/completions", json={"prompt": "word " * 600_000, "max_tokens": 1})
    tokenize_s = time.monotonic() - started
    stop_pushing.set()
    await streamer
    pusher.join()
    assert big.status_code == 400 and "tokens" in big.json()["error"]["message"], big.text  # 3M tokens > 1M
    assert tokenize_s > 1.0, "the prompt was too small to measure a stall"
    print(f"large prompt answered after {tokenize_s:.2f} s; longest gap between stream tokens {max(gaps):.3f} s")
    assert max(gaps) < min(0.5, tokenize_s / 4)
