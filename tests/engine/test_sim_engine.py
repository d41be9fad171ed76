"""The cost-model engine behind ``--engine sim``: same bookkeeping as the model engine, modelled time per step."""

from __future__ import annotations

import time

import pytest

from diptych.engine.config import EngineConfig
from diptych.engine.sim_engine import PLACEHOLDER_TOKEN, SimEngine, SimHandoff
from diptych.proto.messages import SamplingParams
from diptych.sim.cost_model import DEFAULT, replace

FAST = replace(DEFAULT, overhead_s=0.0, weights_floor_s=0.002, per_token_s=1e-5, attn_pair_s=0.0, kv_token_s=0.0)


def make(**kw) -> SimEngine:
    return SimEngine(EngineConfig(block_size=16, num_blocks=kw.pop("num_blocks", 64)), cost=FAST, **kw)


def test_generates_placeholders_to_max_tokens_and_frees_blocks():
    engine = make()
    outputs = engine.generate([[1] * 40, [2] * 5], SamplingParams(max_tokens=7))
    assert outputs == [[PLACEHOLDER_TOKEN] * 7] * 2
    assert engine.load().free_blocks == engine.num_blocks


def test_an_iteration_takes_the_modelled_time():
    engine = make()
    engine.add_request("r", [1] * 100, SamplingParams(max_tokens=4))
    started = time.perf_counter()
    engine.step()  # the whole prompt: max(2 ms floor, 100 * 10 us) = 2 ms
    assert 0.002 <= time.perf_counter() - started < 0.05


def test_handoff_waits_for_the_modelled_transfer_and_keeps_accounting():
    prefill, decode = make(), make(handoff=SimHandoff(bandwidth_Bps=131072 * 100 / 0.05, latency_s=0.0))
    prefill.add_request("r", [3] * 100, SamplingParams(max_tokens=5), prefill_only=True)
    out = prefill.step()
    assert out.prefilled == ["r"]
    frames = prefill.export_kv("r")
    prefill.release("r")
    assert decode.reserve("r", decode.blocks_needed(100))
    sent = time.time()
    decode.add_prefilled("r", [3] * 100, out.tokens[0].token_id, SamplingParams(max_tokens=5), frames, 100)
    assert decode.has_work()
    first = decode.step()  # waits until the 50 ms transfer has landed
    assert time.time() - sent >= 0.05 and first.num_decodes == 1
    while decode.has_work():
        decode.step()
    assert decode.load().free_blocks == decode.num_blocks == prefill.load().free_blocks


def test_abort_during_transfer_frees_the_reservation():
    engine = make()
    assert engine.reserve("r", 3)
    engine.add_prefilled("r", [1] * 20, PLACEHOLDER_TOKEN, SamplingParams(max_tokens=10), [b""] * 2, 20)
    assert engine.abort("r") and engine.load().free_blocks == engine.num_blocks
    with pytest.raises(KeyError):
        engine.add_prefilled("x", [1], PLACEHOLDER_TOKEN, SamplingParams(), [b""], 1)


def test_back_to_back_iterations_follow_the_modelled_time():
    """Host work around an iteration is taken off the wait: a decode-only stretch advances one modelled iteration
    time per token (within the host's timer noise)."""
    import time

    from diptych.engine.config import EngineConfig
    from diptych.engine.sim_engine import SimEngine
    from diptych.proto.messages import SamplingParams
    from diptych.sim.cost_model import resolve

    cost = resolve("h200-mistral-7b")
    engine = SimEngine(EngineConfig(num_blocks=4096), cost=cost)
    for i in range(32):
        engine.add_request(f"r{i}", [1] * 16, SamplingParams(max_tokens=60))
    engine.step()  # the prefills
    per_step = []
    for _ in range(50):
        started = time.perf_counter()
        engine.step()
        time.sleep(0.001)  # the worker's own host work between iterations
        per_step.append(time.perf_counter() - started)
    modelled = cost.iteration_time(0, 32, 32 * 40, 0.0, 32)
    settled = sorted(per_step[20:])[len(per_step[20:]) // 2]
    assert abs(settled - modelled) < 0.15 * modelled
