"""Preemption by recompute on the model engine: a pool far too small for its requests, several of them preempted
more than once, and every request still produces exactly the greedy tokens of an undisturbed run (tiny Llama and
Qwen2, CPU float32)."""

from __future__ import annotations

import time

import pytest

from diptych.engine import Engine, EngineConfig
from diptych.policies.batch import SarathiBatching
from diptych.policies.slai import SLAIBatching
from diptych.proto.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def run_all(engine: Engine, prompts: list[list[int]], sampling: SamplingParams):
    """Submit every prompt at once and run to the end; returns (tokens by request, the request ids preempted in
    order, the index of the iteration each request's first and last token came in)."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, sampling)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    preempted: list[str] = []
    iteration = 0
    deadline = time.monotonic() + 300
    while engine.has_work():
        step = engine.step()
        if step.duration_s == 0 and not step.preempted:  # SLAI deferred every decode (no block free): plan again
            assert time.monotonic() < deadline
            continue
        preempted += step.preempted
        for token in step.tokens:
            assert token.index == len(tokens[token.request_id])  # never lost, never repeated
            tokens[token.request_id].append(token.token_id)
            first.setdefault(token.request_id, iteration)
            if token.finish_reason is not None:
                last[token.request_id] = iteration
        iteration += 1
        assert iteration < 10_000
    return tokens, preempted, first, last


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("policy", ["sarathi", "slai"])
def test_preempted_requests_produce_the_greedy_tokens_of_an_undisturbed_run(family, policy, request,
                                                                             random_prompts):
    model = request.getfixturevalue(family)
    prompts = random_prompts([5, 9, 17, 3, 12, 26], seed=11)
    solo = Engine(EngineConfig(model=model, num_blocks=256, block_size=8), SarathiBatching(token_budget=32))
    expected = solo.generate(prompts, GREEDY)
    batch = SarathiBatching(token_budget=32) if policy == "sarathi" else SLAIBatching(token_budget=32)
    small = Engine(EngineConfig(model=model, num_blocks=14, block_size=8), batch)  # 112 positions for ~380
    tokens, preempted, _, _ = run_all(small, prompts, GREEDY)
    assert len(preempted) >= 4 and max(preempted.count(r) for r in set(preempted)) >= 2
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == expected
    assert small.load().free_blocks == 14 and small.request_ids() == []
    assert small.load().preemptions == len(preempted) and small.load().recomputed_tokens > 0


@pytest.mark.slow
def test_six_requests_on_a_64_block_pool_all_start_before_any_finishes(tiny_llama, random_prompts):
    """64 blocks of 16 tokens (1024 positions) and six requests of 16 prompt tokens with max_tokens 400 (2496
    positions): all are admitted at once and produce their first token before any finishes, then grow, preempt
    and finish with the tokens of an undisturbed run (greedy tokens do not depend on the batch: test_exactness)."""
    prompts = random_prompts([16] * 6, seed=5)
    sampling = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    engine = Engine(EngineConfig(model=tiny_llama, num_blocks=64, block_size=16), SarathiBatching(token_budget=512))
    tokens, preempted, first, last = run_all(engine, prompts, sampling)
    assert max(first.values()) < min(last.values())
    assert preempted
    undisturbed = Engine(EngineConfig(model=tiny_llama, num_blocks=160, block_size=16),
                         SarathiBatching(token_budget=512))  # room for all six: nothing preempted
    assert [tokens[f"r{i}"] for i in range(6)] == undisturbed.generate(prompts, sampling)
    assert undisturbed.load().preemptions == 0 and engine.load().free_blocks == 64
