"""Engine configuration: which model, where it runs, and how large the paged KV pool is.

Units: ``block_size`` is tokens per KV block, ``num_blocks`` is blocks, ``kv_memory_gb`` is GiB (2**30 bytes) of
KV pool, ``max_model_len`` is tokens (prompt plus generated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Accepted explicit ``EngineConfig.dtype`` names; "auto" picks float32 on CPU and bfloat16 on CUDA."""

_DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+)$")


@dataclass
class EngineConfig:
    """How to build an ``Engine``. Every field is validated on construction (``ValueError`` with the reason).

    ``model`` is a Hugging Face hub id or a local directory; None selects the built-in tiny random Llama (built
    once into the local cache). ``num_blocks`` None derives the pool size from ``kv_memory_gb`` and the model's
    KV layout. ``max_model_len`` None takes the model config's ``max_position_embeddings``.
    """

    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_gb: float = 0.25
    max_model_len: int | None = None
    seed: int = 0
    cuda_graph_max_batch: int = 128
    """CUDA only: decode-only iterations of up to this many sequences replay captured CUDA graphs (0: off)."""
    cuda_fused_decode: bool = True
    """CUDA only: iterations (decode graphs and packed prefill/mixed passes) run the fused Llama-family forward
    (``engine.fast_decoder``) when the model supports it, else the Hugging Face modules."""

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ValueError("model must be a non-empty string (hub id or local path) or None")
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {self.block_size!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks <= 0):
            raise ValueError(f"num_blocks must be a positive integer or None, got {self.num_blocks!r}")
        if not self.kv_memory_gb > 0:
            raise ValueError(f"kv_memory_gb must be positive, got {self.kv_memory_gb!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len <= 1):
            raise ValueError(f"max_model_len must be an integer > 1 or None, got {self.max_model_len!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.cuda_fused_decode, bool):
            raise ValueError(f"cuda_fused_decode must be a bool, got {self.cuda_fused_decode!r}")
        if not isinstance(self.cuda_graph_max_batch, int) or self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be an integer >= 0, got {self.cuda_graph_max_batch!r}")

    def torch_dtype(self) -> torch.dtype:
        """The resolved parameter and KV dtype ("auto": float32 on CPU, bfloat16 on CUDA)."""
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]

    def kv_pool_blocks(self, bytes_per_block: int) -> int:
        """Pool size in blocks: ``num_blocks`` if set, else as many blocks of ``bytes_per_block`` as fit in
        ``kv_memory_gb`` GiB (at least one)."""
        if self.num_blocks is not None:
            return self.num_blocks
        return max(1, int(self.kv_memory_gb * 2**30) // bytes_per_block)
