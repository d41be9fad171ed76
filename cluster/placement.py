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

from diptych.cluster.blocks import blocks_for
from diptych.cluster.workers import WorkerRegistry, WorkerState
from diptych.proto.roles import Pool, WorkerRole


@dataclass(slots=True)
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
        if self.registry.colocated_workers:
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
        total = prompt_tokens + max_tokens
        movable = self.movable_roles
        prefill_fits = decode_fits = False
        size = prompt_blocks = total_blocks = 0
        for w in self.registry.workers.values():
            if w.block_size != size:
                size = w.block_size
                prompt_blocks, total_blocks = blocks_for(prompt_tokens, size), blocks_for(total, size)
            role = w.role
            if role is WorkerRole.COLOCATED:
                if total_blocks <= w.total_blocks:
                    return True
                continue
            if not prefill_fits and (role is WorkerRole.PREFILL or role in movable):
                prefill_fits = prompt_blocks <= w.total_blocks
            if not decode_fits and (role is WorkerRole.DECODE or role in movable):
                decode_fits = total_blocks <= w.total_blocks
        return prefill_fits and decode_fits

    def never_fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether the request is too large for every registered worker that could take its part: False while no
        worker could take one of its parts at all (a pool is empty: a worker may join and fit it)."""
        if not self.registry.workers or self.fits_anywhere(prompt_tokens, max_tokens):
            return False
        movable = self.movable_roles
        prefill_roles = [w for w in self.registry.workers.values()
                         if w.role is WorkerRole.PREFILL or w.role in movable]
        decode_roles = [w for w in self.registry.workers.values()
                        if w.role is WorkerRole.DECODE or w.role in movable]
        if (prefill_roles and decode_roles) or self.registry.colocated_workers:
            return True  # every part has a worker to go to and none is large enough
        too_small = [w.blocks_for(prompt_tokens) > w.total_blocks for w in prefill_roles]
        too_small += [w.blocks_for(prompt_tokens + max_tokens) > w.total_blocks for w in decode_roles]
        return all(too_small)

    # The pickers run for every admission attempt of the simulator: plain loops over the registry, block counts
    # computed once per block size, no intermediate lists.

    def _pick_prefill(self, prompt_tokens: int) -> WorkerState | None:
        """The worker with the least queued prompt tokens among those with backlog room and KV for the prompt."""
        best = None
        limit = self.max_backlog_tokens
        size = blocks = 0
        for worker in self.registry.workers.values():
            if worker.pool is not Pool.PREFILL or worker.draining_to is not None:
                continue
            if worker.block_size != size:
                size = worker.block_size
                blocks = blocks_for(prompt_tokens, size)
            backlog = worker.backlog_tokens
            if (blocks <= worker.total_blocks - worker.reserved_blocks - worker.backlog_blocks
                    and (backlog == 0 or limit is None or backlog + prompt_tokens <= limit)
                    and (best is None or backlog < best.backlog_tokens)):
                best = worker
        return best

    def _pick_decode(self, tokens: int) -> tuple[WorkerState | None, int]:
        """The decode worker with the most unreserved blocks among those that can reserve ``tokens`` and hold fewer
        than ``max_decode_sequences`` requests, with the blocks it reserves."""
        best, need, most = None, 0, 0
        cap = self.max_decode_sequences
        size = blocks = 0
        for worker in self.registry.workers.values():
            if worker.pool is not Pool.DECODE or worker.draining_to is not None or worker.decode_requests >= cap:
                continue
            if worker.block_size != size:
                size = worker.block_size
                blocks = blocks_for(tokens, size)
            free = worker.total_blocks - worker.reserved_blocks - worker.backlog_blocks
            if blocks <= free and (best is None or free > most):
                best, need, most = worker, blocks, free
        return best, need

    def _pick_colocated(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        """The colocated worker with the least queued prompt tokens among those with backlog room (and, when
        reserving, KV for the whole request)."""
        best, need = None, 0
        reserve = self.colocated_reserve
        limit = self.max_backlog_tokens
        size = blocks = 0
        for worker in self.registry.workers.values():
            if worker.pool is not Pool.COLOCATED or worker.draining_to is not None:
                continue
            if worker.block_size != size:
                size = worker.block_size
                blocks = blocks_for(prompt_tokens + max_tokens, size)
            backlog = worker.backlog_tokens
            if ((not reserve or blocks <= worker.total_blocks - worker.reserved_blocks - worker.backlog_blocks)
                    and (backlog == 0 or limit is None or backlog + prompt_tokens <= limit)
                    and (best is None or backlog < best.backlog_tokens)):
                best, need = worker, blocks
        if best is None:
            return None
        return Placement(best.worker_id, best.worker_id, need, 0, prompt_tokens, need if reserve else 0)
