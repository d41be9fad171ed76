"""Where a request goes: a prefill worker with room and a decode worker with free KV blocks and a free batch slot,
or one colocated worker that does both.

The worker that decodes must hold the whole request for its life (prompt plus ``max_tokens`` outputs), so it is
reserved ``blocks_for(prompt + max_tokens)`` blocks up front: KV memory is never over-committed and a decode never
waits for memory. A decode worker also holds at most ``max_decode_sequences`` requests at a time (set to its batch
policy's decodes per iteration), so a placed decode never waits for a slot in the batch. A prefill worker holds only
the prompt, and only until its first token. Colocated workers are tried first; a cluster without a colocated worker
that can take the request places it on a prefill/decode pair.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from diptych.cluster.workers import WorkerRegistry, WorkerState
from diptych.proto.roles import Pool, WorkerRole


@dataclass(frozen=True)
class Placement:
    """Worker ids and block counts for one request. ``prefill_worker == decode_worker`` for a colocated placement
    (no handoff; ``prefill_blocks`` is then 0 because the decode reservation covers the prompt).
    ``reserved_blocks`` is what the placement adds to the decoding worker's ``reserved_blocks``: ``decode_blocks``,
    or 0 for a colocated placement when colocated reservation is off."""

    prefill_worker: str
    decode_worker: str
    decode_blocks: int
    prefill_blocks: int
    prompt_tokens: int
    reserved_blocks: int

    @property
    def colocated(self) -> bool:
        return self.prefill_worker == self.decode_worker


class Placer:
    """Picks workers for a request, or None when it cannot be placed now.

    ``max_backlog_tokens`` bounds the prompt tokens queued on one worker that prefills (None: no bound), so requests
    wait in the admission queue (where the fairness policy orders them) rather than in worker queues; an idle worker
    always takes one request, however long. ``max_decode_sequences`` bounds the requests a decode worker holds.
    ``colocated_reserve``: a colocated placement reserves the request's whole KV (the services always do; off, the
    colocated worker's batch policy admits by KV itself). ``movable_roles``: roles the pool policy may move between
    the prefill and decode pools (they count as able to serve both in ``fits_anywhere``).
    After a failed placement, ``waiting_for`` says which pool had no room (``Pool.DECODE`` when no decode worker
    could take the request, whatever the prefill pool; ``Pool.PREFILL`` otherwise); None after a placement."""

    def __init__(self, registry: WorkerRegistry, max_backlog_tokens: int | None, max_decode_sequences: int,
                 colocated_reserve: bool = True, movable_roles: Collection[str] = (WorkerRole.FLEX,)) -> None:
        if (max_backlog_tokens is not None and max_backlog_tokens <= 0) or max_decode_sequences <= 0:
            raise ValueError("max_backlog_tokens and max_decode_sequences must be positive")
        self.registry = registry
        self.max_backlog_tokens = max_backlog_tokens
        self.max_decode_sequences = max_decode_sequences
        self.colocated_reserve = colocated_reserve
        self.movable_roles = frozenset(movable_roles)
        self.waiting_for: Pool | None = None

    def place(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        colocated = self._pick_colocated(prompt_tokens, max_tokens)
        if colocated is not None:
            self.waiting_for = None
            return colocated
        decode, decode_blocks = self._pick_decode(prompt_tokens + max_tokens)
        prefill = self._pick_prefill(prompt_tokens)
        if decode is None or prefill is None:
            self.waiting_for = Pool.DECODE if decode is None else Pool.PREFILL
            return None
        self.waiting_for = None
        return Placement(prefill.worker_id, decode.worker_id, decode_blocks, prefill.blocks_for(prompt_tokens),
                         prompt_tokens, decode_blocks)

    def fits_anywhere(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether some registered worker (or pair) could ever hold this request, its pools being empty."""
        workers = self.registry.workers.values()
        total = prompt_tokens + max_tokens
        if any(w.role == WorkerRole.COLOCATED and w.blocks_for(total) <= w.total_blocks for w in workers):
            return True
        movable = self.movable_roles
        prefills = [w for w in workers if w.role == WorkerRole.PREFILL or w.role in movable]
        decodes = [w for w in workers if w.role == WorkerRole.DECODE or w.role in movable]
        return (any(w.blocks_for(prompt_tokens) <= w.total_blocks for w in prefills)
                and any(w.blocks_for(total) <= w.total_blocks for w in decodes))

    def _has_backlog_room(self, worker: WorkerState, prompt_tokens: int) -> bool:
        limit = self.max_backlog_tokens
        return worker.backlog_tokens == 0 or limit is None or worker.backlog_tokens + prompt_tokens <= limit

    def _pick_prefill(self, prompt_tokens: int) -> WorkerState | None:
        """The worker with the least queued prompt tokens among those with backlog room and KV for the prompt."""
        best = None
        for worker in self.registry.accepting(Pool.PREFILL):
            if (worker.blocks_for(prompt_tokens) <= worker.unreserved_blocks
                    and self._has_backlog_room(worker, prompt_tokens)
                    and (best is None or worker.backlog_tokens < best.backlog_tokens)):
                best = worker
        return best

    def _pick_decode(self, tokens: int) -> tuple[WorkerState | None, int]:
        """The decode worker with the most unreserved blocks among those that can reserve ``tokens`` and hold fewer
        than ``max_decode_sequences`` requests, with the blocks it reserves."""
        best, need = None, 0
        for worker in self.registry.accepting(Pool.DECODE):
            blocks = worker.blocks_for(tokens)
            if (blocks <= worker.unreserved_blocks and worker.decode_requests < self.max_decode_sequences
                    and (best is None or worker.unreserved_blocks > best.unreserved_blocks)):
                best, need = worker, blocks
        return best, need

    def _pick_colocated(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        """The colocated worker with the least queued prompt tokens among those with backlog room (and, when
        reserving, KV for the whole request)."""
        best, need = None, 0
        reserve = self.colocated_reserve
        for worker in self.registry.accepting(Pool.COLOCATED):
            blocks = worker.blocks_for(prompt_tokens + max_tokens)
            if ((not reserve or blocks <= worker.unreserved_blocks) and self._has_backlog_room(worker, prompt_tokens)
                    and (best is None or worker.backlog_tokens < best.backlog_tokens)):
                best, need = worker, blocks
        if best is None:
            return None
        return Placement(best.worker_id, best.worker_id, need, 0, prompt_tokens, need if reserve else 0)
