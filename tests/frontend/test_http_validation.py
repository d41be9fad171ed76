"""Bad HTTP input: OpenAI-style 400/404/401 bodies, nothing submitted to the coordinator, and the frontend serving
normally afterwards."""

from __future__ import annotations

import httpx
import pytest

from diptych import proto
from tests.frontend.conftest import replying

CONTEXT = 512  # the tiny model's max_position_embeddings

BAD_COMPLETIONS = [
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": [5] * CONTEXT}, "prompt"),
    ({"model": "tiny", "prompt": "x" * CONTEXT}, "prompt"),
    ({"model": "tiny", "prompt": [5, 9999]}, "prompt"),
    ({"model": "tiny", "prompt": [5, -1]}, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "tiny", "prompt": [[5], [6]]}, "prompt"),
    ({"model": "tiny", "prompt": 5}, "prompt"),
    ({"model": "tiny", "prompt": [True]}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT}, "max_tokens"),
    ({"model": "tiny", "prompt": [5] * 500, "max_tokens": 13}, "max_tokens"),
    ({"model": "tiny", "prompt": [5] * 500}, "max_tokens"),  # the default 16 does not fit either
    ({"model": "tiny", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "top_k": -5}, "top_k"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "tiny", "prompt": "hi", "stop": [1, 2]}, "stop"),
    ({"model": "tiny", "prompt": "hi", "stop_token_ids": [100000]}, "stop_token_ids"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, "n"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 5}, "logprobs"),
    ({"model": "tiny", "prompt": "hi", "seed": "abc"}, "seed"),
    ({"model": "tiny", "prompt": "hi", "stop_after_tokens": 0}, "stop_after_tokens"),
    ({"model": "tiny", "prompt": "hi", "stop_after_tokens": -2}, "stop_after_tokens"),
    ({"model": "tiny", "prompt": "hi", "stop_after_tokens": "5"}, "stop_after_tokens"),
    ({"model": "tiny", "prompt": "hi", "stop_after_tokens": 2.0}, "stop_after_tokens"),
    ({"model": "tiny", "prompt": "hi", "stop_after_tokens": True}, "stop_after_tokens"),
    ({"model": "tiny", "prompt": "hi", "stop_after_tokens": 2 ** 20 + 1}, "stop_after_tokens"),
    ({"model": "tiny"}, "prompt"),
]

BAD_CHATS = [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": "hi"}, "messages"),
    ({"model": "tiny", "messages": [{"content": "no role"}]}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * CONTEXT}]}, "prompt"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": CONTEXT},
     "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop_after_tokens": 0}, "stop_after_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop_after_tokens": "3"},
     "stop_after_tokens"),
]


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_bad_completion_is_400(anon, body, param):
    resp = httpx.post(anon.http_url + "/v1/completions", json=body, timeout=10)
    error = assert_openai_error(resp, 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", BAD_CHATS)
def test_bad_chat_is_400(anon, body, param):
    assert_openai_error(httpx.post(anon.http_url + "/v1/chat/completions", json=body, timeout=10), 400, param)


def test_batched_prompt_message(anon):
    resp = httpx.post(anon.http_url + "/v1/completions", json={"prompt": ["a", "b"]}, timeout=10)
    assert "batched prompts not supported" in assert_openai_error(resp, 400)["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\"text\"", b""])
def test_malformed_body_is_400(anon, raw):
    resp = httpx.post(anon.http_url + "/v1/completions", content=raw,
                      headers={"content-type": "application/json"}, timeout=10)
    assert_openai_error(resp, 400)


def test_unknown_model_is_404(anon):
    for path, body in [("/v1/completions", {"model": "gpt-9", "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})]:
        error = assert_openai_error(httpx.post(anon.http_url + path, json=body, timeout=10), 404, "model")
        assert error["code"] == "model_not_found"


def test_unknown_route_is_openai_style_404(anon):
    assert_openai_error(httpx.get(anon.http_url + "/v2/nothing", timeout=10), 404)


def test_bad_input_never_reaches_the_coordinator_and_serving_goes_on(anon, tokenizer):
    for body, _ in BAD_COMPLETIONS[:5]:
        httpx.post(anon.http_url + "/v1/completions", json=body, timeout=10)
    anon.cluster.responder = replying(tokenizer, "fine")
    resp = httpx.post(anon.http_url + "/v1/completions", json={"model": "tiny", "prompt": "ok"}, timeout=10)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "fine"
    submits = anon.cluster.received(proto.SubmitRequest)
    assert len(submits) == 1 and submits[0].request.prompt_token_ids[1:] == [3 + ord("o"), 3 + ord("k")]


def test_models_and_health(anon):
    models = httpx.get(anon.http_url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == CONTEXT
    health = httpx.get(anon.http_url + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["prefill_workers"] == 1 and health.json()["decode_workers"] == 1
    assert httpx.get(anon.http_url + "/admin/status", timeout=10).json()["frontend"]["running_requests"] == 0


def test_health_is_503_when_the_coordinator_does_not_answer(anon):
    anon.cluster.answer_status = False
    resp = httpx.get(anon.http_url + "/health", timeout=10)
    assert resp.status_code == 503 and resp.json()["status"] == "coordinator unreachable"
