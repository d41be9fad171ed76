"""Paged attention on CUDA devices: the ``diptych_paged`` attention function's fast path.

``engine.attention.paged_attention_forward`` hands a ``CudaAttentionContext`` here. Per layer:

1. the T new tokens' K/V go into the pool at ``slots`` (one Triton kernel; slot -1 writes nothing);
2. sequences with one new token (decodes, or a one-token prefill chunk) are attended together by the Triton
   flash-decoding kernel reading the pool directly (no gather), with ``num_splits`` splits of each context;
3. each longer chunk runs SDPA: a chunk that is a whole prompt attends to its own fresh K/V (``is_causal``,
   FlashAttention); a chunk with cached context gathers its blocks and uses a bottom-right causal mask.

Every tensor a decode-only pass reads lives in the context, so the pass can be captured in a CUDA graph
(``engine.cuda_graphs``) and replayed with new contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass
class ChunkSpan:
    """One multi-token chunk: packed tokens ``[start, end)`` at positions ``context_len - (end - start) ..
    context_len - 1``; ``table`` (long, on the device) lists the blocks covering positions ``0 .. context_len-1``."""

    start: int
    end: int
    context_len: int
    table: torch.Tensor


@dataclass
class CudaAttentionContext:
    """What every layer needs for one packed forward pass on CUDA.

    ``slots`` ``[T]`` (int64) is each packed token's pool slot (``block * block_size + offset``, -1 = none).
    ``decode_rows`` selects the single-token sequences among the packed tokens (None: every token is one);
    ``decode_tables`` ``[n, w]`` (int32) and ``decode_context_lens`` ``[n]`` (int32) describe them.
    """

    pool: torch.Tensor
    slots: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_tables: torch.Tensor | None
    decode_context_lens: torch.Tensor | None
    num_splits: int = 1
    chunks: list[ChunkSpan] = field(default_factory=list)


def kernels_support(head_dim: int, block_size: int) -> bool:
    """The Triton kernels need power-of-two head and block sizes (head_dim >= 16)."""
    def pow2(x: int) -> bool:
        return x > 0 and x & (x - 1) == 0

    return pow2(head_dim) and head_dim >= 16 and pow2(block_size)


def cuda_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: CudaAttentionContext,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """``query`` ``[1, heads, T, D]``, ``key``/``value`` ``[1, kv_heads, T, D]``; returns ``[1, T, heads, D]``."""
    from diptych.engine.triton_kernels import decode_attention, store_kv

    layer_cache = ctx.pool[:, cast(int, module.layer_idx)]  # the HF attention module's layer number
    keys = key[0].transpose(0, 1)
    values = value[0].transpose(0, 1)
    store_kv(layer_cache, keys, values, ctx.slots)

    queries = query[0].transpose(0, 1)  # [T, heads, D]
    if ctx.decode_rows is None and not ctx.chunks:
        tables, context_lens = _decode_tables(ctx)
        out = decode_attention(queries, layer_cache, tables, context_lens, scale, sliding_window, ctx.num_splits)
        return out.unsqueeze(0)
    output = torch.empty_like(queries)
    if ctx.decode_rows is not None and ctx.decode_rows.numel():
        selected = queries.index_select(0, ctx.decode_rows)
        tables, context_lens = _decode_tables(ctx)
        out = decode_attention(selected, layer_cache, tables, context_lens, scale, sliding_window, ctx.num_splits)
        output.index_copy_(0, ctx.decode_rows, out)
    for chunk in ctx.chunks:
        output[chunk.start:chunk.end] = _attend_chunk(
            queries[chunk.start:chunk.end], keys[chunk.start:chunk.end], values[chunk.start:chunk.end],
            layer_cache, chunk, scale, sliding_window,
        )
    return output.unsqueeze(0)


def paged_attention(queries: torch.Tensor, layer_cache: torch.Tensor, ctx: CudaAttentionContext, scale: float
                    ) -> torch.Tensor:
    """Attention of packed ``queries`` ``[T, heads, D]`` whose K/V are already in ``layer_cache`` (full attention):
    decode rows by the Triton kernel, chunks by SDPA over their gathered blocks. Returns ``[T, heads, D]``."""
    from diptych.engine.triton_kernels import decode_attention

    if ctx.decode_rows is None and not ctx.chunks:
        tables, context_lens = _decode_tables(ctx)
        return decode_attention(queries, layer_cache, tables, context_lens, scale, None, ctx.num_splits)
    output = torch.empty_like(queries)
    if ctx.decode_rows is not None and ctx.decode_rows.numel():
        tables, context_lens = _decode_tables(ctx)
        out = decode_attention(queries.index_select(0, ctx.decode_rows), layer_cache, tables, context_lens, scale,
                               None, ctx.num_splits)
        output.index_copy_(0, ctx.decode_rows, out)
    for chunk in ctx.chunks:
        output[chunk.start:chunk.end] = _attend_chunk(queries[chunk.start:chunk.end], None, None, layer_cache, chunk,
                                                      scale, None)
    return output


def _decode_tables(ctx: CudaAttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode rows' ``decode_tables`` and ``decode_context_lens``, set whenever some packed token is a decode."""
    assert ctx.decode_tables is not None and ctx.decode_context_lens is not None, "decode rows without their tables"
    return ctx.decode_tables, ctx.decode_context_lens


def _attend_chunk(
    queries: torch.Tensor,
    fresh_keys: torch.Tensor | None,
    fresh_values: torch.Tensor | None,
    layer_cache: torch.Tensor,
    chunk: ChunkSpan,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """``queries`` ``[q, heads, D]``; ``fresh_keys``/``fresh_values`` ``[q, kv_heads, D]`` are this chunk's own
    K/V (None: read them from the pool too). Returns ``[q, heads, D]``."""
    num_queries = queries.shape[0]
    context_len = chunk.context_len
    if context_len == num_queries and fresh_keys is not None:
        assert fresh_values is not None, "fresh keys come with fresh values"
        keys, values = fresh_keys, fresh_values
    else:
        blocks = layer_cache.index_select(0, chunk.table)  # [n, 2, block_size, kv_heads, D]
        keys = blocks[:, 0].reshape(-1, *blocks.shape[3:])[:context_len]
        values = blocks[:, 1].reshape(-1, *blocks.shape[3:])[:context_len]
    groups = queries.shape[1] // keys.shape[1]
    q = queries.transpose(0, 1).unsqueeze(0)
    k = keys.transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)
    v = values.transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)
    if sliding_window is not None and context_len > sliding_window:
        query_positions = torch.arange(context_len - num_queries, context_len, device=q.device)[:, None]
        key_positions = torch.arange(context_len, device=q.device)[None, :]
        mask = (key_positions <= query_positions) & (key_positions > query_positions - sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif context_len == num_queries:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(num_queries, context_len),
                                             scale=scale)
    return out[0].transpose(0, 1)
