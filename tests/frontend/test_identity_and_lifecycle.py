"""API keys -> client identities (HTTP and SDK), the frontend's own request timeout, per-request log lines, and a
clean SIGTERM shutdown with requests in flight."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from diptych import proto
from diptych.client import AsyncClient
from diptych.errors import AuthenticationError, ServiceUnavailableError
from tests.frontend.conftest import replying

BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-mallory"}, {"Authorization": "sk-alice"}])
def test_missing_or_unknown_key_is_401(keyed, headers):
    for method, path, body in [("POST", "/v1/completions", BODY), ("GET", "/v1/models", None)]:
        resp = httpx.request(method, keyed.http_url + path, json=body, headers=headers, timeout=10)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.http_url + "/health", timeout=10).status_code == 200  # health needs no key
    assert not keyed.cluster.received(proto.SubmitRequest)


def test_openai_client_with_a_bad_key(keyed):
    client = openai.OpenAI(base_url=keyed.http_url + "/v1", api_key="sk-mallory", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=4)


def test_http_key_sets_client_identity(keyed, tokenizer):
    keyed.cluster.responder = replying(tokenizer, "ok")
    client = openai.OpenAI(base_url=keyed.http_url + "/v1", api_key="sk-alice", max_retries=0)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=4).choices[0].text == "ok"
    request = keyed.cluster.wait_submit()
    assert (request.client_id, request.weight, request.slo.tier) == ("alice", 2.0, "strict")


async def test_sdk_key_sets_client_identity_and_cannot_promote_its_tier(keyed, tokenizer):
    keyed.cluster.responder = replying(tokenizer, "ok")
    async with AsyncClient(keyed.sdk_addr, api_key="sk-bob", timeout_s=10) as client:
        assert (await client.complete("hi", tier="strict", tbt_s=0.3)).text == "ok"
    request = keyed.cluster.wait_submit()
    assert (request.client_id, request.weight) == ("bob", 1.0)
    assert request.slo == proto.SLO(tier="default", tbt_s=0.3)  # its own tier, a looser target of its own
    for key in (None, "sk-mallory"):
        async with AsyncClient(keyed.sdk_addr, api_key=key, timeout_s=10) as client:
            with pytest.raises(AuthenticationError) as info:
                await client.complete("hi")
        assert info.value.status == 401


async def test_request_without_output_times_out_with_504_and_cancel(keyed):
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(keyed.http_url + "/v1/completions", json=BODY,
                               headers={"Authorization": "Bearer sk-alice"})
    assert resp.status_code == 504 and 1.5 < time.monotonic() - started < 8
    request = keyed.cluster.wait_submit()
    assert keyed.cluster.wait_cancel(request.request_id).reason == "timeout"


def test_one_log_line_at_admission_and_at_finish(anon, tokenizer):
    anon.cluster.responder = replying(tokenizer, "logged", finish_reason="stop")
    resp = httpx.post(anon.http_url + "/v1/completions", json=BODY | {"max_tokens": 10}, timeout=10)
    request_id = resp.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while f"req={request_id} finished" not in anon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in anon.log().splitlines() if f"req={request_id}" in line and "INFO" in line]
    assert len(lines) == 2, lines
    assert "admitted via http client=anonymous prompt_tokens=3 max_tokens=10" in lines[0]
    assert "finished client=anonymous prompt_tokens=3 output_tokens=6 finish=stop ttft=" in lines[1]
    assert "latency=" in lines[1]


async def test_sigterm_fails_running_requests_and_exits_cleanly(disposable):
    async with httpx.AsyncClient(timeout=15) as http, AsyncClient(disposable.sdk_addr, timeout_s=15) as sdk:
        http_task = asyncio.create_task(http.post(disposable.http_url + "/v1/completions", json=BODY | {
            "stream": True}))
        sdk_task = asyncio.create_task(sdk.complete("hi"))
        requests = [await asyncio.to_thread(disposable.cluster.wait_submit) for _ in range(2)]
        disposable.proc.terminate()
        resp = await http_task
        assert resp.status_code == 503 and "shutting down" in resp.json()["error"]["message"]
        with pytest.raises(ServiceUnavailableError):
            await sdk_task
    for request in requests:
        assert disposable.cluster.wait_cancel(request.request_id).reason == "abort"
    assert await asyncio.to_thread(disposable.proc.wait, 15) == 0
    assert "stopped" in disposable.log()
