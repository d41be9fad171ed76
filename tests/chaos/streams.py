"""What the chaos tests share: the cluster's fault settings, the greedy streams and the faults."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Callable

from diptych.client import AsyncClient, DiptychError
from diptych.launcher import Cluster
from tests.integration.conftest import wait_until_idle

STREAMS = 12
MAX_TOKENS = 160
HEARTBEAT_TIMEOUT_S = 1.5
QUEUE_TIMEOUT_S = 25.0
MAX_QUEUED = 32
FAST_FAILURE = ["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--queue-timeout", str(QUEUE_TIMEOUT_S),
                "--max-queued-requests", str(MAX_QUEUED)]


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(8, 40))] for _ in range(STREAMS)]


async def run_streams(cluster: Cluster, fault: Callable[[], None] | None,
                      after_tokens: int = STREAMS * 8) -> list[list[int] | DiptychError]:
    """Run the streams; call ``fault`` (in a thread) once ``after_tokens`` tokens have arrived in all. Returns only
    after ``fault`` has returned too (streams may finish while a fault still restarts a process)."""
    received = 0
    fired = asyncio.Event()
    threads: list[threading.Thread] = []

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
                    threads.append(threading.Thread(target=fault, daemon=True))
                    threads[-1].start()
        except DiptychError as exc:
            return exc
        return ids

    async with AsyncClient(cluster.spec.sdk_addr, timeout_s=120) as client:
        results = await asyncio.gather(*[one(client, p) for p in prompts()])
    for thread in threads:
        await asyncio.to_thread(thread.join)
    return results


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


def kill_and_restart(cluster: Cluster, name: str, down_s: float) -> Callable[[], None]:
    """``kill -9`` the process, then start it again ``down_s`` seconds after it exited (as an operator would)."""
    def fault() -> None:
        kill(cluster, name)()
        cluster.procs[name].wait()
        time.sleep(down_s)
        cluster._launch(name)
    return fault


