"""Triton kernels of the fused decode forward (``engine.fast_decoder``): residual add + RMSNorm, rotary embedding +
KV store, SiLU-and-multiply. Each reproduces Hugging Face's Llama-family arithmetic and rounding order (float32
inside, rounded to the activation dtype where transformers rounds), so the fused path stays within rounding of
the module-by-module one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(h_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(h_ptr + row * hidden + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * hidden + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)  # HF adds in the model dtype
    tl.store(res_out_ptr + row * hidden + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) / hidden
    normed = (xf * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rmsnorm(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(h + residual) * weight, h + residual)`` for ``h`` ``[n, hidden]`` (contiguous); without
    ``residual`` the second result is ``h`` itself (copied)."""
    n, hidden = h.shape
    out = torch.empty_like(h)
    res_out = torch.empty_like(h)
    _add_rmsnorm_kernel[(n,)](h, residual if residual is not None else h, weight, out, res_out, hidden, eps,
                              HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(hidden), num_warps=8)
    return out, res_out


@triton.jit
def _rotary_store_kernel(qkv_ptr, pos_ptr, inv_freq_ptr, q_out_ptr, cache_ptr, slots_ptr,
                         stride_row, num_heads, num_kv_heads, attention_scaling,
                         stride_block, stride_kv, stride_slot, stride_head, block_size,
                         HALF: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + token).to(tl.float32)
    freqs = tl.load(inv_freq_ptr + i) * pos
    dtype = q_out_ptr.dtype.element_ty
    cos = (tl.cos(freqs) * attention_scaling).to(dtype).to(tl.float32)
    sin = (tl.sin(freqs) * attention_scaling).to(dtype).to(tl.float32)
    base = qkv_ptr + token.to(tl.int64) * stride_row + head * 2 * HALF
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    # HF: x * cos + rotate_half(x) * sin, each product and the sum rounded to the model dtype
    out1 = ((x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    if head < num_heads:
        dst = q_out_ptr + (token.to(tl.int64) * num_heads + head) * 2 * HALF
        tl.store(dst + i, out1)
        tl.store(dst + HALF + i, out2)
    else:
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot >= 0:
            kv_head = head - num_heads
            dst = cache_ptr + (slot // block_size) * stride_block + (slot % block_size) * stride_slot + \
                kv_head * stride_head
            tl.store(dst + i, out1.to(cache_ptr.dtype.element_ty))
            tl.store(dst + HALF + i, out2.to(cache_ptr.dtype.element_ty))
            v = base + num_kv_heads * 2 * HALF
            tl.store(dst + stride_kv + i, tl.load(v + i).to(cache_ptr.dtype.element_ty))
            tl.store(dst + stride_kv + HALF + i, tl.load(v + HALF + i).to(cache_ptr.dtype.element_ty))


def rotary_store(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                 num_heads: int, num_kv_heads: int, layer_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``qkv`` ``[n, (heads + 2 kv_heads) * D]`` (rows contiguous): rotate q (returned ``[n, heads, D]``) and k at
    ``positions``; write k and v into ``layer_cache`` at ``slots`` (-1 = skip)."""
    n = qkv.shape[0]
    head_dim = layer_cache.shape[-1]
    q = torch.empty((n, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rotary_store_kernel[(n, num_heads + num_kv_heads)](
        qkv, positions, inv_freq, q, layer_cache, slots, qkv.stride(0), num_heads, num_kv_heads, attention_scaling,
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        layer_cache.shape[2], HALF=head_dim // 2, num_warps=1,
    )
    return q


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` ``[n, 2 * inter]`` (gate first)."""
    n, width = gate_up.shape
    inter = width // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block, num_warps=4)
    return out
