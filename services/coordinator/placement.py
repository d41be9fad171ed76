"""Where a request goes: a prefill worker with room and a decode worker with free KV blocks, or one colocated
worker that does both.

The worker that decodes must hold the whole request for its life (prompt plus ``max_tokens`` outputs), so it is
reserved ``ceil((prompt + max_tokens) / block_size)`` blocks up front: KV memory is never over-committed and a
decode never waits for memory. A prefill worker holds only the prompt, and only until its KV is handed off.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.coordinator.workers import WorkerInfo, WorkerRegistry


@dataclass
class Placement:
    """``prefill is decode`` for a colocated placement (no handoff; ``prefill_blocks`` is then 0 because the decode
    reservation covers the prompt)."""

    prefill: WorkerInfo
    decode: WorkerInfo
    decode_blocks: int
    prefill_blocks: int
    prompt_tokens: int

    @property
    def colocated(self) -> bool:
        return self.prefill is self.decode


class Placer:
    """Picks workers for a request, or None when it cannot be placed now.

    ``max_backlog_tokens`` bounds the prompt tokens queued on one worker that prefills, so requests wait in the
    coordinator's admission queue (where the fairness policy orders them) rather than in worker queues; an idle
    worker always takes one request, however long."""

    def __init__(self, registry: WorkerRegistry, max_backlog_tokens: int) -> None:
        if max_backlog_tokens <= 0:
            raise ValueError("max_backlog_tokens must be positive")
        self.registry = registry
        self.max_backlog_tokens = max_backlog_tokens

    def place(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        colocated = self._pick_colocated(prompt_tokens, max_tokens)
        if colocated is not None:
            return colocated
        prefill = self._pick_prefill(prompt_tokens)
        if prefill is None:
            return None
        decode = None
        decode_blocks = 0
        for worker in self.registry.accepting("decode"):
            need = worker.blocks_for(prompt_tokens + max_tokens)
            if need <= worker.unreserved_blocks and (decode is None or worker.unreserved_blocks > decode.unreserved_blocks):
                decode, decode_blocks = worker, need
        if decode is None:
            return None
        return Placement(prefill, decode, decode_blocks, prefill.blocks_for(prompt_tokens), prompt_tokens)

    def fits_anywhere(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether some registered worker (or pair) could ever hold this request, its pools being empty."""
        workers = self.registry.workers.values()
        if any(w.role == "colocated" and w.blocks_for(prompt_tokens + max_tokens) <= w.total_blocks for w in workers):
            return True
        prefills = [w for w in workers if w.role in ("prefill", "flex")]
        decodes = [w for w in workers if w.role in ("decode", "flex")]
        return (any(w.blocks_for(prompt_tokens) <= w.total_blocks for w in prefills)
                and any(w.blocks_for(prompt_tokens + max_tokens) <= w.total_blocks for w in decodes))

    def _has_backlog_room(self, worker: WorkerInfo, prompt_tokens: int) -> bool:
        return worker.backlog_tokens == 0 or worker.backlog_tokens + prompt_tokens <= self.max_backlog_tokens

    def _pick_prefill(self, prompt_tokens: int) -> WorkerInfo | None:
        best = None
        for worker in self.registry.accepting("prefill"):
            if (worker.blocks_for(prompt_tokens) <= worker.unreserved_blocks
                    and self._has_backlog_room(worker, prompt_tokens)
                    and (best is None or worker.backlog_tokens < best.backlog_tokens)):
                best = worker
        return best

    def _pick_colocated(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        best, need = None, 0
        for worker in self.registry.accepting("colocated"):
            blocks = worker.blocks_for(prompt_tokens + max_tokens)
            if (blocks <= worker.unreserved_blocks and self._has_backlog_room(worker, prompt_tokens)
                    and (best is None or worker.backlog_tokens < best.backlog_tokens)):
                best, need = worker, blocks
        return None if best is None else Placement(best, best, need, 0, prompt_tokens)

    @staticmethod
    def commit(placement: Placement) -> None:
        """Account the placement on its workers (undone by the coordinator's release functions)."""
        placement.decode.reserved_blocks += placement.decode_blocks
        placement.prefill.backlog_tokens += placement.prompt_tokens
        placement.prefill.backlog_blocks += placement.prefill_blocks
