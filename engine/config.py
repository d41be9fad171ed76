"""Engine configuration: which model, where it runs, and how large the paged KV pool is.

Units: ``block_size`` is tokens per KV block, ``num_blocks`` is blocks, ``kv_memory_gb`` is GiB (2**30 bytes) of
KV pool, ``gpu_memory_utilization`` a fraction of the GPU's total memory, ``max_model_len`` is tokens (prompt plus
generated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from diptych.engine.kv_rules import DEFAULT_WATERMARK_FRACTION

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Accepted explicit ``EngineConfig.dtype`` names; "auto" picks float32 on CPU and bfloat16 on CUDA."""

CPU_KV_MEMORY_GB = 0.25
"""KV pool GiB on CPU when neither ``num_blocks`` nor ``kv_memory_gb`` is set."""
ACTIVATION_RESERVE = 0.05
"""Fraction of the GPU's total memory kept out of the KV pool for activations, logits and CUDA graphs."""

_DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+)$")


@dataclass
class EngineConfig:
    """How to build an ``Engine``. Every field is validated on construction (``ValueError`` with the reason).

    ``model`` is a Hugging Face hub id or a local directory; None selects the built-in tiny random Llama (built once
    into the local cache). ``kv_watermark``: fraction of the pool that admitting new sequences leaves free while
    sequences run, for them to grow into (``engine.kv_rules``). Pool size: ``num_blocks`` if set, else
    ``kv_memory_gb`` GiB if set, else on CUDA what is left of this worker's ``gpu_memory_utilization`` of the GPU
    once the weights are loaded, less ``ACTIVATION_RESERVE`` (``kv_pool_bytes``), and on CPU ``CPU_KV_MEMORY_GB``.
    ``max_model_len`` None takes the model config's ``max_position_embeddings``.
    """

    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    seed: int = 0
    cuda_graph_max_batch: int = 128
    """CUDA only: decode-only iterations of up to this many sequences replay captured CUDA graphs (0: off)."""
    cuda_fused_decode: bool = True
    """CUDA only: iterations (decode graphs and packed prefill/mixed passes) run the fused Llama-family forward
    (``engine.fast_decoder``) when the model supports it, else the Hugging Face modules."""
    kv_watermark: float = DEFAULT_WATERMARK_FRACTION

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
        if self.kv_memory_gb is not None and not self.kv_memory_gb > 0:
            raise ValueError(f"kv_memory_gb must be positive or None, got {self.kv_memory_gb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len <= 1):
            raise ValueError(f"max_model_len must be an integer > 1 or None, got {self.max_model_len!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.cuda_fused_decode, bool):
            raise ValueError(f"cuda_fused_decode must be a bool, got {self.cuda_fused_decode!r}")
        if not isinstance(self.kv_watermark, (int, float)) or not 0 <= self.kv_watermark < 1:
            raise ValueError(f"kv_watermark must be a fraction in [0, 1), got {self.kv_watermark!r}")
        if not isinstance(self.cuda_graph_max_batch, int) or self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be an integer >= 0, got {self.cuda_graph_max_batch!r}")

    def torch_dtype(self) -> torch.dtype:
        """The resolved parameter and KV dtype ("auto": float32 on CPU, bfloat16 on CUDA)."""
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]

    def kv_pool_blocks(self, bytes_per_block: int) -> int:
        """Pool size in blocks: ``num_blocks`` if set, else as many blocks of ``bytes_per_block`` as fit in
        ``kv_pool_bytes()`` (at least one). Call it once the model's weights are on the device."""
        if self.num_blocks is not None:
            return self.num_blocks
        return max(1, self.kv_pool_bytes() // bytes_per_block)

    def kv_pool_bytes(self) -> int:
        """Bytes for the KV pool: ``kv_memory_gb`` GiB if set; on CPU ``CPU_KV_MEMORY_GB``; on CUDA this worker's
        share, ``gpu_memory_utilization`` of the device's total memory, less what this process already holds there
        (the weights) and less ``ACTIVATION_RESERVE`` of the total (activations, CUDA graphs, the CUDA context), and
        never more than is free now less that reserve. Workers sharing a GPU each take their share (``diptych serve``
        divides the fraction between them), so they fit whichever sizes its pool first. ``ValueError`` when nothing
        is left."""
        if self.kv_memory_gb is not None:
            return int(self.kv_memory_gb * 2**30)
        if self.device == "cpu":
            return int(CPU_KV_MEMORY_GB * 2**30)
        device = torch.device(self.device)
        free, total = torch.cuda.mem_get_info(device)
        reserve = int(total * ACTIVATION_RESERVE)
        own = torch.cuda.memory_reserved(device)
        budget = min(int(total * self.gpu_memory_utilization) - own - reserve, free - reserve)
        if budget <= 0:
            raise ValueError(f"no GPU memory left for the KV pool on {self.device}: this worker holds "
                             f"{own / 2**30:.1f} GiB, {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free, "
                             f"gpu_memory_utilization {self.gpu_memory_utilization} (raise it, or set kv_memory_gb "
                             f"or num_blocks)")
        return budget
