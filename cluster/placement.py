"""Where a request goes: a prefill worker with room and a decode worker with KV headroom and a free batch slot, or one
colocated worker that does both.

KV memory is allocated on demand by the engines (``engine.kv_rules``): a decode engine takes the prompt's blocks when
the handoff is reserved, then one block whenever a decode starts a new one, and preempts (by recompute) when its pool
runs dry. Placement therefore accounts each request by its *expected footprint* on the worker that decodes it,
``blocks_for(prompt + min(max_tokens, expected_output_tokens))`` (``expected_tokens``), capped at the worker's pool
(a sequence never grows past it). ``Placement.reserved_blocks`` is that footprint; ``Placement.decode_blocks`` is what
the decoding engine actually takes when the request arrives: the prompt's blocks (``ReserveKV.num_blocks``).

Invariants: placement adds a request to a worker only if its footprint fits the worker's unreserved blocks
(``WorkerState.unreserved_blocks``), so the sum of footprints never exceeds a pool, and requests beyond wait in the
admission queue (where the fairness policy orders them). Over-commit of real memory is possible by design: a request
may grow past its expected footprint; the engine then preempts, and the accounting only spreads load and bounds
queues. ``max_tokens`` never refuses a request: one fits if its prompt (plus one position for its first decode)
fits a prefill worker's and a decode worker's pool, or a colocated worker's.

A decode worker also holds at most ``max_decode_sequences`` requests at a time (set to its batch policy's decodes per
iteration), so a placed decode never waits for a slot in the batch. A prefill worker holds only the prompt, and only
until its first token. Colocated workers are tried first; a cluster without a colocated worker that can take the
request places it on a prefill/decode pair.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from diptych.cluster.blocks import blocks_for
from diptych.cluster.workers import WorkerRegistry, WorkerState
from diptych.proto.roles import Pool, WorkerRole

DEFAULT_EXPECTED_OUTPUT_TOKENS = 512
"""Output tokens placement expects a request to add while it lives, when its ``max_tokens`` is larger."""


def expected_tokens(prompt_tokens: int, max_tokens: int, expected_output_tokens: int) -> int:
    """Positions a request is expected to reach: ``prompt + min(max_tokens, expected_output_tokens)``."""
    return prompt_tokens + min(max_tokens, expected_output_tokens)


def decode_positions(prompt_tokens: int, max_tokens: int) -> int:
    """Positions the decoding worker's pool must hold for the request to make progress: the prompt, plus the first
    decode's position when it decodes at all (``max_tokens > 1``; its first token is sampled by the prefill)."""
    return prompt_tokens + (1 if max_tokens > 1 else 0)


