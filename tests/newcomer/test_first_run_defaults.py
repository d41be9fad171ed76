"""Defaults a newcomer meets: the KV pool size without flags, warm-up leaving the engine idle, workloads clipped to
a small model's context."""

from __future__ import annotations

import pytest

from diptych.engine import Engine, EngineConfig
from diptych.engine.config import CPU_KV_MEMORY_GB
from diptych.workloads.catalog import WorkloadConfig, build_workload, clip_to_context
from diptych.workloads.spec import RequestSpec


def test_pool_size_without_flags_on_cpu_and_explicit_sizes_win() -> None:
    assert EngineConfig().kv_pool_bytes() == int(CPU_KV_MEMORY_GB * 2**30)
    assert EngineConfig(kv_memory_gb=1.0).kv_pool_blocks(2**20) == 1024
    assert EngineConfig(num_blocks=7, kv_memory_gb=1.0).kv_pool_blocks(2**20) == 7
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_warm_up_leaves_the_engine_idle_with_every_block_free() -> None:
    engine = Engine(EngineConfig(num_blocks=12))
    policy = engine.policy
    assert engine.warm_up() > 0
    load = engine.load()
    assert load.free_blocks == load.total_blocks == 12 and not engine.request_ids()
    assert engine.policy is policy


def test_sharegpt_clipped_to_a_512_token_context() -> None:
    specs = build_workload(WorkloadConfig(name="sharegpt4", num_requests=50, max_context=512))
    assert all(s.prompt_len + (s.max_tokens or s.output_len) <= 512 for s in specs)
    assert all(s.prompt_len >= 1 and 1 <= s.output_len <= (s.max_tokens or 0) for s in specs)


def test_clipping_keeps_fitting_requests_and_halves_the_output_at_most() -> None:
    fits = RequestSpec("a", 0.0, 100, 50)
    long = RequestSpec("b", 0.0, 3000, 900)
    kept, clipped = clip_to_context([fits, long], 512)
    assert kept == fits
    assert (clipped.prompt_len, clipped.output_len, clipped.max_tokens) == (256, 256, 256)
