"""Refused reservations with real processes: a decode pool far smaller than the requests' outputs, footprints of the
prompt alone (``--expected-output-tokens 0``, so placement over-commits as much as it can), more requests than fit:
decode sequences grow into the blocks placement counted free, the decode engine refuses handoff reservations, the
coordinator retries them, and every request completes with the greedy tokens, nothing failed and every block back."""

from __future__ import annotations

import asyncio

import pytest

from tests.hf_reference import hf_greedy
from tests.integration.conftest import cluster_spec, start_cluster, wait_until_idle
from tests.integration.test_kv_on_demand import NEW_TOKENS, POOL_BLOCKS, prompts, stream_all

pytestmark = pytest.mark.integration


def test_refused_reservations_are_retried_until_every_request_is_served(tmp_path):
    from diptych.engine.tiny_model import build_tiny_model

    tiny_llama = str(tmp_path / "tiny-llama")
    build_tiny_model(tiny_llama, family="llama")
    spec = cluster_spec(tiny_llama, num_blocks=POOL_BLOCKS, policy="sarathi", policy_opts=["token_budget=64"],
                        prefill_workers=1, decode_workers=1,
                        extra_coordinator_args=["--expected-output-tokens", "0"])
    cluster = start_cluster(spec, tmp_path / "logs")
    try:
        batch = prompts([40, 33, 50, 45, 38, 41, 47, 36, 44, 39], seed=5)  # 3-4 blocks each, ~7 at the end
        results = asyncio.run(stream_all(spec.sdk_addr, batch))
        status = wait_until_idle(cluster)
    finally:
        cluster.stop()
    assert [tokens for tokens, _, _ in results] == hf_greedy(tiny_llama, batch, NEW_TOKENS)
    decode = status["workers"]["decode-0"]
    assert decode["refused_reservations"] >= 1 and decode["preemptions"] >= 1
    assert decode["reserved_blocks"] == 0 and decode["free_blocks"] == decode["total_blocks"]
