"""Fair admission on real processes: two backlogged clients, one offering three times the other's load.

FCFS serves them in proportion to what they send (about 3:1); VTC serves them equally, within the paper's bound
``2 * max(w_p * L_input, w_q * M)``; weighted VTC (1:2) serves them about 1:2.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from diptych.client import AsyncClient
from tests.integration.conftest import cluster_spec, start_cluster

pytestmark = pytest.mark.integration

PROMPT, OUTPUT = 48, 64
BLOCKS = 40  # each request reserves ceil((48 + 64) / 16) = 7 blocks: 5 run at a time, the rest queue
HEAVY, LIGHT = 24, 8
"""Requests each client keeps outstanding: 3:1 offered load. VTC divides service among backlogged clients, so the
light client keeps more requests outstanding than the 5 decode slots and always has some queued (with 24-token
outputs and 8 slots its queue emptied between a reply and its next request on an idle machine, and the
work-conserving scheduler served the heavy client meanwhile)."""
WARMUP_S, WINDOW_S = 2.0, 8.0


async def offered_load(address: str, api_key: str, concurrency: int, deadline: float) -> None:
    """``concurrency`` closed loops that keep a request outstanding each until ``deadline``."""
    rng = random.Random(api_key)

    async def loop(client):
        while time.time() < deadline:
            prompt = [rng.randrange(3, 250) for _ in range(PROMPT)]
            try:
                await client.complete(prompt_token_ids=prompt, max_tokens=OUTPUT, ignore_eos=True, temperature=0.0)
            except Exception:  # noqa: BLE001 (the deadline can cut requests short at shutdown; service is read from the server)
                return

    async with AsyncClient(address, api_key=api_key, timeout_s=60) as client:
        await asyncio.gather(*[loop(client) for _ in range(concurrency)])


def served(http_url: str) -> dict[str, float]:
    status = httpx.get(http_url + "/admin/status", headers={"Authorization": "Bearer key-admin"}, timeout=5).json()
    return {cid: c["service"] for cid, c in status["clients"].items()}


def run_scenario(tiny_llama, tmp_path, admission: str, weights: tuple[float, float]) -> tuple[float, float]:
    keys = tmp_path / f"keys-{admission}.json"
    keys.write_text(json.dumps({"clients": {"key-a": {"client_id": "heavy", "weight": weights[0]},
                                            "key-b": {"client_id": "light", "weight": weights[1]}},
                                "admins": ["key-admin"]}))
    spec = cluster_spec(tiny_llama, prefill_workers=1, decode_workers=1, num_blocks=BLOCKS, admission=admission,
                        api_keys_file=str(keys), extra_coordinator_args=["--max-prefill-backlog", str(PROMPT)])
    cluster = start_cluster(spec, tmp_path / f"logs-{admission}")
    try:
        async def scenario():
            deadline = time.time() + WARMUP_S + WINDOW_S + 2
            load = asyncio.gather(offered_load(spec.sdk_addr, "key-a", HEAVY, deadline),
                                  offered_load(spec.sdk_addr, "key-b", LIGHT, deadline))
            await asyncio.sleep(WARMUP_S)
            start = served(spec.http_url)
            await asyncio.sleep(WINDOW_S)
            end = served(spec.http_url)
            await load
            return end["heavy"] - start.get("heavy", 0.0), end["light"] - start.get("light", 0.0)

        return asyncio.run(scenario())
    finally:
        cluster.stop()


def test_fcfs_serves_in_proportion_to_load(tiny_llama, tmp_path):
    heavy, light = run_scenario(tiny_llama, tmp_path, "fcfs", (1.0, 1.0))
    assert 2.0 < heavy / light < 4.5


def test_vtc_equalises_service_within_the_bound(tiny_llama, tmp_path):
    heavy, light = run_scenario(tiny_llama, tmp_path, "vtc", (1.0, 1.0))
    bound = 2 * max(1.0 * PROMPT, 2.0 * BLOCKS * 16)
    assert abs(heavy - light) <= bound
    assert 0.8 < heavy / light < 1.25


def test_weighted_vtc_follows_the_weights(tiny_llama, tmp_path):
    heavy, light = run_scenario(tiny_llama, tmp_path, "vtc", (1.0, 2.0))
    assert 1.6 < light / heavy < 2.5
