"""Triton kernels of the CUDA path: KV stores into the paged pool and single-query (decode) paged attention.

Pool layer view (what the kernels index): ``pool[:, layer]`` of shape ``[num_blocks, 2, block_size, kv_heads,
head_dim]`` with arbitrary strides except the last (contiguous). A slot is ``block * block_size + offset``; a
negative slot means "write nothing" (padding rows of a CUDA graph).

Decode attention is flash-decoding: program ``(sequence, kv_head, split)`` walks its share of the sequence's
pages, ``PAGES_PER_ITER`` pages at a time, for all query heads of that KV head at once (grouped-query attention:
the group is padded to 16 rows so the scores are one ``tl.dot``), keeping a running max and sum in float32. With
one split it writes the output directly; otherwise a reduce kernel merges the splits' partial results. Float32
inputs use exact (IEEE) dot products so float32 engines stay comparable with the CPU reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slots_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_block, stride_kv, stride_slot, stride_head,
    block_size, num_kv_heads,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HEAD_DIM)
        mask = (h < num_kv_heads)[:, None]
        k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        dst = cache_ptr + block * stride_block + offset * stride_slot + h[:, None] * stride_head + d[None, :]
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[T, kv_heads, head_dim]`` (any strides, last dim contiguous) into ``layer_cache``
    at ``slots`` ``[T]`` (int32/int64; negative = skip)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, layer_cache, slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        layer_cache.shape[2], num_kv_heads,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, num_warps=1,
    )


@triton.jit
def _attend_pages(
    q, cache_ptr, table_row, page, page_end, context_len, first_pos, kv_head, m_i, l_i, acc,
    stride_block, stride_kv, stride_slot, stride_head, scale,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, PAGES_PER_ITER: tl.constexpr, IEEE: tl.constexpr,
):
    """One step of the online softmax over ``PAGES_PER_ITER`` pages starting at ``page``."""
    N: tl.constexpr = PAGE * PAGES_PER_ITER
    n = tl.arange(0, N)
    d = tl.arange(0, HEAD_DIM)
    page_idx = page + n // PAGE
    in_pages = page_idx < page_end
    block = tl.load(table_row + page_idx, mask=in_pages, other=0).to(tl.int64)
    pos = page_idx * PAGE + n % PAGE
    valid = in_pages & (pos < context_len) & (pos >= first_pos)
    base = block * stride_block + (n % PAGE) * stride_slot + kv_head * stride_head
    k = tl.load(cache_ptr + base[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(cache_ptr + stride_kv + base[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, tables_ptr, context_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
    stride_block, stride_kv, stride_slot, stride_head,
    scale, window, num_heads,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, PAGES_PER_ITER: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    first_pos = tl.maximum(context_len - window, 0)
    first_page = first_pos // PAGE
    end_page = (context_len + PAGE - 1) // PAGE
    per_split = (end_page - first_page + NUM_SPLITS - 1) // NUM_SPLITS
    page_start = first_page + split * per_split
    page_end = tl.minimum(page_start + per_split, end_page)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    table_row = tables_ptr + seq.to(tl.int64) * stride_table
    if WHILE_LOOP:  # the interpreter cannot run a for loop over loaded bounds
        page = page_start
        while page < page_end:
            m_i, l_i, acc = _attend_pages(
                q, cache_ptr, table_row, page, page_end, context_len, first_pos, kv_head, m_i, l_i, acc,
                stride_block, stride_kv, stride_slot, stride_head, scale, HEAD_DIM, PAGE, PAGES_PER_ITER, IEEE)
            page += PAGES_PER_ITER
    else:
        for page in range(page_start, page_end, PAGES_PER_ITER):
            m_i, l_i, acc = _attend_pages(
                q, cache_ptr, table_row, page, page_end, context_len, first_pos, kv_head, m_i, l_i, acc,
                stride_block, stride_kv, stride_slot, stride_head, scale, HEAD_DIM, PAGE, PAGES_PER_ITER, IEEE)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
        tl.store(part_ml_ptr + row * 2, m_i, mask=g < GROUP)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g < GROUP)


@triton.jit
def _reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh, num_heads,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    valid = s < NUM_SPLITS
    row = (seq * num_heads + head) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + row * 2, mask=valid, other=float("-inf"))
    denom = tl.load(part_ml_ptr + row * 2 + 1, mask=valid, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(valid & (denom > 0), tl.exp(m - m_max), 0.0)
    total = tl.sum(w * denom, 0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_splits_for(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per sequence so that about four programs per multiprocessor run (1 to 16)."""
    return max(1, min(16, -(-4 * num_sms // max(1, num_seqs * num_kv_heads))))


def decode_attention(
    queries: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    pages_per_iter: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence: ``queries`` ``[n, heads, head_dim]`` at position
    ``context_lens[i] - 1`` of sequence ``i``, whose KV is in ``layer_cache`` at ``block_tables[i]`` (``[n, w]``
    int32). Rows with ``context_lens == 0`` give zeros. Returns ``[n, heads, head_dim]`` in the queries' dtype."""
    num_seqs, num_heads, head_dim = queries.shape
    num_kv_heads = layer_cache.shape[3]
    page = layer_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(queries)
    if num_seqs == 0:
        return out
    if num_splits > 1:
        part_acc = torch.empty((num_seqs * num_heads * num_splits, head_dim), dtype=torch.float32,
                               device=queries.device)
        part_ml = torch.empty((num_seqs * num_heads * num_splits, 2), dtype=torch.float32, device=queries.device)
    else:
        part_acc = part_ml = out  # unused
    pages_per_iter = max(1, 64 // page) if pages_per_iter is None else pages_per_iter
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        queries, layer_cache, block_tables, context_lens, out, part_acc, part_ml,
        queries.stride(0), queries.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        scale, sliding_window or 2**30, num_heads,
        NUM_SPLITS=num_splits, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        PAGE=page, PAGES_PER_ITER=pages_per_iter, IEEE=queries.dtype == torch.float32, WHILE_LOOP=_INTERPRETED,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), num_heads,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, num_warps=4,
        )
    return out
