"""Where a request goes: a prefill worker with room and a decode worker with free KV blocks.

A decode worker must hold the whole request for its life (prompt plus ``max_tokens`` outputs), so it is reserved
``ceil((prompt + max_tokens) / block_size)`` blocks up front: KV memory is never over-committed and a decode never
waits for memory. The prefill worker holds only the prompt, and only until its KV is handed off.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.coordinator.workers import WorkerInfo, WorkerRegistry


@dataclass
class Placement:
    prefill: WorkerInfo
    decode: WorkerInfo
    decode_blocks: int
    prefill_blocks: int


class Placer:
    """Picks workers for a request, or None when it cannot be placed now.

    ``max_backlog_tokens`` bounds the prompt tokens queued on one prefill worker, so requests wait in the
    coordinator's admission queue (where the fairness policy orders them) rather than in worker queues."""

    def __init__(self, registry: WorkerRegistry, max_backlog_tokens: int) -> None:
        if max_backlog_tokens <= 0:
            raise ValueError("max_backlog_tokens must be positive")
        self.registry = registry
        self.max_backlog_tokens = max_backlog_tokens

    def place(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        prefill = self._pick_prefill(prompt_tokens)
        if prefill is None:
            return None
        decode = None
        decode_blocks = 0
        for worker in self.registry.by_role("decode"):
            need = worker.blocks_for(prompt_tokens + max_tokens)
            if need <= worker.unreserved_blocks and (decode is None or worker.unreserved_blocks > decode.unreserved_blocks):
                decode, decode_blocks = worker, need
        if decode is None:
            return None
        return Placement(prefill, decode, decode_blocks, prefill.blocks_for(prompt_tokens))

    def fits_anywhere(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether some registered pair of workers could ever hold this request (empty pools included)."""
        prefill_ok = any(w.blocks_for(prompt_tokens) <= w.total_blocks for w in self.registry.by_role("prefill"))
        decode_ok = any(
            w.blocks_for(prompt_tokens + max_tokens) <= w.total_blocks for w in self.registry.by_role("decode")
        )
        return prefill_ok and decode_ok

    def _pick_prefill(self, prompt_tokens: int) -> WorkerInfo | None:
        best = None
        for worker in self.registry.by_role("prefill"):
            blocks = worker.blocks_for(prompt_tokens)
            idle = worker.backlog_tokens == 0
            fits_memory = worker.backlog_blocks + blocks <= worker.total_blocks
            fits_backlog = idle or worker.backlog_tokens + prompt_tokens <= self.max_backlog_tokens
            if fits_memory and fits_backlog and (best is None or worker.backlog_tokens < best.backlog_tokens):
                best = worker
        return best

    @staticmethod
    def commit(placement: Placement, request_id: str, prompt_tokens: int) -> None:
        placement.decode.reserved_blocks += placement.decode_blocks
        placement.decode.requests.add(request_id)
        placement.prefill.backlog_tokens += prompt_tokens
        placement.prefill.backlog_blocks += placement.prefill_blocks
        placement.prefill.requests.add(request_id)
