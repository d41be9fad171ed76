"""CUDA graphs for decode-only iterations.

A decode-only pass of ``n`` sequences replays the graph captured for the smallest captured batch size ``>= n``.
Its inputs live in static device buffers (token ids, positions, KV slots, block tables, context lengths) that are
refilled before each replay from pinned host buffers with asynchronous copies; rows ``n ..`` of the captured batch
are padding (slot -1: no KV write; context 0: zero attention output) and their logits are ignored. All graphs
share one memory pool and are captured largest first. With a ``FastDecoder`` the graphs capture its fused forward,
otherwise the Hugging Face forward with the CUDA attention context.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from diptych.engine.fast_decoder import FastDecoder
from diptych.engine.paged_attention_cuda import CudaAttentionContext

log = logging.getLogger(__name__)
PIN = torch.cuda.is_available()

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
"""Captured batch sizes (those up to ``EngineConfig.cuda_graph_max_batch``)."""


class DecodeGraphs:
    """Captured decode passes of ``model`` over ``pool``; ``max_blocks`` is the block-table width (blocks per
    sequence at ``max_model_len``)."""

    def __init__(self, model: torch.nn.Module, pool: torch.Tensor, max_batch: int, max_blocks: int,
                 num_splits_for, fused: FastDecoder | None = None) -> None:
        self.model = model
        self.fused = fused
        self.pool = pool
        self.device = pool.device
        self.batch_sizes = [b for b in DEFAULT_BATCH_SIZES if b <= max_batch] or [max_batch]
        if self.batch_sizes[-1] < max_batch:
            self.batch_sizes.append(max_batch)
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = max_blocks
        self._num_splits_for = num_splits_for
        n, w = self.max_batch, max_blocks
        self._ids = torch.zeros((1, n), dtype=torch.long, device=self.device)
        self._positions = torch.zeros((1, n), dtype=torch.long, device=self.device)
        self._slots = torch.full((n,), -1, dtype=torch.long, device=self.device)
        self._context_lens = torch.zeros((n,), dtype=torch.int32, device=self.device)
        self._tables = torch.zeros((n, w), dtype=torch.int32, device=self.device)
        self._host_long = torch.zeros((3, n), dtype=torch.long, pin_memory=PIN)
        self._host_int = torch.zeros((n,), dtype=torch.int32, pin_memory=PIN)
        self._host_tables = torch.zeros((n, w), dtype=torch.int32, pin_memory=PIN)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._copied = torch.cuda.Event()
        self._copied.record()

    def _context(self, batch: int) -> CudaAttentionContext:
        return CudaAttentionContext(
            pool=self.pool, slots=self._slots[:batch], decode_rows=None, decode_tables=self._tables[:batch],
            decode_context_lens=self._context_lens[:batch], num_splits=self._num_splits_for(batch),
        )

    def _forward(self, batch: int, context: CudaAttentionContext) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.forward(self._ids[0, :batch], self._positions[0, :batch], self.pool,
                                      self._slots[:batch], self._tables[:batch], self._context_lens[:batch],
                                      context.num_splits)
        output = self.model(
            input_ids=self._ids[:, :batch], position_ids=self._positions[:, :batch], use_cache=False,
            logits_to_keep=0, paged_context=context,
        )
        return output.logits[0].float()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size (warm-up runs compile the kernels first). Padding inputs only: nothing is
        written to the pool."""
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for batch in sorted(self.batch_sizes, reverse=True):
            context = self._context(batch)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(batch, context)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, stream=stream):
                logits = self._forward(batch, context)
            self._graphs[batch] = (graph, logits)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs (%s forward) for decode batch sizes %s",
                 "fused" if self.fused is not None else "module-by-module", self.batch_sizes)

    def fits(self, num_seqs: int, width: int) -> bool:
        return 0 < num_seqs <= self.max_batch and width <= self.max_blocks and bool(self._graphs)

    def run(self, token_ids: list[int], positions: list[int], slots: np.ndarray, tables: list[np.ndarray]
            ) -> torch.Tensor:
        """Replay for ``n = len(token_ids)`` decodes: token ``i`` at ``positions[i]`` with KV slot ``slots[i]``
        and block table ``tables[i]`` (covering positions ``0 .. positions[i]``). Returns float logits ``[n,
        vocab]`` (valid until the next replay)."""
        n = len(token_ids)
        batch = next(b for b in self.batch_sizes if b >= n)
        self._copied.synchronize()  # the previous replay's copies have left the pinned buffers
        host = self._host_long.numpy()
        host[0, :n] = token_ids
        host[1, :n] = positions
        host[2, :n] = slots
        host[:, n:batch] = 0
        host[2, n:batch] = -1
        lens = self._host_int.numpy()
        lens[:n] = np.asarray(positions) + 1
        lens[n:batch] = 0
        host_tables = self._host_tables.numpy()
        for row, table in enumerate(tables):
            host_tables[row, : len(table)] = table
        self._ids[0, :batch].copy_(self._host_long[0, :batch], non_blocking=True)
        self._positions[0, :batch].copy_(self._host_long[1, :batch], non_blocking=True)
        self._slots[:batch].copy_(self._host_long[2, :batch], non_blocking=True)
        self._context_lens[:batch].copy_(self._host_int[:batch], non_blocking=True)
        self._tables[:n].copy_(self._host_tables[:n], non_blocking=True)
        self._copied.record()
        graph, logits = self._graphs[batch]
        graph.replay()
        return logits[:n]
