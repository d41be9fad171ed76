"""The KV pool: allocator bookkeeping, block-major layout, and raw export/import of blocks."""

from __future__ import annotations

import pytest
import torch
import zmq

from diptych.engine.kv_cache import BlockAllocator, KVCachePool, OutOfBlocksError, bytes_per_block, dtype_name
from diptych.proto.messages import KVLayout


def small_pool(dtype=torch.float32, num_blocks=6) -> KVCachePool:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=3, dtype=dtype_name(dtype))
    return KVCachePool(layout, num_blocks, dtype, "cpu")


def test_allocator_hands_out_each_block_once_and_refuses_double_free():
    allocator = BlockAllocator(4)
    first = allocator.allocate(3)
    assert len(set(first)) == 3 and allocator.num_free == 1
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(2)
    assert allocator.num_free == 1  # a failed allocation takes nothing
    allocator.free(first[:2])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([first[0]])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([first[2], first[2]])
    with pytest.raises(ValueError):
        allocator.free([17])
    assert allocator.num_free == 3  # failed frees change nothing
    allocator.free([first[2]])
    assert sorted(allocator.allocate(4)) == [0, 1, 2, 3]


def test_pool_is_block_major_and_layout_matches():
    pool = small_pool()
    assert pool.pool.shape == (6, 2, 2, 3, 2, 4)
    assert pool.pool[1].is_contiguous()
    assert (pool.layout.num_layers, pool.layout.num_kv_heads, pool.layout.head_dim, pool.layout.block_size,
            pool.layout.dtype) == (2, 2, 4, 3, "float32")
    assert pool.bytes_per_block == bytes_per_block(pool.layout, torch.float32) == 2 * 2 * 3 * 2 * 4 * 4
    with pytest.raises(ValueError, match="dtype"):
        KVCachePool(pool.layout, 2, torch.bfloat16, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip(dtype):
    source, target = small_pool(dtype), small_pool(dtype)
    blocks = source.allocator.allocate(3)
    source.pool.copy_(torch.randn(source.pool.shape).to(dtype))
    frames = source.export_blocks(blocks)
    expected = source.pool[blocks].clone()
    source.allocator.free(blocks)
    source.pool.zero_()  # the exported frames are copies: reuse of the blocks does not touch them
    assert [len(frame) for frame in frames] == [source.bytes_per_block] * 3
    destination = target.allocator.allocate(5)[2:]
    as_received = [bytes(frames[0]), frames[1], zmq.Frame(frames[2])]  # the kinds of buffers a socket yields
    target.import_blocks(destination, as_received)
    assert torch.equal(target.pool[destination], expected)


def test_import_validates_sizes_before_writing():
    pool = small_pool()
    blocks = pool.allocator.allocate(2)
    good = bytes(pool.bytes_per_block)
    with pytest.raises(ValueError, match="bytes"):
        pool.import_blocks(blocks, [b"\x01" * pool.bytes_per_block, good[:-4]])
    with pytest.raises(ValueError, match="frames"):
        pool.import_blocks(blocks, [good])
    with pytest.raises(ValueError, match="outside"):
        pool.import_blocks([99], [good])
    assert not pool.pool.any()
