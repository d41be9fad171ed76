"""Engine bookkeeping: validation, reservations, prefill-only requests, aborts, and blocks always coming back."""

from __future__ import annotations

import pytest

from diptych.engine import Engine, EngineConfig, default_model_path
from diptych.proto.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_add_request_validation(tiny_llama, make_engine):
    engine = make_engine(tiny_llama, num_blocks=16, block_size=8)
    engine.add_request("a", [1, 5, 6], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("b", [], GREEDY)
    with pytest.raises(ValueError, match="in use"):
        engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("c", [1, 259], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("d", [1] * 500, SamplingParams(max_tokens=13))
    with pytest.raises(ValueError, match="larger than the KV pool"):
        engine.add_request("e", [1] * 129, SamplingParams(max_tokens=1))  # 17 blocks > pool of 16
    engine.add_request("g", [1] * 100, SamplingParams(max_tokens=40))  # 18 blocks at most: grows on demand
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("f", [1], SamplingParams(top_p=0.0))
    assert engine.load().num_waiting == 2 and engine.load().waiting_prompt_tokens == 103


def test_blocks_return_after_finished_and_aborted_requests(tiny_llama, make_engine, random_prompts):
    engine = make_engine(tiny_llama, num_blocks=64, token_budget=16)
    prompts = random_prompts([5, 30, 12, 40, 9, 3], seed=7)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY, prefill_only=(i == 4))
    assert engine.reserve("handoff", 3)
    engine.step()
    engine.step()
    assert engine.load().free_blocks < 64 - 3
    assert engine.abort("r1") and engine.abort("r5")  # one running (mid prefill), one still waiting
    assert not engine.abort("r1")
    finished, prefilled = set(), set()
    while engine.has_work():
        step = engine.step()
        finished.update(step.finished)
        prefilled.update(step.prefilled)
    assert finished == {"r0", "r2", "r3"} and prefilled == {"r4"}
    assert sorted(engine.request_ids()) == ["handoff", "r4"]
    assert engine.release("r4") and not engine.release("r4")
    with pytest.raises(KeyError):
        engine.export_kv("r4")
    assert engine.abort("handoff") and not engine.abort("handoff")
    assert engine.load().free_blocks == 64 and engine.request_ids() == []


def test_reserve_never_over_commits(tiny_llama, make_engine):
    engine = make_engine(tiny_llama, num_blocks=10)
    assert engine.reserve("a", 6)
    assert not engine.reserve("b", 5)
    assert engine.reserve("b", 4)
    assert engine.load().free_blocks == 0
    engine.add_request("c", [1, 2, 3], GREEDY)
    assert engine.step().tokens == []  # no room to admit: nothing runs, nothing is over-committed
    assert engine.reserve("a", 6)  # a repeated reservation holds nothing more
    with pytest.raises(ValueError, match="in use"):
        engine.reserve("a", 1)
    engine.abort("a")
    assert engine.step().num_prefill_tokens == 3


def test_add_prefilled_needs_a_matching_reservation(tiny_llama, make_engine, random_prompts):
    prefill, decode = make_engine(tiny_llama), make_engine(tiny_llama)
    prompt = random_prompts([20], seed=8)[0]
    prefill.add_request("r", prompt, GREEDY, prefill_only=True)
    while prefill.has_work():
        first = prefill.step().tokens
    frames = prefill.export_kv("r")
    assert len(frames) == 3  # 20 prompt positions in blocks of 8
    with pytest.raises(KeyError):
        decode.add_prefilled("r", prompt, first[0].token_id, GREEDY, frames, len(prompt))
    assert decode.reserve("r", decode.blocks_needed(len(prompt)) - 1)
    with pytest.raises(ValueError, match="needs"):
        decode.add_prefilled("r", prompt, first[0].token_id, GREEDY, frames, len(prompt))
    decode.abort("r")
    assert decode.reserve("r", decode.blocks_needed(len(prompt)))
    with pytest.raises(ValueError, match="frames"):
        decode.add_prefilled("r", prompt, first[0].token_id, GREEDY, frames[:2], len(prompt))
    decode.add_prefilled("r", prompt, first[0].token_id, GREEDY, frames, len(prompt))
    assert decode.load().num_running == 1


def test_prefill_only_request_that_finishes_on_its_first_token(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)
    engine.add_request("one", [1, 50, 60], SamplingParams(max_tokens=1, temperature=0.0), prefill_only=True)
    step = engine.step()
    assert step.finished == ["one"] and step.prefilled == []
    assert step.tokens[0].finish_reason == "length" and step.tokens[0].index == 0
    assert engine.load().free_blocks == engine.num_blocks


def test_engine_attributes(tiny_llama, make_engine):
    engine = make_engine(tiny_llama, num_blocks=32, block_size=4)
    assert engine.model_name == tiny_llama
    assert (engine.block_size, engine.num_blocks, engine.max_model_len) == (4, 32, 512)
    assert engine.eos_token_ids == {engine.tokenizer.eos_token_id} == {2}
    assert (engine.layout.num_layers, engine.layout.num_kv_heads, engine.layout.head_dim) == (2, 2, 16)
    assert engine.layout.block_size == 4 and engine.layout.dtype == "float32"


def test_config_validation():
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        EngineConfig(num_blocks=-1)
    with pytest.raises(ValueError, match="kv_memory_gb"):
        EngineConfig(kv_memory_gb=0)
    assert str(EngineConfig().torch_dtype()) == "torch.float32"
    assert str(EngineConfig(device="cuda:1").torch_dtype()) == "torch.bfloat16"
    assert EngineConfig(kv_memory_gb=1 / 1024).kv_pool_blocks(bytes_per_block=4096) == 256


def test_default_model_is_the_cached_tiny_llama(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path))
    engine = Engine(EngineConfig(num_blocks=8))
    assert engine.model_name == default_model_path()
    assert engine.model_name.startswith(str(tmp_path))
    text = engine.tokenizer.decode(engine.generate([engine.tokenizer("hi").input_ids], GREEDY)[0])
    assert isinstance(text, str)