@dataclass(slots=True)
class Placement:
    """Worker ids and block counts for one request. ``prefill_worker == decode_worker`` for a colocated placement
    (no handoff; ``prefill_blocks`` is then 0 because the footprint covers the prompt).
    ``decode_blocks``: the prompt's blocks, which the decoding engine takes when the request arrives (the handoff
    reservation; colocated: what its engine admits). ``reserved_blocks``: what the placement adds to the decoding
    worker's ``reserved_blocks``, the expected footprint (0 for a colocated placement when colocated reservation is
    off)."""

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
    ``expected_output_tokens``: the growth (tokens) placement expects of a request while it lives (see the module).
    ``colocated_reserve``: a colocated placement accounts the request's expected footprint (the services always do;
    off, the colocated worker's batch policy admits by KV itself). ``movable_roles``: roles the pool policy may move
    between the prefill and decode pools (they count as able to serve both in ``fits_anywhere``).
    After a failed placement, ``waiting_for`` says which pool had no room (``Pool.DECODE`` when no decode worker
    could take the request, whatever the prefill pool; ``Pool.PREFILL`` otherwise); None after a placement."""

    def __init__(self, registry: WorkerRegistry, max_backlog_tokens: int | None, max_decode_sequences: int,
                 colocated_reserve: bool = True, movable_roles: Collection[str] = (WorkerRole.FLEX,),
                 expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS) -> None:
        if (max_backlog_tokens is not None and max_backlog_tokens <= 0) or max_decode_sequences <= 0:
            raise ValueError("max_backlog_tokens and max_decode_sequences must be positive")
        if expected_output_tokens < 0:
            raise ValueError(f"expected_output_tokens must be >= 0, got {expected_output_tokens}")
        self.registry = registry
        self.max_backlog_tokens = max_backlog_tokens
        self.max_decode_sequences = max_decode_sequences
        self.colocated_reserve = colocated_reserve
        self.movable_roles = frozenset(movable_roles)
        self.expected_output_tokens = expected_output_tokens
        self.waiting_for: Pool | None = None

    def place(self, prompt_tokens: int, max_tokens: int) -> Placement | None:
        expected = expected_tokens(prompt_tokens, max_tokens, self.expected_output_tokens)
        needed = decode_positions(prompt_tokens, max_tokens)
        if self.registry.colocated_workers:
            colocated = self._pick_colocated(prompt_tokens, expected, needed)
            if colocated is not None:
                self.waiting_for = None
                return colocated
        decode, reserved = self._pick_decode(expected, needed)
        prefill = self._pick_prefill(prompt_tokens)
        if decode is None or prefill is None:
            self.waiting_for = Pool.DECODE if decode is None else Pool.PREFILL
            return None
        self.waiting_for = None
        return Placement(prefill.worker_id, decode.worker_id, decode.blocks_for(prompt_tokens),
                         prefill.blocks_for(prompt_tokens), prompt_tokens, reserved)

    def fits_anywhere(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether some registered worker (or pair) could ever serve this request, its pools being empty: the prompt
        fits a prefill worker's pool and ``decode_positions`` a decode worker's (colocated: one pool). How far the
        request may grow (``max_tokens``) is not compared with pools: the engine ends a sequence that fills its
        pool with reason ``length``."""
        decode_tokens = decode_positions(prompt_tokens, max_tokens)
        movable = self.movable_roles
        prefill_fits = decode_fits = False
        size = prompt_blocks = decode_blocks = 0
        for w in self.registry.workers.values():
            if w.block_size != size:
                size = w.block_size
                prompt_blocks, decode_blocks = blocks_for(prompt_tokens, size), blocks_for(decode_tokens, size)
            role = w.role
            if role is WorkerRole.COLOCATED:
                if decode_blocks <= w.total_blocks:
                    return True
                continue
            if not prefill_fits and (role is WorkerRole.PREFILL or role in movable):
                prefill_fits = prompt_blocks <= w.total_blocks
            if not decode_fits and (role is WorkerRole.DECODE or role in movable):
                decode_fits = decode_blocks <= w.total_blocks
        return prefill_fits and decode_fits

    def never_fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether the request is too large for every registered worker that could take its part (as
        ``fits_anywhere`` measures it): False while no worker could take one of its parts at all (a pool is empty: a
        worker may join and fit it)."""
        if not self.registry.workers or self.fits_anywhere(prompt_tokens, max_tokens):
            return False
        movable = self.movable_roles
        prefill_roles = [w for w in self.registry.workers.values()
                         if w.role is WorkerRole.PREFILL or w.role in movable]
        decode_roles = [w for w in self.registry.workers.values()
                        if w.role is WorkerRole.DECODE or w.role in movable]
        if (prefill_roles and decode_roles) or self.registry.colocated_workers:
            return True  # every part has a worker to go to and none is large enough
        decode_tokens = decode_positions(prompt_tokens, max_tokens)
        too_small = [w.blocks_for(prompt_tokens) > w.total_blocks for w in prefill_roles]
        too_small += [w.blocks_for(decode_tokens) > w.total_blocks for w in decode_roles]
        return all(too_small)

    # The pickers run for every admission attempt of the simulator: plain loops over the registry, block counts
    # computed once per block size, no intermediate lists. A worker's footprint is the expected blocks capped at its
    # pool (a sequence never grows past it), so an idle worker that can hold ``needed`` positions always takes one.

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

    def _pick_decode(self, expected: int, needed: int) -> tuple[WorkerState | None, int]:
        """The decode worker with the most unreserved blocks among those whose pool holds ``needed`` positions, with
        room for the footprint of ``expected`` positions, and fewer than ``max_decode_sequences`` requests; with the
        footprint it accounts."""
        best, need, most = None, 0, 0
        cap = self.max_decode_sequences
        size = blocks = floor = 0
        for worker in self.registry.workers.values():
            if worker.pool is not Pool.DECODE or worker.draining_to is not None or worker.decode_requests >= cap:
                continue
            if worker.block_size != size:
                size = worker.block_size
                blocks, floor = blocks_for(expected, size), blocks_for(needed, size)
            total = worker.total_blocks
            footprint = min(blocks, total)
            free = total - worker.reserved_blocks - worker.backlog_blocks
            if floor <= total and footprint <= free and (best is None or free > most):
                best, need, most = worker, footprint, free
        return best, need

    def _pick_colocated(self, prompt_tokens: int, expected: int, needed: int) -> Placement | None:
        """The colocated worker with the least queued prompt tokens among those whose pool holds ``needed``
        positions, with backlog room (and, when reserving, room for the footprint of ``expected`` positions)."""
        best, need = None, 0
        reserve = self.colocated_reserve
        limit = self.max_backlog_tokens
        size = blocks = floor = 0
        for worker in self.registry.workers.values():
            if worker.pool is not Pool.COLOCATED or worker.draining_to is not None:
                continue
            if worker.block_size != size:
                size = worker.block_size
                blocks, floor = blocks_for(expected, size), blocks_for(needed, size)
            total = worker.total_blocks
            footprint = min(blocks, total)
            backlog = worker.backlog_tokens
            if (floor <= total
                    and (not reserve or footprint <= total - worker.reserved_blocks - worker.backlog_blocks)
                    and (backlog == 0 or limit is None or backlog + prompt_tokens <= limit)
                    and (best is None or backlog < best.backlog_tokens)):
                best, need = worker, footprint
        if best is None:
            return None
        return Placement(best.worker_id, best.worker_id, best.blocks_for(prompt_tokens), 0, prompt_tokens,
                         need if reserve else 0)
