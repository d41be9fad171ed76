"""Sampling: greedy, top-k / top-p filters, seeded reproducibility, and the stop conditions' finish reasons."""

from __future__ import annotations

import pytest
import torch

from diptych.engine.sampler import Sampler, SamplingRequest, filtered_probabilities
from diptych.proto.messages import SamplingParams


def run_alone_and_in_batch(engine, prompt, sampling, others, other_sampling):
    """The outputs of ``prompt`` run alone, then alongside ``others`` (added before it)."""
    alone = engine.generate([prompt], sampling)[0]
    for i, other in enumerate(others):
        engine.add_request(f"other-{i}", other, other_sampling)
    engine.add_request("target", prompt, sampling)
    batched: list[int] = []
    while engine.has_work():
        batched += [t.token_id for t in engine.step().tokens if t.request_id == "target"]
    return alone, batched


def test_seeded_request_is_reproducible_regardless_of_batch(tiny_llama, make_engine, random_prompts):
    seeded = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.95, seed=1234, ignore_eos=True)
    unseeded = SamplingParams(max_tokens=15, temperature=1.0, ignore_eos=True)
    prompt, *others = random_prompts([13, 5, 40, 9], seed=3)
    alone, batched = run_alone_and_in_batch(make_engine(tiny_llama), prompt, seeded, others, unseeded)
    assert alone == batched
    other_engine = make_engine(tiny_llama, token_budget=7, seed=99)  # other chunking, other engine RNG
    assert other_engine.generate([prompt], seeded)[0] == alone
    reseeded = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.95, seed=4321, ignore_eos=True)
    assert other_engine.generate([prompt], reseeded)[0] != alone


def test_top_k_one_equals_greedy(tiny_llama, make_engine, random_prompts):
    prompts = random_prompts([3, 20, 45], seed=4)
    engine = make_engine(tiny_llama)
    greedy = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    top1 = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=2.0, top_k=1, ignore_eos=True))
    assert top1 == greedy


def test_filters_keep_the_expected_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert (filtered_probabilities(logits, 1.0, top_k=2, top_p=1.0)[2:] == 0).all()
    probs = torch.softmax(logits.double(), 0)
    nucleus = filtered_probabilities(logits, 1.0, top_k=0, top_p=float(probs[0] + probs[1]) - 1e-6)
    assert (nucleus[:2] > 0).all() and (nucleus[2:] == 0).all()
    assert filtered_probabilities(logits, 1.0, top_k=0, top_p=1e-9)[0] == 1.0
    assert torch.allclose(filtered_probabilities(logits, 1.0, 0, 1.0), probs)


def test_sampled_tokens_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).float()
    sampler = Sampler(seed=0)
    params = SamplingParams(temperature=1.0)
    draws = [sampler.sample(logits, [SamplingRequest(params, 0)])[0] for _ in range(2000)]
    frequencies = [draws.count(token) / len(draws) for token in range(4)]
    assert frequencies[3] == 0
    assert frequencies == pytest.approx([0.7, 0.2, 0.1, 0.0], abs=0.04)


def first_greedy_tokens(engine, prompt, n):
    return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]


def finish_of(engine, prompt, sampling):
    """(output tokens, finish reason of the last one) of a single request run to completion."""
    engine.add_request("probe", prompt, sampling)
    tokens = []
    while engine.has_work():
        tokens += [t for t in engine.step().tokens if t.request_id == "probe"]
    assert all(t.finish_reason is None for t in tokens[:-1])
    return [t.token_id for t in tokens], tokens[-1].finish_reason


def test_stop_token_ids_and_max_tokens(tiny_llama, make_engine, random_prompts):
    engine = make_engine(tiny_llama)
    prompt = random_prompts([10], seed=5)[0]
    reference = first_greedy_tokens(engine, prompt, 8)
    stop_at = reference[4]
    expected_len = reference.index(stop_at) + 1
    tokens, reason = finish_of(engine, prompt, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at]))
    assert (tokens, reason) == (reference[:expected_len], "stop")
    tokens, reason = finish_of(engine, prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert (tokens, reason) == (reference[:3], "length")


def test_eos_stops_unless_ignored(tiny_llama, make_engine, random_prompts):
    engine = make_engine(tiny_llama)
    prompt = random_prompts([10], seed=5)[0]
    reference = first_greedy_tokens(engine, prompt, 8)
    engine.eos_token_ids = {reference[2]}
    expected = reference[: reference.index(reference[2]) + 1]
    assert finish_of(engine, prompt, SamplingParams(max_tokens=8, temperature=0)) == (expected, "stop")
    tokens, reason = finish_of(engine, prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert (tokens, reason) == (reference, "length")


def test_max_model_len(tiny_llama, make_engine, random_prompts):
    engine = make_engine(tiny_llama, max_model_len=24)
    prompt = random_prompts([20], seed=6)[0]
    tokens, reason = finish_of(engine, prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert (len(prompt) + len(tokens), reason) == (24, "length")
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("too-long", prompt, SamplingParams(max_tokens=5))
