"""Generation over HTTP against a fake coordinator and fake workers: response and SSE shapes, the official openai
client, out-of-order token outputs, UTF-8 safety, stop strings, failures, client disconnects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from diptych import proto
from tests.frontend.conftest import replying, text_ids

pytestmark = pytest.mark.asyncio

CHAT = [{"role": "user", "content": "Hi!"}]


def sse_events(raw: str) -> list:
    """Parse an SSE body: every event is ``data: <json>`` (or ``[DONE]``), separated by blank lines."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def out(request: proto.Request, index: int, ids: list[int], finish: str | None = None) -> proto.TokenOutput:
    return proto.TokenOutput(request_id=request.request_id, index=index, token_ids=ids, finish_reason=finish,
                             timestamps=[time.time()] * len(ids))


async def submitted(fe) -> proto.Request:
    return await asyncio.to_thread(fe.cluster.wait_submit)


async def cancelled(fe, request_id: str) -> proto.CancelRequest:
    return await asyncio.to_thread(fe.cluster.wait_cancel, request_id)


async def test_completion_body_and_submitted_request(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "Hello, world", finish_reason="stop")
    started = time.time()
    resp = httpx.post(anon.http_url + "/v1/completions", timeout=10, json={
        "model": "tiny", "prompt": "Say hi", "max_tokens": 20, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
        "seed": 42, "stop": "zzz", "stop_token_ids": [10, 11], "ignore_eos": True, "user": "ignored"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"] == "cmpl-" + resp.headers["x-request-id"]
    assert body["choices"] == [{"index": 0, "text": "Hello, world", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}
    request = anon.cluster.wait_submit()
    assert request.request_id == resp.headers["x-request-id"]
    assert request.client_id == "anonymous" and request.weight == 1.0 and request.slo.tier == "default"
    assert request.prompt_token_ids == [tokenizer.bos_token_id, *text_ids(tokenizer, "Say hi")]
    assert request.stream_addr == anon.stream_addr
    assert started - 1 <= request.arrival_time <= time.time()
    assert request.sampling == proto.SamplingParams(max_tokens=20, temperature=0.5, top_p=0.9, top_k=7, seed=42,
                                                    stop=["zzz"], stop_token_ids=[10, 11], ignore_eos=True)
    assert not anon.cluster.received(proto.CancelRequest)  # it finished: nothing to cancel


async def test_completion_sse_shape(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "abcdefg")
    resp = httpx.post(anon.http_url + "/v1/completions", timeout=10, json={
        "model": "tiny", "prompt": [1, 70], "max_tokens": 7, "stream": True,
        "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and chunk["model"] == "tiny" and chunk["usage"] is None
        assert chunk["id"] == chunks[0]["id"] and chunk["id"].startswith("cmpl-")
        assert set(chunk["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abcdefg"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}


async def test_chat_sse_shape_and_chat_template(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "Yo!", finish_reason="stop")
    resp = httpx.post(anon.http_url + "/v1/chat/completions", timeout=10, json={
        "model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
        "stream": True})
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Yo!"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    request = anon.cluster.wait_submit()
    rendered = tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)
    assert rendered == "system: Be brief.\nuser: Hi!\nassistant: "
    assert request.sampling.max_tokens == 512 - len(request.prompt_token_ids)  # chat default: the rest


async def test_openai_client_completion_and_streamed_chat(anon, tokenizer):
    client = openai.AsyncOpenAI(base_url=anon.http_url + "/v1", api_key="unused", max_retries=0)
    anon.cluster.responder = replying(tokenizer, "Grüße 👋", finish_reason="stop")
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    completion = await client.completions.create(model="tiny", prompt="Hello", max_tokens=16)
    assert completion.choices[0].text == "Grüße 👋" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 6 and completion.usage.completion_tokens == len("Grüße 👋".encode())
    stream = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=30, stream=True,
                                                  extra_body={"top_k": 5})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Grüße 👋"
    assert chunks[-1].choices[0].finish_reason == "stop"
    chat = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=30)
    assert chat.choices[0].message.content == "Grüße 👋" and chat.choices[0].message.role == "assistant"
    await client.close()


async def test_stop_after_tokens_reaches_the_sampling_params(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "abc")
    resp = httpx.post(anon.http_url + "/v1/completions", timeout=10, json={
        "model": "tiny", "prompt": [1, 70], "max_tokens": 40, "stop_after_tokens": 3, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    sampling = anon.cluster.wait_submit().sampling
    assert (sampling.max_tokens, sampling.stop_after_tokens, sampling.ignore_eos) == (40, 3, True)
    client = openai.AsyncOpenAI(base_url=anon.http_url + "/v1", api_key="unused", max_retries=0)
    await client.chat.completions.create(model="tiny", messages=CHAT, extra_body={"stop_after_tokens": 2})
    sampling = (await submitted(anon)).sampling
    assert sampling.stop_after_tokens == 2 and sampling.max_tokens > 2  # chat default: the rest of the context
    await client.completions.create(model="tiny", prompt="Hello", max_tokens=5)
    assert (await submitted(anon)).sampling.stop_after_tokens is None  # absent: off
    await client.close()


async def test_openai_client_sees_typed_errors(anon):
    client = openai.AsyncOpenAI(base_url=anon.http_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="tiny", prompt="", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="hi", max_tokens=4)
    await client.close()


async def test_out_of_order_outputs_are_reassembled(anon, tokenizer):
    async with httpx.AsyncClient(timeout=10) as http:
        task = asyncio.create_task(http.post(anon.http_url + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "max_tokens": 9, "stream": True}))
        request = await submitted(anon)
        ids = text_ids(tokenizer, "012345678")
        # decode-worker outputs overtake the prefill worker's first token; one is duplicated
        anon.cluster.push(request, out(request, 4, ids[4:7]), out(request, 1, ids[1:4]))
        anon.cluster.push(request, out(request, 7, ids[7:9], "length"), out(request, 1, ids[1:4]))
        anon.cluster.push(request, out(request, 0, ids[0:1]))
        events = sse_events((await task).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "012345678"


async def test_streamed_text_never_splits_a_character(anon, tokenizer):
    text = "é世🙂👍🏽界"
    async with httpx.AsyncClient(timeout=10) as http:
        task = asyncio.create_task(http.post(anon.http_url + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "max_tokens": 40, "stream": True}))
        request = await submitted(anon)
        ids = text_ids(tokenizer, text)
        for i in range(len(ids)):  # one byte per output, each its own message
            anon.cluster.push(request, out(request, i, ids[i:i + 1], "length" if i == len(ids) - 1 else None))
        raw = (await task).content
    pieces = [e["choices"][0]["text"] for e in sse_events(raw.decode("utf-8"))[:-1]]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["é", "世", "🙂", "👍", "🏽", "界"]


async def test_stop_string_cuts_output_and_cancels(anon, tokenizer):
    async with httpx.AsyncClient(timeout=10) as http:
        task = asyncio.create_task(http.post(anon.http_url + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "max_tokens": 50, "stop": ["END", "never"]}))
        request = await submitted(anon)
        ids = text_ids(tokenizer, "abc EN")
        anon.cluster.push(request, out(request, 0, ids[:1]), out(request, 1, ids[1:]))
        more = text_ids(tokenizer, "D and more")
        anon.cluster.push(request, out(request, len(ids), more))
        body = (await task).json()
        cancel = await cancelled(anon, request.request_id)
    assert cancel.reason == "stop"
    assert body["choices"][0]["text"] == "abc " and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(ids) + 1  # up to the token that completed the stop string


async def test_stop_token_is_not_in_the_text(anon, tokenizer):
    async with httpx.AsyncClient(timeout=10) as http:
        task = asyncio.create_task(http.post(anon.http_url + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "stop_token_ids": [3 + ord(";")]}))
        request = await submitted(anon)
        anon.cluster.push(request, out(request, 0, text_ids(tokenizer, "ab;"), "stop"))
        body = (await task).json()
    assert body["choices"][0]["text"] == "ab" and body["usage"]["completion_tokens"] == 3


async def test_rate_limited_request_is_429_with_retry_after(anon):
    async with httpx.AsyncClient(timeout=10) as http:
        for stream in (False, True):
            task = asyncio.create_task(http.post(anon.http_url + "/v1/completions", json={
                "model": "tiny", "prompt": "x", "stream": stream}))
            request = await submitted(anon)
            anon.cluster.fail(request.request_id, 429, "client over its rate", retry_after_s=2.4)
            resp = await task
            assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
            assert resp.json()["error"]["type"] == "rate_limit_error"
            assert "client over its rate" in resp.json()["error"]["message"]
    assert not anon.cluster.received(proto.CancelRequest)


async def test_failure_mid_stream_is_an_sse_error_event(anon, tokenizer):
    async with httpx.AsyncClient(timeout=10) as http:
        task = asyncio.create_task(http.post(anon.http_url + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "stream": True}))
        request = await submitted(anon)
        anon.cluster.push(request, out(request, 0, text_ids(tokenizer, "a")))
        await asyncio.sleep(0.2)
        anon.cluster.fail(request.request_id, 503, "decode worker lost")
        resp = await task
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert events[0]["choices"][0]["text"] == "a"
    assert events[-2]["error"]["message"] == "decode worker lost" and events[-1] == "[DONE]"


async def test_client_disconnect_mid_stream_cancels(anon, tokenizer):
    async def read_one_event_and_leave(http: httpx.AsyncClient) -> str:
        async with http.stream("POST", anon.http_url + "/v1/chat/completions", json={
                "model": "tiny", "messages": CHAT, "stream": True}) as resp:
            return await resp.aiter_lines().__anext__()  # leaving the block closes the connection

    async with httpx.AsyncClient(timeout=10) as http:
        task = asyncio.create_task(read_one_event_and_leave(http))
        request = await submitted(anon)
        anon.cluster.push(request, out(request, 0, text_ids(tokenizer, "a")))
        assert (await task).startswith("data: ")
        cancel = await cancelled(anon, request.request_id)
    assert cancel.reason == "abort"


async def test_client_disconnect_while_waiting_cancels(anon):
    for stream in (False, True):
        async with httpx.AsyncClient(timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(anon.http_url + "/v1/completions", json={
                    "model": "tiny", "prompt": "x", "stream": stream})
        request = await submitted(anon)
        assert (await cancelled(anon, request.request_id)).reason == "abort"
    health = httpx.get(anon.http_url + "/health", timeout=5).json()
    assert health["running_requests"] == 0


async def test_outputs_for_unknown_requests_are_dropped(anon, tokenizer):
    ghost = proto.Request(request_id="ghost", client_id="x", prompt_token_ids=[1], sampling=proto.SamplingParams(),
                          arrival_time=time.time(), stream_addr=anon.stream_addr)
    anon.cluster.push(ghost, out(ghost, 0, [70], "length"))
    anon.cluster.responder = replying(tokenizer, "alive")
    resp = httpx.post(anon.http_url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert resp.json()["choices"][0]["text"] == "alive"
