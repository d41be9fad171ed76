"""Fixtures of the chaos tests: one cluster (1 prefill, 2 decode workers) for the whole session, with fast failure
detection and a small admission queue, and the tokens of an undisturbed run of the streams."""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos.streams import FAST_FAILURE, MAX_TOKENS, run_streams
from tests.integration.conftest import cluster_spec, start_cluster, tiny_llama  # noqa: F401


@pytest.fixture(scope="session")
def chaos_cluster(tiny_llama, tmp_path_factory):  # noqa: F811
    spec = cluster_spec(tiny_llama, prefill_workers=1, decode_workers=2, num_blocks=256,
                        extra_coordinator_args=FAST_FAILURE, extra_worker_args=["--heartbeat-interval", "0.2"])
    cluster = start_cluster(spec, tmp_path_factory.mktemp("chaos-logs"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def reference(chaos_cluster) -> list[list[int]]:
    results = asyncio.run(run_streams(chaos_cluster, None))
    assert all(isinstance(r, list) and len(r) == MAX_TOKENS for r in results), results
    return results  # type: ignore[return-value]
