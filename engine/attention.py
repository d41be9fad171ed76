"""Paged attention for Hugging Face decoder models: the ``diptych_paged`` attention implementation.

The model runner packs one iteration (prefill chunks and decodes of many sequences) into ONE flattened sequence
``[1, T]`` with per-token ``position_ids`` and passes a ``PagedAttentionContext`` as the forward kwarg
``paged_context``; transformers hands it to ``paged_attention_forward`` in every attention layer. Each layer

1. writes the K/V of the T new tokens into its layer of the pool, at their slots (block, offset), then
2. attends each query token to all cached positions of its own sequence, up to and including its own position
   (causal, bottom-right aligned: query ``i`` of a chunk starting at position ``p`` sees positions ``<= p + i``),
   within the layer's sliding window when the model has one.

Sequences with a single new token (decodes) are attended together in one padded batch; longer chunks one by one.
The module's ``scaling`` is used; grouped-query attention shares each KV head among ``num_key_value_groups`` query
heads. No Hugging Face cache is involved (run the model with ``use_cache=False``).

On CUDA the model runner passes an ``engine.paged_attention_cuda.CudaAttentionContext`` instead, and the layer runs
the Triton/SDPA path of that module; this module's own code is the reference path (CPU, and CUDA when the kernels
cannot be used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from diptych.cluster.blocks import blocks_for
from diptych.engine.paged_attention_cuda import CudaAttentionContext, cuda_attention_forward

ATTENTION_NAME = "diptych_paged"
"""Pass as ``attn_implementation`` to ``from_pretrained``."""


@dataclass
class PagedAttentionContext:
    """Where each packed token's K/V goes and what each sequence attends to, for one forward pass.

    Token ranges: sequence ``s`` owns packed tokens ``[query_starts[s], query_starts[s] + query_lens[s])`` at
    positions ``context_lens[s] - query_lens[s] ..`` ``context_lens[s] - 1``. ``slot_blocks[t]`` /
    ``slot_offsets[t]`` locate packed token ``t`` in the pool. ``block_tables[s]`` lists the blocks covering
    positions ``0 .. context_lens[s] - 1`` of sequence ``s`` (long tensor on the pool's device).
    """

    pool: torch.Tensor
    """``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, written in place."""
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[torch.Tensor]
    chunk_sequences: list[int]
    """Indices of the sequences with more than one new token (attended one by one)."""
    single_query: SingleQueryBatch | None
    """The sequences with exactly one new token, batched; None if there are none."""


@dataclass
class SingleQueryBatch:
    """Sequences with one new token each, attended together. ``block_tables`` is padded with block 0 to
    ``[n, max_blocks]``; ``key_positions`` ``[max_blocks * block_size]`` and ``context_lens`` ``[n]`` mask the
    padding."""

    token_indices: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    key_positions: torch.Tensor


def build_context(
    pool: torch.Tensor, positions: list[list[int]], block_tables: list[list[int]]
) -> PagedAttentionContext:
    """The context for sequences whose new tokens sit at ``positions[s]`` (consecutive, ending at the last
    position with KV after this pass), packed in order, with ``block_tables[s]`` covering those positions."""
    device = pool.device
    block_size = pool.shape[3]
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    query_starts, query_lens, context_lens, tables = [], [], [], []
    single_indices: list[int] = []
    chunk_indices: list[int] = []
    for index, (seq_positions, table) in enumerate(zip(positions, block_tables)):
        context_len = seq_positions[-1] + 1
        num_blocks = blocks_for(context_len, block_size)
        if len(table) < num_blocks:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {context_len} positions")
        query_starts.append(len(slot_blocks))
        query_lens.append(len(seq_positions))
        context_lens.append(context_len)
        tables.append(torch.tensor(table[:num_blocks], dtype=torch.long, device=device))
        slot_blocks.extend(table[p // block_size] for p in seq_positions)
        slot_offsets.extend(p % block_size for p in seq_positions)
        (single_indices if len(seq_positions) == 1 else chunk_indices).append(index)
    return PagedAttentionContext(
        pool=pool,
        slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
        slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
        query_starts=query_starts,
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        chunk_sequences=chunk_indices,
        single_query=_single_query_batch(single_indices, query_starts, context_lens, tables, block_size, device),
    )


def _single_query_batch(
    indices: list[int],
    query_starts: list[int],
    context_lens: list[int],
    tables: list[torch.Tensor],
    block_size: int,
    device: torch.device,
) -> SingleQueryBatch | None:
    if not indices:
        return None
    max_blocks = max(len(tables[i]) for i in indices)
    padded = torch.zeros((len(indices), max_blocks), dtype=torch.long, device=device)
    for row, i in enumerate(indices):
        padded[row, : len(tables[i])] = tables[i]
    return SingleQueryBatch(
        token_indices=torch.tensor([query_starts[i] for i in indices], dtype=torch.long, device=device),
        block_tables=padded,
        context_lens=torch.tensor([context_lens[i] for i in indices], dtype=torch.long, device=device),
        key_positions=torch.arange(max_blocks * block_size, device=device),
    )


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    paged_context: PagedAttentionContext | CudaAttentionContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the paged pool. ``query`` is ``[1, heads, T, head_dim]``, ``key``/``value``
    ``[1, kv_heads, T, head_dim]`` (rotary already applied). ``attention_mask`` is None for a custom
    implementation (masking is ours); ``kwargs`` takes the rest transformers passes (dropout, position ids), unused
    at inference. Returns ``([1, T, heads, head_dim], None)``."""
    if paged_context is None:
        raise RuntimeError(f"attn_implementation={ATTENTION_NAME!r} needs the forward kwarg paged_context")
    scale = scaling if scaling is not None else cast(int, module.head_dim) ** -0.5  # attribute of HF attention
    if isinstance(paged_context, CudaAttentionContext):
        return cuda_attention_forward(module, query, key, value, paged_context, scale, sliding_window), None
    ctx = paged_context
    layer_cache = ctx.pool[:, cast(int, module.layer_idx)]
    layer_cache[ctx.slot_blocks, 0, ctx.slot_offsets] = key[0].transpose(0, 1).to(layer_cache.dtype)
    layer_cache[ctx.slot_blocks, 1, ctx.slot_offsets] = value[0].transpose(0, 1).to(layer_cache.dtype)

    queries = query[0].transpose(0, 1)
    output = torch.empty_like(queries)
    single = ctx.single_query
    if single is not None:
        output[single.token_indices] = _attend_single_queries(queries, layer_cache, single, scale, sliding_window)
    for index in ctx.chunk_sequences:
        start = ctx.query_starts[index]
        end = start + ctx.query_lens[index]
        output[start:end] = _attend_chunk(
            queries[start:end], layer_cache, ctx.block_tables[index], ctx.context_lens[index], scale, sliding_window
        )
    return output.unsqueeze(0), None


def _gather_keys_values(layer_cache: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the blocks in ``tables`` (``[..., n_blocks]``) as ``[..., kv_heads, n_blocks * block_size, D]``."""
    blocks = layer_cache[tables]
    *lead, n_blocks, _, block_size, kv_heads, head_dim = blocks.shape
    flat = blocks.transpose(-5, -4).reshape(*lead, 2, n_blocks * block_size, kv_heads, head_dim)
    keys, values = flat.select(-4, 0), flat.select(-4, 1)
    return keys.transpose(-3, -2), values.transpose(-3, -2)


def _attend_chunk(
    queries: torch.Tensor,
    layer_cache: torch.Tensor,
    table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One sequence's chunk: ``queries`` ``[q, heads, D]`` at positions ``context_len - q ..``; returns
    ``[q, heads, D]``."""
    keys, values = _gather_keys_values(layer_cache, table)
    keys, values = keys[:, :context_len], values[:, :context_len]
    num_queries = queries.shape[0]
    query_positions = torch.arange(context_len - num_queries, context_len, device=queries.device)[:, None]
    key_positions = torch.arange(context_len, device=queries.device)[None, :]
    mask = _visible(query_positions, key_positions, sliding_window)
    out = _sdpa(queries.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), mask, scale)
    return out[0].transpose(0, 1)


def _attend_single_queries(
    queries: torch.Tensor,
    layer_cache: torch.Tensor,
    batch: SingleQueryBatch,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Sequences with one new token each: returns ``[n, heads, D]`` for their query tokens."""
    keys, values = _gather_keys_values(layer_cache, batch.block_tables)
    query_positions = (batch.context_lens - 1)[:, None]
    mask = _visible(query_positions, batch.key_positions[None, :], sliding_window)
    batch_queries = queries[batch.token_indices].unsqueeze(2)
    out = _sdpa(batch_queries, keys, values, mask[:, None, None, :], scale)
    return out[:, :, 0]


def _visible(query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility, broadcast over the two position tensors. Same rule as
    transformers' masks: key ``k`` is visible to query ``q`` iff ``k <= q`` and ``k > q - sliding_window``."""
    mask = key_positions <= query_positions
    if sliding_window is not None:
        mask = mask & (key_positions > query_positions - sliding_window)
    return mask


def _sdpa(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``queries`` ``[b, heads, q, D]``, ``keys``/``values`` ``[b, kv_heads, k, D]``, boolean ``mask``
    broadcastable to ``[b, heads, q, k]`` with at least one visible key per query."""
    return F.scaled_dot_product_attention(
        queries, keys.to(queries.dtype), values.to(queries.dtype), attn_mask=mask, scale=scale,
        enable_gqa=keys.shape[-3] != queries.shape[-3],
    )


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
