"""The engine's greedy tokens equal Hugging Face ``generate`` (eager attention, same weights), token for token.

Prompts are shorter and longer than one KV block (8 tokens) and than the token budget (32 tokens per iteration),
so single-token and multi-token chunks of several sequences and decodes run in the same forward passes.
"""

from __future__ import annotations

import pytest

from diptych.engine import Engine, EngineConfig
from diptych.policies import BATCH_POLICIES
from diptych.proto.codec import decode, encode
from diptych.proto.messages import KVHandoff, Request, SamplingParams
from tests.hf_reference import hf_greedy

PROMPT_LENGTHS = [1, 2, 7, 8, 9, 17, 31, 33, 50, 75]
NEW_TOKENS = 20
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)




def over_the_wire(engine, request_id: str, prompt: list[int], first_token_id: int) -> list:
    """The request's exported KV blocks after a trip through the wire codec, as a decode worker receives them."""
    request = Request(request_id=request_id, client_id="client", prompt_token_ids=prompt, sampling=GREEDY,
                      arrival_time=0.0, stream_addr="inproc://tokens")
    handoff = KVHandoff(request=request, first_token_id=first_token_id, first_token_time=0.0, num_tokens=len(prompt),
                        layout=engine.layout, blocks=engine.export_kv(request_id))
    received = decode([bytes(frame) for frame in encode(handoff)])
    assert received.layout == engine.layout
    return received.blocks


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_greedy_matches_hf_generate(family, request, make_engine, random_prompts):
    model_path = request.getfixturevalue(family)
    prompts = random_prompts(PROMPT_LENGTHS)
    engine = make_engine(model_path, token_budget=32)
    assert engine.generate(prompts, GREEDY) == hf_greedy(model_path, prompts, NEW_TOKENS)
    assert engine.load().free_blocks == engine.num_blocks


def test_prefill_handoff_to_another_engine_matches_hf_generate(tiny_llama, make_engine, random_prompts):
    """prefill_only on one engine, export_kv -> wire codec -> reserve/add_prefilled on another engine (other block
    ids), decode there."""
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    prefill = make_engine(tiny_llama, token_budget=32)
    decode = make_engine(tiny_llama, token_budget=32, num_blocks=200)
    decode.reserve("occupy-low-blocks", 7)  # so the decode side's block ids differ from the prefill side's
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"r{i}", prompt, GREEDY, prefill_only=True)
    outputs: dict[str, list[int]] = {}
    while prefill.has_work() or decode.has_work():  # the decode engine runs while later prompts still prefill
        if prefill.has_work():
            step = prefill.step()
            first_tokens = {t.request_id: t for t in step.tokens}
            for request_id in step.prefilled:
                prompt = prompts[int(request_id[1:])]
                frames = over_the_wire(prefill, request_id, prompt, first_tokens[request_id].token_id)
                assert prefill.release(request_id)
                assert decode.reserve(request_id, decode.blocks_needed(len(prompt)))
                first = first_tokens[request_id]
                assert first.index == 0
                decode.add_prefilled(request_id, prompt, first.token_id, GREEDY, frames, len(prompt),
                                     first_token_time=first.time)
                outputs[request_id] = [first.token_id]
        if decode.has_work():
            for token in decode.step().tokens:
                assert token.index == len(outputs[token.request_id])
                outputs[token.request_id].append(token.token_id)
    assert prefill.load().free_blocks == prefill.num_blocks
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == hf_greedy(tiny_llama, prompts, NEW_TOKENS)
    assert decode.abort("occupy-low-blocks")
    assert decode.load().free_blocks == decode.num_blocks


@pytest.mark.parametrize("policy_name", ["prefill-first", "rad", "slai"])
def test_every_registered_batch_policy_gives_the_same_greedy_tokens(policy_name, tiny_llama, random_prompts):
    """Batch composition changes timing, never tokens."""
    prompts = random_prompts(PROMPT_LENGTHS[::2], seed=4)
    short = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reference = Engine(EngineConfig(model=tiny_llama, num_blocks=64, block_size=8)).generate(prompts, short)
    engine = Engine(EngineConfig(model=tiny_llama, num_blocks=64, block_size=8), BATCH_POLICIES.create(policy_name))
    assert engine.generate(prompts, short) == reference
