"""Loads a Hugging Face causal LM onto the paged KV pool and runs packed forward passes.

The model is loaded with ``attn_implementation="diptych_paged"`` (``engine.attention``) in eval mode and runs
under ``torch.inference_mode`` with ``use_cache=False``: all KV lives in the runner's ``KVCachePool``. One
``execute`` call runs one iteration: every item's new tokens are packed into one ``[1, T]`` sequence and logits
are computed only for the items that sample. On CUDA (power-of-two head and block sizes) ``execute`` goes through
``engine.cuda_runner.CudaExecutor``: Triton paged attention and CUDA graphs for decode-only iterations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from diptych.engine.attention import ATTENTION_NAME, build_context
from diptych.engine.config import EngineConfig
from diptych.engine.kv_cache import KVCachePool, bytes_per_block, dtype_name
from diptych.engine.paged_attention_cuda import kernels_support
from diptych.engine.scheduler import ForwardItem
from diptych.proto.messages import KVLayout

if TYPE_CHECKING:
    from diptych.engine.cuda_runner import CudaExecutor

__all__ = ["ForwardItem", "ModelRunner", "UnsupportedModelError"]

SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


class UnsupportedModelError(ValueError):
    """The model's attention cannot run on the paged attention function."""


class ModelRunner:
    """Owns the model, its tokenizer and the KV pool sized by ``config``.

    Attributes: ``tokenizer``, ``kv`` (the ``KVCachePool``), ``layout``, ``eos_token_ids`` (config, generation
    config and tokenizer EOS ids), ``vocab_size`` and ``max_position_embeddings`` (tokens, None if unknown).
    """

    def __init__(self, config: EngineConfig, model_path: str, model: PreTrainedModel | None = None) -> None:
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.dtype, attn_implementation=ATTENTION_NAME
            )
        elif model.dtype != self.dtype:
            raise ValueError(f"the given model is {model.dtype}, the engine is configured for {self.dtype}")
        self.model = model
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types .to as a method wrapper
        check_supported(self.model)
        model_config = self.model.config
        self.vocab_size: int = model_config.vocab_size
        self.max_position_embeddings: int | None = getattr(model_config, "max_position_embeddings", None)
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        layout = KVLayout(
            num_layers=model_config.num_hidden_layers,
            num_kv_heads=getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads,
            head_dim=getattr(model_config, "head_dim", None)
            or model_config.hidden_size // model_config.num_attention_heads,
            block_size=config.block_size,
            dtype=dtype_name(self.dtype),
        )
        num_blocks = config.kv_pool_blocks(bytes_per_block(layout, self.dtype))
        self.kv = KVCachePool(layout, num_blocks, self.dtype, self.device)
        self.layout = layout
        self.cuda: CudaExecutor | None = None
        if self.device.type == "cuda" and kernels_support(layout.head_dim, layout.block_size):
            from diptych.engine.cuda_runner import CudaExecutor

            max_len = config.max_model_len or self.max_position_embeddings or 8192
            self.cuda = CudaExecutor(self.model, self.kv.pool, max_len, config.cuda_graph_max_batch,
                                     config.cuda_fused_decode)

    @torch.inference_mode()
    def execute(self, items: list[ForwardItem]) -> torch.Tensor:
        """Run one packed forward pass; returns float32 logits ``[number of items with needs_logits, vocab]``, in
        item order, on the model's device."""
        if not items:
            raise ValueError("execute needs at least one item")
        if self.cuda is not None:
            return self.cuda.execute(items)
        token_ids: list[int] = []
        positions: list[list[int]] = []
        keep: list[int] = []
        for item in items:
            if not item.token_ids:
                raise ValueError("a forward item needs at least one token")
            token_ids.extend(item.token_ids)
            positions.append(list(range(item.start_position, item.start_position + len(item.token_ids))))
            if item.needs_logits:
                keep.append(len(token_ids) - 1)
        context = build_context(self.kv.pool, positions, [item.block_table for item in items])
        flat_positions = [p for seq_positions in positions for p in seq_positions]
        output = self.model(
            input_ids=torch.tensor([token_ids], dtype=torch.long, device=self.device),
            position_ids=torch.tensor([flat_positions], dtype=torch.long, device=self.device),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            paged_context=context,
        )
        return output.logits[0].float()


def check_supported(model: PreTrainedModel) -> None:
    """Raise ``UnsupportedModelError`` unless the model routes standard (causal, optionally sliding-window)
    softmax attention through transformers' ``AttentionInterface`` with our implementation selected."""
    config = model.config
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(f"{name} does not support custom attention backends (AttentionInterface)")
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        raise UnsupportedModelError(f"{name} did not select attn_implementation={ATTENTION_NAME!r}")
    if getattr(config, "is_causal", True) is False:
        raise UnsupportedModelError(f"{name} is not a causal decoder")
    unsupported_layers = set(getattr(config, "layer_types", None) or []) - SUPPORTED_LAYER_TYPES
    if unsupported_layers:
        raise UnsupportedModelError(f"{name} has layer types {sorted(unsupported_layers)}; supported: "
                                    f"{sorted(SUPPORTED_LAYER_TYPES)}")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(f"{name} uses attention logit soft-capping, which paged attention lacks")


def _eos_token_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [model.config.eos_token_id, tokenizer.eos_token_id]
    if model.generation_config is not None:
        sources.append(model.generation_config.eos_token_id)
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(i for i in source if isinstance(i, int))
    return ids
