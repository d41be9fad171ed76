"""The CUDA path's pieces (skipped without a GPU): the Triton decode kernel against a float64 reference, KV stores,
and CUDA-graph replay giving the same greedy tokens as the eager path and HF ``generate``."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_exactness import GREEDY, NEW_TOKENS, PROMPT_LENGTHS, hf_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(queries, cache, tables, lens, scale, window):
    out = []
    kv_heads = cache.shape[3]
    for i in range(queries.shape[0]):
        n = int(lens[i])
        blocks = cache[tables[i, : -(-n // cache.shape[2])].long()].double()
        keys = blocks[:, 0].reshape(-1, kv_heads, cache.shape[4])[:n]
        values = blocks[:, 1].reshape(-1, kv_heads, cache.shape[4])[:n]
        low = 0 if window is None else max(0, n - window)
        groups = queries.shape[1] // kv_heads
        keys = keys[low:].repeat_interleave(groups, dim=1)
        values = values[low:].repeat_interleave(groups, dim=1)
        scores = torch.einsum("hd,khd->hk", queries[i].double(), keys) * scale
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window", [None, 40])
def test_decode_kernel_matches_reference(dtype, tolerance, splits, window):
    from diptych.engine.triton_kernels import decode_attention, store_kv

    torch.manual_seed(splits)
    blocks, block_size, kv_heads, head_dim, heads = 64, 16, 8, 128, 32
    pool = torch.randn(blocks, 2, 2, block_size, kv_heads, head_dim, device="cuda").to(dtype)
    cache = pool[:, 1]
    lens = torch.tensor([1, 17, 100, 300], device="cuda", dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks, device="cuda")[:20] for _ in range(4)]).to(torch.int32)
    slots = torch.tensor([int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(lens.tolist())] + [-1], device="cuda")
    keys = torch.randn(5, kv_heads, head_dim, device="cuda").to(dtype)
    values = torch.randn(5, kv_heads, head_dim, device="cuda").to(dtype)
    untouched = pool[:, 0].clone()
    store_kv(cache, keys, values, slots)
    assert torch.equal(pool[:, 0], untouched)
    for i, slot in enumerate(slots[:4].tolist()):
        assert torch.equal(cache[slot // block_size, 0, slot % block_size], keys[i])
        assert torch.equal(cache[slot // block_size, 1, slot % block_size], values[i])
    queries = torch.randn(4, heads, head_dim, device="cuda").to(dtype)
    out = decode_attention(queries, cache, tables, lens, head_dim**-0.5, window, splits)
    ref = _reference(queries, cache, tables, lens, head_dim**-0.5, window)
    assert float((out.double() - ref).norm() / ref.norm()) < tolerance


@pytest.mark.parametrize("graphs,fused", [(0, True), (16, True), (16, False)])
def test_graphs_and_eager_match_hf(tiny_llama, make_engine, random_prompts, graphs, fused):
    engine = make_engine(tiny_llama, device="cuda", dtype="float32", cuda_graph_max_batch=graphs,
                         cuda_fused_decode=fused)
    assert engine.runner.cuda is not None
    assert (engine.runner.cuda.graphs is not None) == bool(graphs)
    if graphs:
        assert (engine.runner.cuda.graphs.fused is not None) == fused
    prompts = random_prompts(PROMPT_LENGTHS, seed=5)
    assert engine.generate(prompts, GREEDY) == hf_greedy(tiny_llama, prompts, NEW_TOKENS)
    assert engine.load().free_blocks == engine.num_blocks
