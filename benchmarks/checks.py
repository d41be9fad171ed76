"""Checks that run beside the engine benchmark: greedy agreement with HF ``generate`` on the benchmarked model, and
a comparison of decode attention implementations over the paged pool (the choice the CUDA path makes)."""

from __future__ import annotations

from typing import Any

import torch

from diptych.benchmarks import hf_baseline
from diptych.benchmarks.common import ModelUnderTest, random_prompts, table
from diptych.cluster.blocks import blocks_for
from diptych.proto.messages import SamplingParams

BF16_EPS = 2.0**-8


def greedy_agreement(engine, mut: ModelUnderTest, new_tokens: int, lengths=(37, 200, 513, 1000)) -> list[dict]:
    """Greedy tokens of the engine and of HF ``generate`` (sdpa) per prompt; at the first divergence, HF's margin
    between its own top token and ours (a margin within bf16 rounding of the logits means a rounding tie)."""
    lengths = [n for n in lengths if n + new_tokens <= engine.max_model_len]
    prompts = random_prompts(len(lengths), max(lengths), mut.model.config.vocab_size, seed=11)
    prompts = [p[:n] for p, n in zip(prompts, lengths)]
    ours = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    theirs, scores = hf_baseline.greedy_with_scores(mut.model, prompts, new_tokens, mut.model.device)
    control, _ = hf_baseline.greedy_with_scores(mut.model, prompts, new_tokens, mut.model.device, "eager")
    rows = []
    for prompt, a, b, s, c in zip(prompts, ours, theirs, scores, control):
        first = _first_difference(a, b)
        row: dict[str, Any] = {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "first_divergence": first,
               "hf_eager_vs_sdpa_divergence": _first_difference(c, b)}
        if first is not None:
            logits = s[first]
            top = float(logits.max())
            row["hf_margin"] = top - float(logits[a[first]])
            row["rounding_scale"] = abs(top) * BF16_EPS
        rows.append(row)
    return rows


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def format_agreement(rows: list[dict]) -> str:
    def show(index):
        return "none (exact)" if index is None else index

    out = [[r["prompt_tokens"], r["new_tokens"], show(r["first_divergence"]), r.get("hf_margin", "-"),
            r.get("rounding_scale", "-"), show(r.get("hf_eager_vs_sdpa_divergence"))] for r in rows]
    return table(["prompt tokens", "new tokens", "ours vs HF sdpa: first divergent token", "HF logit margin there",
                  "bf16 rounding of top logit", "HF eager vs HF sdpa: first divergent token"], out)


def _events_time(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


@torch.inference_mode()
def attention_variants(batch: int, context: int, mut: ModelUnderTest, device) -> list[dict]:
    """One layer's decode attention for ``batch`` sequences of ``context`` tokens, three ways, on random bf16 data:
    the Triton kernel on the pool (ours), gather + SDPA (the reference path), gather + ``varlen_attn``."""
    from diptych.engine.attention import SingleQueryBatch, _attend_single_queries
    from diptych.engine.triton_kernels import decode_attention, num_splits_for

    c = mut.model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    block_size = 16
    per_seq = blocks_for(context, block_size)
    cache = torch.randn(batch * per_seq + 8, 2, block_size, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    tables = torch.randperm(batch * per_seq + 8, device=device)[: batch * per_seq].view(batch, per_seq)
    lens = torch.full((batch,), context, device=device)
    queries = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    kv_bytes = batch * context * 2 * kv_heads * head_dim * 2
    splits = num_splits_for(batch, kv_heads, torch.cuda.get_device_properties(device).multi_processor_count)
    tables32, lens32 = tables.to(torch.int32), lens.to(torch.int32)
    reference_batch = SingleQueryBatch(torch.arange(batch, device=device), tables, lens,
                                       torch.arange(per_seq * block_size, device=device))
    variants = {
        "triton paged (ours)": lambda: decode_attention(queries, cache, tables32, lens32, scale, None, splits),
        "gather + SDPA": lambda: _attend_single_queries(queries, cache, reference_batch, scale, None),
        "gather + varlen_attn": lambda: _varlen(queries, cache, tables, context, heads // kv_heads),
    }
    reference = variants["gather + SDPA"]().float()
    rows = []
    for name, fn in variants.items():
        try:
            seconds = _events_time(fn)
            error = float((fn().float() - reference).norm() / reference.norm())
            rows.append({"variant": name, "us": seconds * 1e6, "kv_GBps": kv_bytes / seconds / 1e9,
                         "rel_error": error, "note": f"{splits} splits" if "triton" in name else ""})
        except Exception as exc:  # noqa: BLE001 (an optional peer API: report why it does not run)
            rows.append({"variant": name, "us": None, "kv_GBps": None, "rel_error": None,
                         "note": f"{type(exc).__name__}: {str(exc)[:100]}"})
    return [dict(r, batch=batch, context=context) for r in rows]


def _varlen(queries, cache, tables, context: int, groups: int):
    from torch.nn.attention.varlen import varlen_attn

    batch = queries.shape[0]
    blocks = cache[tables]  # [batch, per_seq, 2, block, kv_heads, D]
    keys = blocks[:, :, 0].reshape(batch, -1, *blocks.shape[-2:])[:, :context].reshape(-1, *blocks.shape[-2:])
    values = blocks[:, :, 1].reshape(batch, -1, *blocks.shape[-2:])[:, :context].reshape(-1, *blocks.shape[-2:])
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    cu_q = torch.arange(batch + 1, device=queries.device, dtype=torch.int32)
    cu_k = cu_q * context
    return varlen_attn(queries, keys, values, cu_q, cu_k, 1, context)


def format_variants(rows: list[dict]) -> str:
    out = [[r["variant"], r["batch"], r["context"], r["us"] if r["us"] is not None else "-",
            r["kv_GBps"] if r["kv_GBps"] is not None else "-",
            r["rel_error"] if r["rel_error"] is not None else "-", r["note"]] for r in rows]
    return table(["decode attention (one layer)", "batch", "context", "us", "KV GB/s", "rel. error vs SDPA", "note"],
                 out)
