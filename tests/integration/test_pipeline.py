"""The whole disaggregated pipeline on real processes: exactness against HF generate, the OpenAI client, no leaks,
robustness to bad frames."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
import zmq

from diptych.client import AsyncClient, Client
from tests.hf_reference import hf_greedy
from tests.integration.conftest import cluster_spec, start_cluster, wait_until_idle

pytestmark = pytest.mark.integration

# block size 16, prefill chunk budget 32: prompts below, at and above both
PROMPT_LENGTHS = [3, 15, 16, 17, 31, 33, 50, 70, 90, 8]




def random_prompts(lengths, vocab=256, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


async def run_concurrently(address: str, prompts, max_tokens: int):
    async with AsyncClient(address) as client:
        results = await asyncio.gather(*[
            client.complete(prompt_token_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            for p in prompts
        ])
    return [r.token_ids for r in results]


def test_greedy_tokens_equal_hf_generate(pd_cluster, tiny_llama):
    prompts = random_prompts(PROMPT_LENGTHS)
    got = asyncio.run(run_concurrently(pd_cluster.spec.sdk_addr, prompts, max_tokens=24))
    want = hf_greedy(tiny_llama, prompts, 24)
    assert got == want


def test_openai_client_completion_and_streamed_chat(pd_cluster):
    from openai import OpenAI

    client = OpenAI(base_url=pd_cluster.spec.http_url + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=12, stream=True,
        extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length" or any(
        c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    assert isinstance(text, str)


def test_cancelled_and_completed_requests_free_every_block(pd_cluster):
    before = wait_until_idle(pd_cluster)
    address = pd_cluster.spec.sdk_addr
    prompts = random_prompts([5, 20, 40, 70] * 4, seed=1)

    async def burst():
        async with AsyncClient(address) as client:
            async def complete(p):
                return await client.complete(prompt_token_ids=p, max_tokens=30, temperature=0.0, ignore_eos=True)

            async def cancel_after_first_chunk(p):
                async for _ in client.stream(prompt_token_ids=p, max_tokens=200, ignore_eos=True):
                    break  # leaving the iterator cancels the request

            async def cancel_early(p):
                task = asyncio.create_task(complete(p))
                await asyncio.sleep(0.01)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

            jobs = [(complete, cancel_after_first_chunk, cancel_early)[i % 3](p) for i, p in enumerate(prompts)]
            await asyncio.gather(*jobs, return_exceptions=True)

    asyncio.run(burst())

    # an HTTP client that disconnects mid-stream
    body = {"prompt": "x" * 40, "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=pd_cluster.spec.http_url, timeout=30) as http, \
            http.stream("POST", "/v1/completions",
                        json={"model": http.get("/v1/models").json()["data"][0]["id"], **body}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                break
    after = wait_until_idle(pd_cluster)
    assert {k: w["free_blocks"] for k, w in after["workers"].items()} == \
        {k: w["free_blocks"] for k, w in before["workers"].items()}


def test_garbage_frames_do_not_stop_the_cluster(pd_cluster):
    spec = pd_cluster.spec
    ctx = zmq.Context()
    try:
        for addr, kind in [(spec.addr(spec.coordinator_port), zmq.DEALER), (spec.addr(spec.kv_base_port), zmq.PUSH),
                           (spec.addr(spec.stream_port), zmq.PUSH)]:
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(addr)
            sock.send_multipart([b"\x01\x02garbage", b"more"])
            sock.send_multipart([b"\x83\xa1v\x63\xa1t\xa6cancel\xa1b\x80"])  # protocol version 99
            sock.close()
    finally:
        ctx.term()
    with Client(spec.sdk_addr) as client:
        result = client.complete(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(result.token_ids) == 4
    wait_until_idle(pd_cluster)


def test_qwen2_pipeline_matches_hf(tmp_path_factory):
    from diptych.engine.tiny_model import build_tiny_model

    path = str(tmp_path_factory.mktemp("models") / "tiny-qwen2")
    build_tiny_model(path, family="qwen2")
    cluster = start_cluster(cluster_spec(path, prefill_workers=1, decode_workers=2, policy_opts=["token_budget=32"]),
                            tmp_path_factory.mktemp("logs-qwen"))
    try:
        prompts = random_prompts([4, 17, 40, 66, 9, 33, 16, 80], seed=3)
        got = asyncio.run(run_concurrently(cluster.spec.sdk_addr, prompts, max_tokens=16))
    finally:
        cluster.stop()
    assert got == hf_greedy(path, prompts, 16)
