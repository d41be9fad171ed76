"""A fused decode-only forward for Llama-family models (Llama, Mistral, Qwen2) on CUDA, captured in the decode graphs.

Per layer it runs ten kernels instead of the thirty-odd of the module-by-module forward: residual add + RMSNorm,
one QKV projection (the three weights concatenated), rotary + KV store, paged decode attention, the output
projection, residual add + RMSNorm, one gate-up projection, SiLU-and-multiply, the down projection. At small batch
a decode step is bound by launch latency as much as by weight bandwidth, so fewer, larger kernels are what moves it
toward the floor. The concatenated weights become the model's storage (q/k/v and gate/up parameters are re-pointed
to slices of them), so nothing is duplicated and the Hugging Face forward, used for prefill, keeps working.

``forward_packed`` runs any packed iteration (prefill chunks and decodes) the same way, eagerly: with a third of
the kernel launches of the module-by-module forward, a chunk of a few hundred tokens is bound by the GPU rather than
by the host issuing launches.

Supported: model types llama, mistral, qwen2 with default rotary embedding, SiLU MLP and full attention in every
layer; otherwise ``FastDecoder.supports`` is False and the decode graphs capture the Hugging Face forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.nn.functional as F

from diptych.engine.fused_kernels import add_rmsnorm, rotary_store, silu_mul
from diptych.engine.paged_attention_cuda import CudaAttentionContext, paged_attention
from diptych.engine.triton_kernels import decode_attention

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}

# The Llama-family module tree the fused forward reads (torch types every submodule only as ``Module``).


class _RMSNorm(Protocol):
    weight: torch.Tensor
    variance_epsilon: float


class _Attention(Protocol):
    q_proj: torch.nn.Linear
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear
    o_proj: torch.nn.Linear


class _MLP(Protocol):
    gate_proj: torch.nn.Linear
    up_proj: torch.nn.Linear
    down_proj: torch.nn.Linear


class _DecoderLayer(Protocol):
    self_attn: _Attention
    mlp: _MLP
    input_layernorm: _RMSNorm
    post_attention_layernorm: _RMSNorm


class _RotaryEmbedding(Protocol):
    inv_freq: torch.Tensor


class _Decoder(Protocol):
    embed_tokens: torch.nn.Embedding
    norm: _RMSNorm
    rotary_emb: _RotaryEmbedding
    layers: Sequence[_DecoderLayer]


class _CausalLM(Protocol):
    """A Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``."""

    config: PretrainedConfig
    model: _Decoder
    lm_head: torch.nn.Linear


Attend = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Attention of a layer's queries ``[T, heads, D]`` over its cache (K/V already stored); returns ``[T, heads, D]``."""


class FastDecoder:
    """The fused forward over ``model``'s weights (fused in place at construction)."""

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        config = cast("PretrainedConfig", model.config)
        if config.model_type not in SUPPORTED_TYPES or getattr(config, "hidden_act", "silu") != "silu":
            return False
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type != "default":
            return False
        if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
            return False
        if config.model_type == "qwen2":
            return not getattr(config, "use_sliding_window", False)
        return getattr(config, "sliding_window", None) is None

    def __init__(self, model: torch.nn.Module) -> None:
        lm = cast(_CausalLM, model)
        config = lm.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        decoder = lm.model
        self.embed = decoder.embed_tokens.weight
        self.norm = (decoder.norm.weight, decoder.norm.variance_epsilon)
        self.lm_head = lm.lm_head.weight
        rotary = decoder.rotary_emb
        self.inv_freq = rotary.inv_freq.float().contiguous()
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.layers = [self._fuse(layer) for layer in decoder.layers]

    @staticmethod
    def _fuse(layer: _DecoderLayer) -> dict[str, Any]:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
        qkv_bias = _concatenate([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
        gate_up = _concatenate([mlp.gate_proj, mlp.up_proj])
        return {
            "input_norm": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
            "post_norm": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
            "qkv": qkv, "qkv_bias": qkv_bias, "o": attn.o_proj.weight, "o_bias": attn.o_proj.bias,
            "gate_up": gate_up, "down": mlp.down_proj.weight,
        }

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor,
                tables: torch.Tensor, context_lens: torch.Tensor, num_splits: int) -> torch.Tensor:
        """One decode token per sequence: ``input_ids``/``positions``/``slots`` ``[n]``; returns float32 logits
        ``[n, vocab]``."""
        def attend(q: torch.Tensor, layer_cache: torch.Tensor) -> torch.Tensor:
            return decode_attention(q, layer_cache, tables, context_lens, self.scale, None, num_splits)

        hidden, residual = self._layers(input_ids, positions, pool, slots, attend)
        x, _ = add_rmsnorm(hidden, residual, *self.norm)
        return F.linear(x, self.lm_head).float()

    def forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor, context: CudaAttentionContext,
                       keep: torch.Tensor) -> torch.Tensor:
        """Any packed iteration (prefill chunks and decodes, as ``CudaAttentionContext`` describes them); returns
        float32 logits ``[len(keep), vocab]`` for the packed rows ``keep``."""
        def attend(q: torch.Tensor, layer_cache: torch.Tensor) -> torch.Tensor:
            return paged_attention(q, layer_cache, context, self.scale)

        hidden, residual = self._layers(input_ids, positions, context.pool, context.slots, attend)
        assert residual is not None, "the model has no decoder layers"
        x, _ = add_rmsnorm(hidden.index_select(0, keep), residual.index_select(0, keep), *self.norm)
        return F.linear(x, self.lm_head).float()

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor,
                attend: Attend) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = input_ids.shape[0]
        hidden = F.embedding(input_ids, self.embed)
        residual: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            x, residual = add_rmsnorm(hidden, residual, *layer["input_norm"])
            qkv = F.linear(x, layer["qkv"], layer["qkv_bias"])
            layer_cache = pool[:, index]
            q = rotary_store(qkv, positions, self.inv_freq, self.attention_scaling, self.num_heads,
                             self.num_kv_heads, layer_cache, slots)
            hidden = F.linear(attend(q, layer_cache).reshape(n, -1), layer["o"], layer["o_bias"])
            x, residual = add_rmsnorm(hidden, residual, *layer["post_norm"])
            hidden = F.linear(silu_mul(F.linear(x, layer["gate_up"])), layer["down"])
        return hidden, residual


def _concatenate(linears: list[torch.nn.Linear], name: str = "weight") -> torch.Tensor | None:
    """One tensor holding the linears' ``name`` tensors stacked on dim 0; each linear's parameter becomes a view of
    it (the old storage is freed)."""
    tensors = [getattr(linear, name) for linear in linears]
    if any(t is None for t in tensors):
        if all(t is None for t in tensors):
            return None
        raise ValueError(f"some projections have a {name}, some do not")
    fused = torch.cat([t.detach() for t in tensors], dim=0)
    start = 0
    for linear, tensor in zip(linears, tensors):
        size = tensor.shape[0]
        setattr(linear, name, torch.nn.Parameter(fused[start:start + size], requires_grad=False))
        start += size
    return fused
