"""GPU-to-GPU KV handoff inside the real services (skipped without CUDA): a prefill and a decode worker on GPUs of
one host (two GPUs when present, else two processes on one) move every request's KV through CUDA IPC, the tokens
equal HF generate, the path is logged and counted, and cancelled requests give every block back promptly (the
decode worker holds an aborted reservation only until the prefill worker says its push stopped)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from diptych.client import AsyncClient
from diptych.proto.messages import HANDOFF_CUDA_IPC, HANDOFF_FRAMES
from tests.hf_reference import hf_greedy
from tests.integration.conftest import cluster_spec, cluster_status, start_cluster, wait_until_idle
from tests.integration.test_pipeline import PROMPT_LENGTHS, random_prompts, run_concurrently

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


async def cancel_some(address: str, prompts) -> None:
    async with AsyncClient(address) as client:
        async def cancel_after_first_chunk(p):
            async for _ in client.stream(prompt_token_ids=p, max_tokens=200, ignore_eos=True):
                break

        async def cancel_early(p):
            task = asyncio.create_task(client.complete(prompt_token_ids=p, max_tokens=50, ignore_eos=True))
            await asyncio.sleep(0.005)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        await asyncio.gather(*[(cancel_after_first_chunk, cancel_early)[i % 2](p) for i, p in enumerate(prompts)],
                             return_exceptions=True)


def handoff_counts(cluster, expected: int, timeout_s: float = 5.0) -> dict:
    """The prefill worker's per-path counters once its heartbeats report ``expected`` handoffs."""
    deadline = time.time() + timeout_s
    while True:
        counts = cluster_status(cluster)["workers"]["prefill-0"]["kv_handoffs"]
        if sum(c["requests"] for c in counts.values()) >= expected or time.time() > deadline:
            return counts
        time.sleep(0.2)


def test_services_move_kv_gpu_to_gpu_exactly(tiny_llama, tmp_path):
    devices = "cuda:0,cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
    spec = cluster_spec(tiny_llama, prefill_workers=1, decode_workers=1, device=devices,
                        policy_opts=["token_budget=32"], num_blocks=256, extra_worker_args=["--dtype", "float32"])
    cluster = start_cluster(spec, tmp_path)
    try:
        prompts = random_prompts(PROMPT_LENGTHS)
        got = asyncio.run(run_concurrently(spec.sdk_addr, prompts, max_tokens=24))
        counts = handoff_counts(cluster, len(prompts))
        asyncio.run(cancel_some(spec.sdk_addr, random_prompts([40, 70, 90, 33] * 3, seed=2)))
        status = wait_until_idle(cluster, timeout_s=20)  # held blocks must not wait for the 30 s expiry
    finally:
        cluster.stop()
    assert got == hf_greedy(tiny_llama, prompts, 24)
    assert counts[HANDOFF_CUDA_IPC]["requests"] == len(prompts) and HANDOFF_FRAMES not in counts
    assert status["workers"]["decode-0"]["shares_kv_pool"]
    log = (tmp_path / "prefill-0.log").read_text()
    assert f"KV handoff path to decode-0: {HANDOFF_CUDA_IPC}" in log
    assert "never said it stopped" not in (tmp_path / "decode-0.log").read_text()
