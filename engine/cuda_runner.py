"""The CUDA execution path of ``ModelRunner.execute``: packed inputs through one pinned staging copy, decode-only
iterations through CUDA graphs, everything else eagerly on the Triton/SDPA attention path.

Host-device traffic per iteration: one asynchronous host-to-device copy of the packed integer inputs (pinned
memory) and, after the pass, the sampled tokens (the sampler's one synchronisation). Nothing else waits on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from diptych.cluster.blocks import blocks_for
from diptych.engine.cuda_graphs import PIN, DecodeGraphs
from diptych.engine.fast_decoder import FastDecoder
from diptych.engine.paged_attention_cuda import ChunkSpan, CudaAttentionContext
from diptych.engine.triton_kernels import num_splits_for


class CudaExecutor:
    """Runs packed forward passes of ``model`` over ``pool`` (``[num_blocks, layers, 2, block_size, kv_heads,
    head_dim]``) on its CUDA device. ``graph_max_batch`` 0 disables CUDA graphs; ``fused_decode`` runs
    ``engine.fast_decoder.FastDecoder`` (in the graphs and for other iterations) where the model supports it."""

    def __init__(self, model: torch.nn.Module, pool: torch.Tensor, max_model_len: int, graph_max_batch: int,
                 fused_decode: bool = True) -> None:
        # cuDNN's SDPA builds an execution plan for every new query length (about 50 ms each on an H200 with a 7B
        # model), so each request with a prompt length not seen before would pay it; flash attention needs none.
        torch.backends.cuda.enable_cudnn_sdp(False)
        self.model = model
        self.pool = pool
        self.device = pool.device
        self.block_size = pool.shape[3]
        self.num_kv_heads = pool.shape[4]
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._staging = torch.empty(0, dtype=torch.long, pin_memory=PIN)
        self._staged = torch.cuda.Event()
        self._staged.record()
        self._tables: dict[int, tuple[list[int], np.ndarray]] = {}
        self.graphs: DecodeGraphs | None = None
        self.fused = FastDecoder(model) if fused_decode and FastDecoder.supports(model) else None
        fused = self.fused
        if graph_max_batch > 0:
            self.graphs = DecodeGraphs(model, pool, graph_max_batch, blocks_for(max_model_len, self.block_size),
                                       self.splits, fused)
            self.graphs.capture()

    def splits(self, num_seqs: int) -> int:
        return num_splits_for(num_seqs, self.num_kv_heads, self.num_sms)

    def execute(self, items) -> torch.Tensor:
        """``items``: ``engine.model_runner.ForwardItem`` list. Returns float logits ``[items needing logits,
        vocab]``."""
        tables = self._table_arrays(items)
        block_size = self.block_size
        if self.graphs is not None and all(len(i.token_ids) == 1 and i.needs_logits for i in items):
            positions = [item.start_position for item in items]
            needed = [tables[k][: p // block_size + 1] for k, p in enumerate(positions)]
            if self.graphs.fits(len(items), max(len(t) for t in needed)):
                slots = np.fromiter(
                    (t[p // block_size] * block_size + p % block_size for t, p in zip(needed, positions)),
                    dtype=np.int64, count=len(items))
                return self.graphs.run([item.token_ids[0] for item in items], positions, slots, needed)
        return self._eager(items, tables)

    def _table_arrays(self, items) -> list[np.ndarray]:
        """Each item's block table as an int64 array, cached while the same list object is scheduled."""
        cache: dict[int, tuple[list[int], np.ndarray]] = {}
        arrays = []
        for item in items:
            key = id(item.block_table)
            entry = self._tables.get(key)
            if entry is None or entry[0] is not item.block_table or len(entry[1]) != len(item.block_table):
                entry = (item.block_table, np.asarray(item.block_table, dtype=np.int64))
            cache[key] = entry
            arrays.append(entry[1])
        self._tables = cache
        return arrays

    def _eager(self, items, tables: list[np.ndarray]) -> torch.Tensor:
        block_size = self.block_size
        parts: list[np.ndarray] = []
        token_ids, positions, slots, keep = [], [], [], []
        decode_rows, decode_lens, decode_tables, chunk_meta = [], [], [], []
        start = 0
        for item, table in zip(items, tables):
            count = len(item.token_ids)
            pos = np.arange(item.start_position, item.start_position + count, dtype=np.int64)
            context_len = item.start_position + count
            num_blocks = blocks_for(context_len, block_size)
            if len(table) < num_blocks:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {context_len} positions")
            token_ids.append(np.asarray(item.token_ids, dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            if count == 1:
                decode_rows.append(start)
                decode_lens.append(context_len)
                decode_tables.append(table[:num_blocks])
            else:
                chunk_meta.append((start, start + count, context_len, table[:num_blocks]))
            start += count
            if item.needs_logits:
                keep.append(start - 1)
        total = start
        width = max((len(t) for t in decode_tables), default=0)
        table_block = np.zeros((len(decode_tables), width), dtype=np.int64)
        for row, table in enumerate(decode_tables):
            table_block[row, : len(table)] = table
        parts = [np.concatenate(token_ids), np.concatenate(positions), np.concatenate(slots),
                 np.asarray(keep, dtype=np.int64), np.asarray(decode_rows, dtype=np.int64),
                 np.asarray(decode_lens, dtype=np.int64), table_block.reshape(-1)]
        parts += [meta[3] for meta in chunk_meta]
        device_parts = self._stage(parts)
        ids, pos_tensor, slot_tensor, keep_tensor, rows, lens, flat_tables = device_parts[:7]
        chunks = [ChunkSpan(s, e, c, table) for (s, e, c, _), table in zip(chunk_meta, device_parts[7:])]
        context = CudaAttentionContext(
            pool=self.pool, slots=slot_tensor,
            decode_rows=rows if decode_rows else None,
            decode_tables=flat_tables.view(len(decode_tables), width).to(torch.int32) if decode_rows else None,
            decode_context_lens=lens.to(torch.int32) if decode_rows else None,
            num_splits=self.splits(len(decode_rows)), chunks=chunks,
        )
        if not chunks and len(decode_rows) == total:
            context.decode_rows = None  # every token is a decode, in order
        if self.fused is not None:
            return self.fused.forward_packed(ids, pos_tensor, context, keep_tensor)
        output = self.model(
            input_ids=ids.view(1, total), position_ids=pos_tensor.view(1, total), use_cache=False,
            logits_to_keep=keep_tensor, paged_context=context,
        )
        return output.logits[0].float()

    def _stage(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        """Copy int64 arrays to the device in one asynchronous copy from pinned memory; returns device views."""
        sizes = [len(p) for p in parts]
        total = sum(sizes)
        self._staged.synchronize()  # the previous copy has left the pinned buffer
        if self._staging.numel() < total:
            self._staging = torch.empty(max(total, 2 * self._staging.numel()), dtype=torch.long, pin_memory=PIN)
        host = self._staging.numpy()
        offset = 0
        for part, size in zip(parts, sizes):
            host[offset:offset + size] = part
            offset += size
        device = self._staging[:total].to(self.device, non_blocking=True)
        self._staged.record()
        return list(torch.split(device, sizes))
