"""KV memory on demand, served by real processes: pools far smaller than the requests' outputs, requests preempted
and recomputed on colocated and on decode workers, every stream exact and continuous, every block back, and chat
requests without max_tokens served (not refused) on a pool much smaller than the context."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from diptych.client import AsyncClient
from tests.hf_reference import hf_greedy
from tests.integration.conftest import cluster_spec, cluster_status, start_cluster, wait_until_idle

pytestmark = pytest.mark.integration

NEW_TOKENS = 60
POOL_BLOCKS = 14
"""14 blocks of 16 tokens: 224 positions for six requests that reach ~80 each (and the watermark is 0 blocks)."""


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in lengths]


async def stream_all(address: str, batch: list[list[int]]) -> list[tuple[list[int], int, dict]]:
    """Stream every prompt at once; per request its streamed token ids, the completion tokens its usage counts, and
    its timeline."""
    async with AsyncClient(address, timeout_s=180) as client:
        async def one(prompt):
            tokens, counted, timeline = [], 0, {}
            async for chunk in client.stream(prompt_token_ids=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                                             ignore_eos=True):
                tokens += chunk.token_ids
                if chunk.usage is not None:
                    counted = chunk.usage.completion_tokens
                timeline = chunk.timeline or timeline
            return tokens, counted, timeline

        return await asyncio.gather(*[one(p) for p in batch])


HEARTBEAT_S = 0.5
"""The workers' heartbeat interval (their default): their counters in /admin/status trail the responses by one."""


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> str:
    from diptych.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", family="qwen2")


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("layout", ["colocated", "disaggregated"])
def test_preempted_requests_stream_the_greedy_tokens(family, layout, request, tmp_path):
    model = request.getfixturevalue(family)
    workers = (dict(prefill_workers=0, decode_workers=0, colocated_workers=1) if layout == "colocated"
               else dict(prefill_workers=1, decode_workers=1))
    spec = cluster_spec(model, num_blocks=POOL_BLOCKS, policy="sarathi", policy_opts=["token_budget=64"],
                        extra_coordinator_args=["--expected-output-tokens", "0"], **workers)  # place all at once
    cluster = start_cluster(spec, tmp_path / "logs")
    try:
        batch = prompts([17, 9, 30, 12, 21, 5], seed=4)
        results = asyncio.run(stream_all(spec.sdk_addr, batch))
        wait_until_idle(cluster)
        time.sleep(3 * HEARTBEAT_S)
        status = cluster_status(cluster)
    finally:
        cluster.stop()
    assert [tokens for tokens, _, _ in results] == hf_greedy(model, batch, NEW_TOKENS)
    for tokens, counted, timeline in results:  # no token lost or repeated across preemptions
        assert len(tokens) == counted == len(timeline["token_times"]) == NEW_TOKENS
    counts = [timeline.get("preempted", {}).get("count", 0) for _, _, timeline in results]
    assert max(counts) >= 2  # some request was preempted more than once
    preemptions = sum(worker["preemptions"] for worker in status["workers"].values())
    assert preemptions >= 2
    assert sum(worker["recomputed_tokens"] for worker in status["workers"].values()) > 0


def test_chat_without_max_tokens_is_served_on_a_pool_smaller_than_the_context(tiny_llama, tmp_path):
    """The tiny model's context is 512 tokens, each worker's pool 224: before KV on demand every such request was
    refused as larger than any pool."""
    from openai import OpenAI

    spec = cluster_spec(tiny_llama, num_blocks=POOL_BLOCKS)
    cluster = start_cluster(spec, tmp_path / "logs")
    try:
        client = OpenAI(base_url=spec.http_url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        for text in ("Hello!", "Tell me a long story about paged attention."):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                   temperature=0)
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert reply.usage.completion_tokens >= 1
        status = cluster_status(cluster)
    finally:
        cluster.stop()
    assert status["waiting"] == 0
