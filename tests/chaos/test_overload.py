"""Overload on real processes: a burst far beyond the admission queue's bound (the session's cluster queues
``MAX_QUEUED`` requests at most) is shed at once with explicit 503s carrying Retry-After, the rest complete, /health
keeps answering within a second, and the cluster idles after."""

from __future__ import annotations

import asyncio
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


async def health_latencies(url: str, ready: asyncio.Event, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(url + "/health")).status_code == 200  # the connection is open before the burst
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            assert (await http.get(url + "/health")).status_code == 200
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.1)
    return latencies


def test_a_burst_beyond_the_queue_is_shed_with_retry_after_and_health_stays_fast(chaos_cluster):
    async def main() -> tuple[list[int | DiptychError], list[float]]:
        ready, stop = asyncio.Event(), asyncio.Event()
        probe = asyncio.create_task(health_latencies(chaos_cluster.spec.http_url, ready, stop))
        await ready.wait()
        results = await burst(chaos_cluster.spec.sdk_addr)
        stop.set()
        return results, await probe

    results, latencies = asyncio.run(main())
    shed = [r for r in results if isinstance(r, DiptychError)]
    served = [r for r in results if not isinstance(r, DiptychError)]
    assert shed and served and all(r == 16 for r in served)
    assert all(e.status == 503 and e.retry_after_s for e in shed), {repr(e) for e in shed}
    assert latencies and max(latencies) < 1.0
    wait_until_idle(chaos_cluster, timeout_s=60)
