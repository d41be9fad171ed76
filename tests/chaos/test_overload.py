"""Overload on real processes: a burst far beyond the admission queue's bound (the session's cluster queues
``MAX_QUEUED`` requests at most) is shed at once with explicit 503s carrying Retry-After, the rest complete, /health
keeps answering within a second, and the cluster idles after."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from diptych.client import AsyncClient, DiptychError
from tests.integration.conftest import wait_until_idle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BURST = 400


async def burst(address: str) -> list[int | DiptychError]:
    async with AsyncClient(address, timeout_s=120) as client:
        async def one(i: int) -> int | DiptychError:
            try:
                done = await client.complete(prompt_token_ids=[3 + i % 200] * 24, max_tokens=16, temperature=0.0,
                                             ignore_eos=True)
            except DiptychError as exc:
                return exc
            return len(done.token_ids)

        return await asyncio.gather(*[one(i) for i in range(BURST)])


def health_latencies(url: str, ready: threading.Event, stop: threading.Event, latencies: list[float]) -> None:
    """Poll /health every 0.1 s on a thread of its own, so the burst's client work does not delay the probe."""
    with httpx.Client(timeout=5) as http:
        assert http.get(url + "/health").status_code == 200  # the connection is open before the burst
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            assert http.get(url + "/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            stop.wait(0.1)


def test_a_burst_beyond_the_queue_is_shed_with_retry_after_and_health_stays_fast(chaos_cluster):
    ready, stop, latencies = threading.Event(), threading.Event(), []
    probe = threading.Thread(target=health_latencies, args=(chaos_cluster.spec.http_url, ready, stop, latencies))
    probe.start()
    try:
        assert ready.wait(10)
        results = asyncio.run(burst(chaos_cluster.spec.sdk_addr))
    finally:
        stop.set()
        probe.join(10)
    shed = [r for r in results if isinstance(r, DiptychError)]
    served = [r for r in results if not isinstance(r, DiptychError)]
    assert shed and served and all(r == 16 for r in served)
    assert all(e.status == 503 and e.retry_after_s for e in shed), {repr(e) for e in shed}
    assert latencies and max(latencies) < 1.0
    wait_until_idle(chaos_cluster, timeout_s=60)
