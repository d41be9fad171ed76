"""Where a request goes: a prefill worker with room and a decode worker with free KV blocks and a free batch slot,
or one colocated worker that does both.

The worker that decodes must hold the whole request for its life (prompt plus ``max_tokens`` outputs), so it is
reserved ``ceil((prompt + max_tokens) / block_size)`` blocks up front: KV memory is never over-committed and a
decode never waits for memory. A decode worker also holds at most ``max_decode_sequences`` requests at a time (set
to its batch policy's decodes per iteration), so a placed decode never waits for a slot in the batch. A prefill worker
holds only the prompt, and only until its KV is handed off. The simulator's placement (``sim/simulator.py``) follows
the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from diptych.services.coordinator.workers import WorkerInfo, WorkerRegistry


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
    worker always takes one request, however long. ``max_decode_sequences`` bounds the requests a decode worker holds
    (placed and not yet released, counted in ``decode_sequences`` by worker id). After a failed placement,
    ``waiting_for`` says which pool had no room (``"decode"`` when no decode worker could take the request, whatever
    the prefill pool; ``"prefill"`` otherwise), for the pool statistics; None after a placement."""

    def __init__(self, registry: WorkerRegistry, max_backlog_tokens: int, max_decode_sequences: int) -> None:
        if max_backlog_tokens <= 0 or max_decode_sequences <= 0:
            raise ValueError("max_backlog_tokens and max_decode_sequences must be positive")
        self.registry = registry
        self.max_backlog_tokens = max_backlog_tokens
        self.max_decode_sequences = max_decode_sequences
        self.decode_sequences: dict[str, int] = {}
        self.waiting_for: str | None = None

    def place(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        colocated = self._pick_colocated(prompt_tokens, max_tokens)
        if colocated is not None:
            self.waiting_for = None
            return colocated
        decode, decode_blocks = self._pick_decode(prompt_tokens + max_tokens)
        prefill = self._pick_prefill(prompt_tokens)
        if decode is None or prefill is None:
            self.waiting_for = "decode" if decode is None else "prefill"
            return None
        self.waiting_for = None
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

    def _pick_decode(self, tokens: int) -> tuple[WorkerInfo | None, int]:
        """The decode worker with the most unreserved blocks among those that can reserve ``tokens`` and hold fewer
        than ``max_decode_sequences`` requests, with the blocks it reserves."""
        best, need = None, 0
        for worker in self.registry.accepting("decode"):
            blocks = worker.blocks_for(tokens)
            if (blocks <= worker.unreserved_blocks
                    and self.decode_sequences.get(worker.worker_id, 0) < self.max_decode_sequences
                    and (best is None or worker.unreserved_blocks > best.unreserved_blocks)):
                best, need = worker, blocks
        return best, need

    def _pick_colocated(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        best, need = None, 0
        for worker in self.registry.accepting("colocated"):
            blocks = worker.blocks_for(prompt_tokens + max_tokens)
            if (blocks <= worker.unreserved_blocks and self._has_backlog_room(worker, prompt_tokens)
                    and (best is None or worker.backlog_tokens < best.backlog_tokens)):
                best, need = worker, blocks
        return None if best is None else Placement(best, best, need, 0, prompt_tokens)

    def commit(self, placement: Placement) -> None:
        """Account the placement on its workers (undone by the coordinator's release functions and
        ``release_decode``)."""
        placement.decode.reserved_blocks += placement.decode_blocks
        placement.prefill.backlog_tokens += placement.prompt_tokens
        placement.prefill.backlog_blocks += placement.prefill_blocks
        worker_id = placement.decode.worker_id
        self.decode_sequences[worker_id] = self.decode_sequences.get(worker_id, 0) + 1

    def release_decode(self, worker_id: str) -> None:
        """A request placed on ``worker_id`` (to decode, or colocated) let go of its reservation."""
        count = self.decode_sequences.get(worker_id, 0)
        if count > 1:
            self.decode_sequences[worker_id] = count - 1
        else:
            self.decode_sequences.pop(worker_id, None)

    def forget(self, worker_id: str) -> None:
        """The worker left the cluster: its requests no longer count (a new worker may reuse the id)."""
        self.decode_sequences.pop(worker_id, None)
