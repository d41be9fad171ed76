"""Chaos on real processes (tiny model): under concurrent greedy streams, ``kill -9`` of a decode worker, of the
prefill worker and of the coordinator, and SIGSTOP of a decode worker, each separately. Every stream completes with
exactly the tokens of an undisturbed run (its requests are migrated: ``docs/reliability.md``), or, when a role has
no worker left, ends with an explicit error within its deadline; afterwards every pool is back at its starting free
count and the cluster serves new requests. Killed processes are started again by the test, as ``diptych serve``'s
supervision does (``test_supervised`` runs the same faults under ``Cluster.wait``)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Callable

import pytest

from diptych.client import AsyncClient, DiptychError
from diptych.launcher import Cluster
from tests.integration.conftest import cluster_spec, start_cluster, wait_until_idle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = 12
MAX_TOKENS = 160
HEARTBEAT_TIMEOUT_S = 1.5
QUEUE_TIMEOUT_S = 25.0
FAST_FAILURE = ["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--queue-timeout", str(QUEUE_TIMEOUT_S)]


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(8, 40))] for _ in range(STREAMS)]


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    spec = cluster_spec(tiny_llama, prefill_workers=1, decode_workers=2, num_blocks=256,
                        extra_coordinator_args=FAST_FAILURE, extra_worker_args=["--heartbeat-interval", "0.2"])
    cluster = start_cluster(spec, tmp_path_factory.mktemp("chaos-logs"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(cluster) -> list[list[int]]:
    results = asyncio.run(run_streams(cluster, None))
    assert all(isinstance(r, list) and len(r) == MAX_TOKENS for r in results), results
    return results  # type: ignore[return-value]


async def run_streams(cluster: Cluster, fault: Callable[[], None] | None,
                      after_tokens: int = STREAMS * 8) -> list[list[int] | DiptychError]:
    """Run the streams; call ``fault`` (in a thread) once ``after_tokens`` tokens have arrived in all."""
    received = 0
    fired = asyncio.Event()

    async def one(client: AsyncClient, prompt: list[int]) -> list[int] | DiptychError:
        nonlocal received
        ids: list[int] = []
        try:
            async for chunk in client.stream(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                             ignore_eos=True):
                ids += chunk.token_ids
                received += len(chunk.token_ids)
                if fault is not None and received >= after_tokens and not fired.is_set():
                    fired.set()
                    threading.Thread(target=fault, daemon=True).start()
        except DiptychError as exc:
            return exc
        return ids

    async with AsyncClient(cluster.spec.sdk_addr, timeout_s=120) as client:
        return await asyncio.gather(*[one(client, p) for p in prompts()])


def restored(cluster: Cluster, name: str) -> None:
    """Start ``name`` again (as supervision would) and wait until the cluster has every worker and is idle."""
    if cluster.procs[name].poll() is not None:
        cluster._launch(name)
    cluster.wait_ready(timeout_s=120)
    status = wait_until_idle(cluster, timeout_s=60)
    assert len(status["workers"]) == 3


def still_serves(cluster: Cluster, reference: list[list[int]]) -> None:
    again = asyncio.run(run_streams(cluster, None))
    assert again == reference


def kill(cluster: Cluster, name: str) -> Callable[[], None]:
    return lambda: os.kill(cluster.procs[name].pid, signal.SIGKILL)


def test_kill_decode_worker(cluster, reference):
    got = asyncio.run(run_streams(cluster, kill(cluster, "decode-0")))
    assert got == reference
    restored(cluster, "decode-0")
    still_serves(cluster, reference)


def test_sigstop_decode_worker_past_its_heartbeat_deadline(cluster, reference):
    def pause() -> None:
        pid = cluster.procs["decode-1"].pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(HEARTBEAT_TIMEOUT_S * 3)
        os.kill(pid, signal.SIGCONT)

    got = asyncio.run(run_streams(cluster, pause))
    assert got == reference
    restored(cluster, "decode-1")  # it re-registers by itself once it runs again
    still_serves(cluster, reference)


def test_kill_prefill_worker_restarted(cluster, reference):
    def kill_and_restart() -> None:
        kill(cluster, "prefill-0")()
        cluster.procs["prefill-0"].wait()
        time.sleep(0.5)
        cluster._launch("prefill-0")

    got = asyncio.run(run_streams(cluster, kill_and_restart, after_tokens=1))
    assert got == reference
    restored(cluster, "prefill-0")
    still_serves(cluster, reference)


def test_kill_the_only_prefill_worker_ends_waiting_requests_with_an_error_within_the_deadline(cluster, reference):
    started = time.time()
    got = asyncio.run(run_streams(cluster, kill(cluster, "prefill-0"), after_tokens=1))
    elapsed = time.time() - started
    for want, result in zip(reference, got):
        assert result == want or (isinstance(result, DiptychError) and result.status == 503), result
    assert elapsed < QUEUE_TIMEOUT_S + HEARTBEAT_TIMEOUT_S + 30
    restored(cluster, "prefill-0")
    still_serves(cluster, reference)


def test_kill_coordinator_restarted(cluster, reference):
    def kill_and_restart() -> None:
        kill(cluster, "coordinator")()
        cluster.procs["coordinator"].wait()
        time.sleep(1.0)
        cluster._launch("coordinator")

    got = asyncio.run(run_streams(cluster, kill_and_restart))
    assert got == reference
    restored(cluster, "coordinator")
    still_serves(cluster, reference)
