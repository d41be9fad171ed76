"""The paged KV pool: one preallocated tensor of blocks, its allocator (``engine.block_pool``), and raw
export/import of blocks.

Pool shape ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` (2 = K, V). It is block-major: the
K and V of all layers for one block's ``block_size`` token positions are ONE contiguous buffer of
``layout``-shape ``[num_layers, 2, block_size, num_kv_heads, head_dim]``, so one block travels as one frame.
Token position ``p`` of a sequence with block table ``t`` lives in block ``t[p // block_size]`` at offset
``p % block_size``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from diptych.engine.block_pool import BlockAllocator, OutOfBlocksError
from diptych.proto.messages import KVLayout

__all__ = ["BlockAllocator", "KVCachePool", "OutOfBlocksError", "bytes_per_block", "dtype_name"]


class KVCachePool:
    """The pool tensor on ``device`` plus its allocator. ``layout`` describes one block for peers."""

    def __init__(self, layout: KVLayout, num_blocks: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if layout.dtype != dtype_name(dtype):
            raise ValueError(f"layout dtype {layout.dtype} does not match the pool dtype {dtype}")
        self.layout = layout
        self.block_shape = (layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.dtype = dtype
        # Zeros, not empty: masked-out positions are multiplied by a zero probability, which must not meet NaN.
        self.pool = torch.zeros((num_blocks, *self.block_shape), dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.layout, self.dtype)

    def export_blocks(self, block_ids: list[int]) -> list[memoryview]:
        """One contiguous CPU buffer per block, in order, copied out of the pool: still valid after the blocks
        are freed and reused."""
        self._check_ids(block_ids)
        index = torch.tensor(block_ids, dtype=torch.long, device=self.pool.device)
        gathered = self.pool.index_select(0, index)
        if gathered.device.type == "cuda":  # through pinned memory (cached by torch's host allocator)
            host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            host.copy_(gathered)
        else:
            host = gathered.cpu()
        raw = host.view(torch.uint8).reshape(len(block_ids), -1).numpy()
        return [memoryview(row) for row in raw]

    def import_blocks(self, block_ids: list[int], frames: list[Any]) -> None:
        """Write received raw block buffers (``bytes``, ``memoryview``, ``zmq.Frame`` or anything exposing the
        buffer protocol) into ``block_ids``, in order. Raises ``ValueError`` on a count or size mismatch, before
        writing anything."""
        self._check_ids(block_ids)
        if len(frames) != len(block_ids):
            raise ValueError(f"got {len(frames)} KV frames for {len(block_ids)} blocks")
        buffers = [_as_buffer(frame) for frame in frames]
        expected = self.bytes_per_block
        for i, buffer in enumerate(buffers):
            if buffer.nbytes != expected:
                raise ValueError(f"KV frame {i} has {buffer.nbytes} bytes, a block of {self.layout} has {expected}")
        if not buffers:
            return
        with warnings.catch_warnings():  # read-only frames are fine: they are only read, and stack copies them
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            blocks = [torch.frombuffer(buffer, dtype=torch.uint8).view(self.dtype) for buffer in buffers]
        pinned = self.pool.device.type == "cuda"
        host = torch.empty((len(blocks), *self.block_shape), dtype=self.dtype, pin_memory=pinned)
        torch.stack(blocks, out=host.view(len(blocks), -1))
        index = torch.tensor(block_ids, dtype=torch.long, device=self.pool.device)
        self.pool.index_copy_(0, index, host.to(self.pool.device, non_blocking=pinned))

    def _check_ids(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"KV block id {block_id} outside the pool of {self.num_blocks} blocks")


def dtype_name(dtype: torch.dtype) -> str:
    """The ``KVLayout.dtype`` spelling of a torch dtype ("float32", "bfloat16", ...)."""
    return str(dtype).removeprefix("torch.")


def bytes_per_block(layout: KVLayout, dtype: torch.dtype) -> int:
    """Bytes of one block of ``layout``: K and V of every layer for ``block_size`` positions."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return layout.num_layers * 2 * layout.block_size * layout.num_kv_heads * layout.head_dim * element_size


def _as_buffer(frame: Any) -> memoryview:
    """A flat byte view of a received frame without copying (``zmq.Frame`` exposes ``.buffer``)."""
    buffer = getattr(frame, "buffer", frame)
    return memoryview(buffer).cast("B")
