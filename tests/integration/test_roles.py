"""Colocated workers (prefill and decode in the same batches) and flex workers moved between pools by RAD."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from diptych.client import AsyncClient
from tests.hf_reference import hf_greedy
from tests.integration.conftest import cluster_spec, start_cluster, wait_until_idle

pytestmark = pytest.mark.integration


def prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in lengths]


async def complete_all(address, batch, max_tokens, **kw):
    async with AsyncClient(address, timeout_s=120) as client:
        return await asyncio.gather(*[
            client.complete(prompt_token_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
            for p in batch])


@pytest.mark.parametrize("policy", ["slai", "sarathi"])
def test_colocated_worker_is_exact_and_reports_a_timeline(tiny_llama, tmp_path, policy):
    spec = cluster_spec(tiny_llama, prefill_workers=0, decode_workers=0, colocated_workers=1, num_blocks=200,
                        policy=policy, policy_opts=["token_budget=32"])
    cluster = start_cluster(spec, tmp_path / "logs")
    try:
        batch = prompts([5, 17, 40, 70, 12, 33], seed=7)
        results = asyncio.run(complete_all(spec.sdk_addr, batch, 12, tier="relaxed"))
        wait_until_idle(cluster)
    finally:
        cluster.stop()
    assert [r.token_ids for r in results] == hf_greedy(tiny_llama, batch, 12)
    timeline = results[0].timeline
    assert timeline["arrival"] <= timeline["admitted"] <= timeline["prefill_start"] <= timeline["prefill_end"]
    assert "handoff_start" not in timeline and len(timeline["token_times"]) == 12


def test_rad_moves_a_flex_worker_to_the_prefill_pool(tiny_llama, tmp_path):
    """Long prompts and one output token each: the prefill pool is the bottleneck, so RAD takes a worker from the
    decode pool, drains it and moves it; every request still completes exactly."""
    spec = cluster_spec(tiny_llama, prefill_workers=0, decode_workers=0, flex_workers=4, num_blocks=300,
                        pool_policy="rad", pool_opts=["min_dwell_s=0.5", "backlog_target_s=0.001",
                                                      "prefill_util_target=1.0"],
                        extra_coordinator_args=["--max-prefill-backlog", "200"])
    cluster = start_cluster(spec, tmp_path / "logs")
    try:
        start = httpx.get(spec.http_url + "/admin/status", timeout=5).json()
        assert (start["prefill_workers"], start["decode_workers"]) == (2, 2)
        batch = prompts([200] * 40, seed=3)
        deadline = time.time() + 60
        moves: list[dict] = []
        while not moves and time.time() < deadline:
            results = asyncio.run(complete_all(spec.sdk_addr, batch, 1))
            assert all(len(r.token_ids) == 1 for r in results)
            moves = [m for m in httpx.get(spec.http_url + "/admin/status", timeout=5).json()["pools"]["moves"]
                     if m["to"] == "prefill"]
        assert moves, "RAD never moved a worker to the prefill pool"
        assert "prefill is the bottleneck" in moves[0]["reason"]
        status = wait_until_idle(cluster)
        assert status["prefill_workers"] == 3 and status["decode_workers"] == 1
        exact = prompts([9, 30, 64], seed=11)
        got = asyncio.run(complete_all(spec.sdk_addr, exact, 8))
        assert [r.token_ids for r in got] == hf_greedy(tiny_llama, exact, 8)
    finally:
        cluster.stop()
