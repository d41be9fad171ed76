"""The request state machine of one engine, shared by the model engine and the sim engine (no torch).

Lifecycle of a request id: ``add_request`` (waiting) -> admitted by the batch policy's plan (running: the blocks
of its prefill are taken) -> finished (blocks freed), or, with ``prefill_only``, prefilled (blocks kept) ->
``release``. On a decode worker: ``reserve`` (the handed-off prompt's blocks held) -> ``add_prefilled`` (running) ->
finished. A running request may be preempted by the batch policy (blocks freed, tokens kept: back to waiting, to
recompute its prompt and outputs, ``Sequence.preempt``). ``abort`` ends a request in any of these states and frees
what it holds; ``take_reservation`` ends a reservation handing its blocks to the caller.

KV on demand (``engine.kv_rules``): a decode takes a block when its position starts one; admission and reservations
leave the watermark free while sequences run; ``max_tokens`` is never read here except by the stop rule.

Invariants: a request id lives in at most one of waiting / running / prefilled / reserved; every allocated block
belongs to exactly one of them (or to a caller of ``take_reservation`` until ``free_blocks``); a waiting request
holds no block; a running request holds at least ``blocks_for(num_computed)`` blocks (those of its whole prefill
while in prefill; a handed-off request may hold more, reserved for it).

Only an iteration's cost is not here: ``plan_iteration`` admits and returns the forward items, the executor (a
model forward or a modelled wait) runs them, ``record_tokens`` applies the sampled tokens. ``blocks_lock`` guards
the allocator and the tables: ``reserve``, ``reserved_blocks``, ``take_reservation`` and ``free_blocks`` take it
and may run on another thread while the owner thread runs an iteration (the owner takes it around planning and
recording).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from diptych.cluster.blocks import blocks_for
from diptych.engine import kv_rules
from diptych.engine.block_pool import Blocks
from diptych.engine.outputs import SampledToken, StepOutput
from diptych.engine.sequence import Sequence, SequenceStatus
from diptych.policies.batch import BatchPlan, BatchPolicy, SequenceState
from diptych.proto.messages import SLO, SamplingParams, WorkerLoad


@dataclass
class ForwardItem:
    """One sequence's share of a forward pass: ``token_ids`` at consecutive positions from ``start_position``,
    whose KV goes into ``block_table`` (which must cover positions up to ``start_position + len(token_ids) - 1``).
    ``needs_logits`` asks for the logits of the last of these tokens."""

    token_ids: list[int]
    start_position: int
    block_table: list[int]
    needs_logits: bool


@dataclass
class PlannedIteration:
    """An admitted plan: its forward items in batch order (with their sequences) and the ids it admitted."""

    plan: BatchPlan
    scheduled: list[tuple[Sequence, ForwardItem]]
    admitted: list[str]


def check_plan(plan: BatchPlan, states: Mapping[str, SequenceState], free_blocks: int, policy_name: str) -> int:
    """Reject a plan an engine cannot execute, before anything changes; returns the blocks it takes (admissions
    plus decodes' ``blocks_to_step``).

    ``states``: the requests the policy was shown, by id; a state holding no blocks (``blocks_held == 0``) is
    waiting, one holding blocks is running (a running request always holds at least one). ``RuntimeError`` for a
    request scheduled twice (or both scheduled and preempted), a preemption of a request that is not running or
    not preemptible, a prefill chunk for a request not in prefill, a decode for one not decoding, or blocks taken
    beyond ``free_blocks`` plus those the preemptions free."""
    ids = [request_id for request_id, _ in plan.prefill_chunks] + list(plan.decodes) + list(plan.preempt)
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{policy_name} scheduled or preempted a request twice in one iteration: {ids}")
    freed = 0
    for request_id in plan.preempt:
        state = states.get(request_id)
        if state is None or state.blocks_held == 0 or not state.preemptible:
            raise RuntimeError(f"{policy_name} preempted {request_id}, which is not a preemptible running request")
        freed += state.blocks_held
    taken = 0
    for request_id, _ in plan.prefill_chunks:
        state = states.get(request_id)
        if state is not None and state.blocks_held == 0:
            taken += state.blocks_to_admit
        elif state is None or not state.in_prefill:
            raise RuntimeError(f"{policy_name} scheduled a prefill chunk for {request_id}, which is not in prefill")
    for request_id in plan.decodes:
        state = states.get(request_id)
        if state is None or state.blocks_held == 0 or state.in_prefill:
            raise RuntimeError(f"{policy_name} scheduled a decode for {request_id}, which is not decoding")
        taken += state.blocks_to_step
    if taken > free_blocks + freed:
        raise RuntimeError(f"{policy_name} planned iterations taking {taken} blocks with {free_blocks} free "
                           f"and {freed} preempted")
    return taken


class Scheduler:
    """Request tables, block accounting, plan admission and stop rules of one engine (module docstring).

    ``blocks``: the KV pool's allocator; ``vocab_size``, ``max_model_len`` (tokens) and ``eos_token_ids`` come
    from the executor's model. ``watermark``: fraction of the pool admission leaves free while sequences run
    (``kv_rules``). ``clock``: seconds since the epoch (arrival and token times). ``num_preemptions`` and
    ``num_recomputed_tokens`` count preemptions and the computed positions they dropped since start."""

    def __init__(self, policy: BatchPolicy, blocks: Blocks[list[int]], *, block_size: int, vocab_size: int,
                 max_model_len: int, eos_token_ids: set[int], clock: Callable[[], float] = time.time,
                 watermark: float = kv_rules.DEFAULT_WATERMARK_FRACTION) -> None:
        self.policy = policy
        self.blocks = blocks
        self.block_size = block_size
        self.num_blocks = blocks.num_blocks
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.watermark_blocks = kv_rules.watermark_blocks(watermark, blocks.num_blocks)
        self.eos_token_ids = eos_token_ids
        self.clock = clock
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0
        self.waiting: dict[str, Sequence] = {}
        self.running: dict[str, Sequence] = {}
        self.prefilled: dict[str, Sequence] = {}
        self.reservations: dict[str, list[int]] = {}
        self.blocks_lock = threading.RLock()

    # ------------------------------------------------------------------ requests in

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, *,
                    arrival_time: float | None = None, slo: SLO | None = None, prefill_only: bool = False) -> None:
        """Queue a request (waiting). ``ValueError`` for a bad request (empty prompt, duplicate id, unknown token
        ids, too long, or a prompt larger than the KV pool)."""
        self.check_new_id(request_id)
        self.check_request(prompt_token_ids, sampling)
        self.waiting[request_id] = Sequence(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=sampling,
            arrival_time=self.clock() if arrival_time is None else arrival_time, slo=slo or SLO(),
            prefill_only=prefill_only,
        )

    def reserve(self, request_id: str, num_blocks: int) -> bool:
        """Hold ``num_blocks`` blocks (the handed-off prompt's) for a request whose KV arrives by
        ``add_prefilled``. False (holding nothing) when that would leave less than the admission watermark free;
        repeating an identical reservation returns True; a non-positive count or an id otherwise in use raises
        ``ValueError``. Takes ``blocks_lock``."""
        if num_blocks <= 0:
            raise ValueError(f"reserve needs a positive number of blocks, got {num_blocks}")
        with self.blocks_lock:
            if len(self.reservations.get(request_id, ())) == num_blocks:
                return True
            self.check_new_id(request_id)
            if num_blocks + kv_rules.admission_watermark(self.watermark_blocks, len(self.running)) > \
                    self.blocks.num_free:
                return False
            self.reservations[request_id] = self.blocks.allocate(num_blocks)
            return True

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                      sampling: SamplingParams, num_tokens: int, *, arrival_time: float | None = None,
                      slo: SLO | None = None, first_token_time: float | None = None,
                      write_kv: Callable[[list[int]], None] | None = None) -> None:
        """Start decoding a reserved request whose prompt KV (``num_tokens`` == prompt length positions) is
        handed off, with ``[first_token_id]`` as its output so far. ``write_kv`` gets the prompt's blocks to fill
        before the request runs (None: the KV is already there). ``KeyError`` without a reservation;
        ``ValueError`` (reservation kept, nothing written) for mismatched sizes, a too small reservation, or a
        first token that already finishes the request. Reserved blocks beyond the prompt's stay in the table, for
        its growth."""
        if request_id not in self.reservations:
            raise KeyError(f"no KV reservation for request {request_id}")
        blocks = self.reservations[request_id]
        self.check_request(prompt_token_ids, sampling)
        self.check_vocabulary([first_token_id])
        if num_tokens != len(prompt_token_ids):
            raise ValueError(f"handoff of {num_tokens} positions for a prompt of {len(prompt_token_ids)} tokens")
        needed = blocks_for(num_tokens, self.block_size)
        if len(blocks) < needed:
            raise ValueError(f"request {request_id} reserved {len(blocks)} blocks, it needs {needed}")
        now = self.clock()
        sequence = Sequence(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=sampling,
            arrival_time=now if arrival_time is None else arrival_time, slo=slo or SLO(), block_table=blocks,
            num_computed=num_tokens, status=SequenceStatus.RUNNING,
        )
        token_time = now if first_token_time is None else first_token_time
        if sequence.append_token(first_token_id, token_time, self.eos_token_ids, self.max_positions) is not None:
            raise ValueError(f"request {request_id} already finished with its first token")
        if write_kv is not None:
            write_kv(blocks[: blocks_for(num_tokens, self.block_size)])
        del self.reservations[request_id]
        self.running[request_id] = sequence

    # ------------------------------------------------------------------ requests out

    def prefilled_sequence(self, request_id: str) -> Sequence:
        """A PREFILLED request; ``KeyError`` if it is not prefilled here."""
        sequence = self.prefilled.get(request_id)
        if sequence is None:
            raise KeyError(f"request {request_id} is not a prefilled request of this engine")
        return sequence

    def reserved_blocks(self, request_id: str) -> list[int]:
        """The block ids reserved for ``request_id``; ``KeyError`` if none. Takes ``blocks_lock``."""
        with self.blocks_lock:
            return list(self.reservations[request_id])

    def computed_blocks(self, request_id: str) -> tuple[list[int], int]:
        """``(block_table, num_computed)`` of a running or prefilled request; ``KeyError`` otherwise."""
        sequence = self.running.get(request_id) or self.prefilled.get(request_id)
        if sequence is None:
            raise KeyError(f"request {request_id} is not running or prefilled here")
        return sequence.block_table, sequence.num_computed

    def release(self, request_id: str) -> bool:
        """Free a PREFILLED request's blocks. False if it is not prefilled here."""
        sequence = self.prefilled.pop(request_id, None)
        if sequence is None:
            return False
        self._free(sequence)
        return True

    def abort(self, request_id: str) -> bool:
        """End the request wherever it is and free its blocks. Idempotent: False when it is not held here."""
        reserved = self.reservations.pop(request_id, None)
        if reserved is not None:
            self.blocks.free(reserved)
            return True
        for table in (self.waiting, self.running, self.prefilled):
            sequence = table.pop(request_id, None)
            if sequence is not None:
                sequence.finish_reason = "abort"
                self._free(sequence)
                return True
        return False

    def take_reservation(self, request_id: str) -> list[int] | None:
        """End a reservation without freeing its blocks: the caller owns them and gives them back with
        ``free_blocks``. None if ``request_id`` holds no reservation. Takes ``blocks_lock``."""
        with self.blocks_lock:
            return self.reservations.pop(request_id, None)

    def free_blocks(self, block_ids: list[int]) -> None:
        """Return blocks taken with ``take_reservation``. Takes ``blocks_lock``."""
        with self.blocks_lock:
            self.blocks.free(block_ids)

    # ------------------------------------------------------------------ iterations

    def request_ids(self) -> list[str]:
        return [*self.waiting, *self.running, *self.prefilled, *self.reservations]

    def has_work(self) -> bool:
        """True while a request waits or runs (prefilled and reserved requests need no iterations)."""
        return bool(self.waiting or self.running)

    def in_flight(self, request_id: str) -> bool:
        """True while ``request_id`` waits or runs."""
        return request_id in self.waiting or request_id in self.running

    @property
    def max_positions(self) -> int:
        """The most positions a sequence may reach here (``kv_rules.max_positions``)."""
        return kv_rules.max_positions(self.max_model_len, self.num_blocks, self.block_size)

    def plan_iteration(self, now: float) -> PlannedIteration:
        """Ask the policy for a plan, check it (``check_plan``), apply its preemptions (at ``now``), admit its new
        requests and take the blocks its decodes grow into."""
        block_size = self.block_size
        states = {request_id: sequence.to_state(block_size)
                  for table in (self.waiting, self.running) for request_id, sequence in table.items()}
        waiting = [states[request_id] for request_id in self.waiting]
        running = [states[request_id] for request_id in self.running]
        kv = kv_rules.kv_state(self.blocks.num_free, self.num_blocks, block_size, self.watermark_blocks,
                               len(running))
        plan = self.policy.schedule(waiting, running, kv, now)
        check_plan(plan, states, kv.free_blocks, type(self.policy).__name__)
        for request_id in plan.preempt:
            self._preempt(request_id, now)
        scheduled: list[tuple[Sequence, ForwardItem]] = []
        admitted: list[str] = []
        for request_id, num_tokens in plan.prefill_chunks:
            sequence = self.running.get(request_id)
            if sequence is None:
                sequence = self._admit(request_id)
                if not sequence.preempted_times:
                    admitted.append(request_id)
            chunk, start = sequence.next_chunk(num_tokens)
            last = start + num_tokens == sequence.prefill_len
            scheduled.append((sequence, ForwardItem(chunk, start, sequence.block_table, needs_logits=last)))
        for request_id in plan.decodes:
            sequence = self.running[request_id]
            step_blocks = sequence.blocks_to_step(block_size)
            if step_blocks:
                sequence.block_table.extend(self.blocks.allocate(step_blocks))
            token, position = sequence.decode_input()
            scheduled.append((sequence, ForwardItem(token, position, sequence.block_table, needs_logits=True)))
        return PlannedIteration(plan, scheduled, admitted)

    @staticmethod
    def advance(planned: PlannedIteration) -> list[Sequence]:
        """The forward pass ran: count the computed positions; returns the sequences that sample, in batch order."""
        sampling: list[Sequence] = []
        for sequence, item in planned.scheduled:
            sequence.num_computed += len(item.token_ids)
            if item.needs_logits:
                sampling.append(sequence)
        return sampling

    def record_tokens(self, sequences: list[Sequence], token_ids: list[int], now: float,
                      output: StepOutput) -> None:
        """Apply one sampled token per sequence at ``now``: stop rules (``Sequence.append_token``), finished
        requests freed, prefill-only ones moved to prefilled; fills ``output``. Caller holds ``blocks_lock``."""
        for sequence, token_id in zip(sequences, token_ids):
            reason = sequence.append_token(token_id, now, self.eos_token_ids, self.max_positions)
            index = len(sequence.output_token_ids) - 1
            output.tokens.append(SampledToken(sequence.request_id, token_id, index, reason, now))
            if reason is not None:
                del self.running[sequence.request_id]
                self._free(sequence)
                output.finished.append(sequence.request_id)
            elif sequence.prefill_only:
                del self.running[sequence.request_id]
                sequence.status = SequenceStatus.PREFILLED
                self.prefilled[sequence.request_id] = sequence
                output.prefilled.append(sequence.request_id)

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            free_blocks=self.blocks.num_free, total_blocks=self.num_blocks, num_waiting=len(self.waiting),
            num_running=len(self.running),
            waiting_prompt_tokens=sum(sequence.prefill_len for sequence in self.waiting.values()),
            preemptions=self.num_preemptions, recomputed_tokens=self.num_recomputed_tokens,
        )

    # ------------------------------------------------------------------ checks and internals

    def check_new_id(self, request_id: str) -> None:
        if any(request_id in table for table in (self.waiting, self.running, self.prefilled, self.reservations)):
            raise ValueError(f"request id {request_id!r} is already in use")

    def check_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.check_vocabulary(prompt_token_ids)
        check_sampling(sampling)
        if len(prompt_token_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens + max_tokens {sampling.max_tokens} "
                             f"exceeds max_model_len {self.max_model_len}")
        if len(prompt_token_ids) > self.max_positions:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens is larger than the KV pool "
                             f"({self.num_blocks} blocks of {self.block_size} tokens)")

    def check_vocabulary(self, token_ids: list[int]) -> None:
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}: {bad[:8]}")

    def _admit(self, request_id: str) -> Sequence:
        sequence = self.waiting.pop(request_id)
        sequence.block_table = self.blocks.allocate(sequence.blocks_to_admit(self.block_size))
        sequence.status = SequenceStatus.RUNNING
        self.running[request_id] = sequence
        return sequence

    def _preempt(self, request_id: str, now: float) -> None:
        """Free a running request's blocks and queue it again, in arrival order, to recompute (``Sequence.preempt``).
        """
        sequence = self.running.pop(request_id)
        self.num_preemptions += 1
        self.num_recomputed_tokens += sequence.num_computed
        self.blocks.free(sequence.block_table)
        sequence.preempt(now)
        self.waiting[request_id] = sequence
        if len(self.waiting) > 1:
            self.waiting = dict(sorted(self.waiting.items(), key=lambda item: item[1].arrival_time))

    def _free(self, sequence: Sequence) -> None:
        self.blocks.free(sequence.block_table)
        sequence.block_table = []
        sequence.status = SequenceStatus.FINISHED


def check_sampling(sampling: SamplingParams) -> None:
    if sampling.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
    if sampling.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {sampling.top_k}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
