"""A simulated worker: the engine's request state machine (``engine.scheduler``) in virtual time.

KV memory on demand, by the shared rules of ``engine.kv_rules`` (never re-derived here): a request is *waiting* (no
KV) until the batch policy admits it, when it takes the blocks of the positions it prefills
(``blocks_to_admit(prefill_len)``: its prompt, plus the outputs it recomputes after a preemption) from the worker's
pool (``engine.block_pool.BlockCounter``, the count-only allocator); it is then *running*. Each decode computes the
position of the newest token (``prompt_len + num_output - 1`` = ``num_computed``) and takes a block when that
position starts one (``blocks_to_step``). The policy sees ``SequenceState``s with the fields the engine's
``Sequence.to_state`` fills (``blocks_to_step`` kept up to date after every token; prompts on a prefill worker are
not ``preemptible``) and the pool as ``kv_rules.kv_state`` (watermark ``kv_rules.watermark_blocks`` of
``ClusterConfig.kv_watermark``); each plan passes the engine's ``check_plan``. A plan's preemptions are applied
first: the victim's blocks are freed, it forgets its computed positions (counted in ``recomputed_tokens``) and waits
again, in arrival order, to prefill its prompt and outputs; when that prefill ends it samples its next output token
(a regular token, not a first token). The first token is sampled at the end of the iteration that computes the last
prompt chunk; each decode yields one token per iteration; a request finishes with its ``target``-th output token
(its output length, or fewer when it would reach ``kv_rules.max_positions`` positions). An ended iteration or stretch
is applied by ``sim.iteration_end``; this module plans, launches, cuts and reserves. A decode worker holds the
blocks of a request's handoff reservation (``reserve``) from the grant on and gets the sequence, with its first
token, when the KV lands; the sequence then grows and may be preempted (and recomputed there) like any other.

Iterations take ``CostModel.iteration_time`` of the plan. Stationary decode stretches (see ``sim.simulator``) are
run as one event: ``stretch_*`` fields describe ``iterations`` consecutive pure-decode iterations of the same
``running`` set from ``t_start``, the i-th taking ``a + b*i`` seconds. A stretch is only as long as every
sequence's block growth over it fits in the free blocks (so the policy would plan every decode, preempting none);
its blocks are allocated once its length is fixed (it ends, or is cut by an interruption), so the free count is
exact whenever anything else reads it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diptych.engine import kv_rules
from diptych.engine.block_pool import BlockCounter
from diptych.engine.scheduler import check_plan
from diptych.policies.batch import BatchPlan, BatchPolicy, SequenceState
from diptych.sim import stretch
from diptych.sim.iteration_end import finish_plan, finish_stretch

if TYPE_CHECKING:
    from diptych.sim.simulator import Simulator


@dataclass(eq=False)
class SimSeq(SequenceState):
    """A ``SequenceState`` the simulator keeps and updates in place (the engine rebuilds an equal one each step).
    Extra fields are the simulator's own: request index, output tokens to generate (``target``), client, tier index
    and TBT target (inf when none)."""

    idx: int = 0
    target: int = 1
    client: str = ""
    tier_idx: int = 0
    slo: float = math.inf

    __eq__ = object.__eq__  # identity: lists of sequences are searched and edited by object
    __hash__ = object.__hash__


class Worker:
    """One engine. ``pending_reservations``: request indices whose handoff reservation waits for blocks here, FIFO
    (granted by ``Simulator.grant_reservations``). ``preemptions``, ``recomputed_tokens`` (computed positions the
    preemptions dropped) and ``peak_running`` (most sequences running at once) count since the start."""

    def __init__(self, sim: Simulator, index: int, role: str, policy: BatchPolicy, total_blocks: int) -> None:
        self.sim = sim
        self.index = index
        self.worker_id = f"{role}-{index}"
        self.role = role
        self.policy = policy
        self.total_blocks = total_blocks
        self.block_size = sim.block_size
        self.blocks = BlockCounter(total_blocks)  # engine view: blocks allocated to sequences and reservations
        self.watermark = kv_rules.watermark_blocks(sim.config.kv_watermark, total_blocks)
        self.pending_reservations: deque[int] = deque()
        self.preemptions = 0
        self.recomputed_tokens = 0
        self.peak_running = 0
        # requests the coordinator placed here and has not released (reservations and backlog: the cluster core)
        self.num_requests = 0
        self.waiting: list[SimSeq] = []
        self.running: list[SimSeq] = []
        self.by_id: dict[str, SimSeq] = {}
        self.generation = 0
        self.busy = False
        self.polling = False  # busy waiting to plan again after a plan that ran nothing
        self.dirty = True
        self.plan_all_decodes = False
        self.draining_to: str | None = None
        self.tracks_iterations = type(policy).on_iteration_end is not BatchPolicy.on_iteration_end
        # the iteration in flight
        self.plan: BatchPlan | None = None
        self.t_start = 0.0
        self.t_end = 0.0
        self.duration = 0.0
        self.stretch = False
        self.stretch_a = 0.0
        self.stretch_b = 0.0
        self.iterations = 0
        self.reported = 0  # stretch iterations whose tokens were reported to the admission policy
        self.stretch_clients: dict[str, int] = {}
        self.stretch_seqs: list[SimSeq] = []  # the sequences a stretch runs (later arrivals join after it)
        self.stretch_allocated = False  # the stretch's blocks are taken (its length is fixed)
        # decode tokens produced while in the decode pool, and the sum of their context lengths (pool statistics)
        self.decode_tokens = 0
        self.decode_context_tokens = 0
        self.plan_context = 0  # context tokens of the decodes of the iteration (or the stretch's first) in flight

    # ------------------------------------------------------------------ sequences in

    def add_waiting(self, seq: SimSeq) -> None:
        self.waiting.append(seq)
        self.by_id[seq.request_id] = seq
        self.dirty = True

    def add_running(self, seq: SimSeq) -> None:
        """A handed-off sequence lands in its reserved blocks and starts decoding."""
        self.running.append(seq)
        self.peak_running = max(self.peak_running, len(self.running))
        self.by_id[seq.request_id] = seq
        self.dirty = True

    def reserve(self, blocks: int, now: float) -> bool:
        """``Engine.reserve`` at ``now``: take ``blocks`` for a handoff if that leaves the admission watermark free.
        During a stretch whose blocks are not taken yet, a reservation that fits beside all of them is granted (it
        would be at any point of the stretch, which stays feasible); otherwise the stretch is cut first
        (``interrupt``), so the count is the engine's."""
        need = blocks + kv_rules.admission_watermark(self.watermark, len(self.running))
        if self.busy and self.stretch and not self.stretch_allocated:
            if need <= self.blocks.num_free - stretch.growth(self.stretch_seqs, self.iterations, self.block_size):
                self.blocks.allocate(blocks)
                return True
            self.interrupt(now)
        if need > self.blocks.num_free:
            return False
        self.blocks.allocate(blocks)
        return True

    def set_policy(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.tracks_iterations = type(policy).on_iteration_end is not BatchPolicy.on_iteration_end
        self.dirty = True

    @property
    def free_blocks(self) -> int:
        """Blocks not allocated (engine view)."""
        return self.blocks.num_free

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def is_empty(self) -> bool:
        """Nothing queued, running, reserved or in flight: safe to change role."""
        return not self.waiting and not self.running and self.num_requests == 0 and not self.busy

    def step_blocks(self, seq: SimSeq) -> int:
        """Blocks ``seq``'s next decode takes (``kv_rules.blocks_to_step`` at its newest token's position)."""
        return kv_rules.blocks_to_step(seq.num_computed, seq.blocks_held, self.block_size)

    # ------------------------------------------------------------------ iterations

    def start(self, now: float) -> None:
        """Begin the next iteration at ``now`` (the worker is not busy)."""
        if not self.dirty and self.plan_all_decodes and not self.waiting and not self.sim.config.exact:
            # until the first sequence finishes, while the blocks they grow into fit
            most = min(seq.target - seq.num_output for seq in self.running)
            k = stretch.feasible_iterations(self.running, most, self.blocks.num_free, self.block_size)
            if k > 0:
                self._start_stretch(now, k)
                return
        running = self.running
        blocks = self.blocks
        by_id = self.by_id
        while True:
            plan = self.policy.schedule(self.waiting, running, kv_rules.kv_state(
                blocks.num_free, self.total_blocks, self.block_size, self.watermark, len(running)), now)
            self.dirty = False
            if not plan.prefill_chunks and not plan.decodes and not plan.preempt:
                self.plan_all_decodes = False
                if running:  # deferred decodes grow urgent with time alone: plan again, as the engine loop does
                    self.polling = True
                    self.stretch = False
                    self._launch(now, self.sim.config.idle_poll_s)
                return
            check_plan(plan, by_id, blocks.num_free, type(self.policy).__name__)
            for request_id in plan.preempt:  # first: their blocks serve this plan
                self._preempt(by_id[request_id], now)
            if plan.prefill_chunks or plan.decodes:
                break  # a plan that only preempted runs nothing: plan again from the new state
        prefill_tokens = 0
        pairs = 0.0
        for request_id, tokens in plan.prefill_chunks:
            seq = by_id[request_id]
            if seq.blocks_held == 0:  # admitted now: take its blocks (Scheduler._admit)
                seq.blocks_held = blocks.allocate(seq.blocks_to_admit)
                seq.blocks_to_admit = 0
                self.waiting.remove(seq)
                running.append(seq)
                if len(running) > self.peak_running:
                    self.peak_running = len(running)
                self.sim.on_prefill_start(self, seq, now)
            start = seq.num_computed
            if tokens <= 0 or start + tokens > seq.prefill_len:
                raise RuntimeError(f"{type(self.policy).__name__} scheduled a chunk of {tokens} tokens at {start} "
                                   f"for {request_id} (prefill {seq.prefill_len})")
            prefill_tokens += tokens
            pairs += tokens * start + tokens * (tokens + 1) / 2
        context = 0
        for request_id in plan.decodes:
            seq = by_id[request_id]
            if seq.blocks_to_step:  # its position starts a block
                seq.blocks_held += blocks.allocate(seq.blocks_to_step)
                seq.blocks_to_step = 0
            context += seq.prompt_len + seq.num_output
        decodes = len(plan.decodes)
        self.plan_context = context
        self.plan_all_decodes = not plan.prefill_chunks and decodes == len(running)
        duration = self.sim.cost.iteration_time(prefill_tokens, decodes, context, pairs,
                                                decodes + len(plan.prefill_chunks))
        self.plan = plan
        self.stretch = False
        self._launch(now, duration)

    def _preempt(self, seq: SimSeq, now: float) -> None:
        """``Scheduler._preempt``: free ``seq``'s blocks, drop its computed positions, queue it again (waiting, in
        arrival order) to prefill its prompt and the outputs it had produced."""
        self.blocks.free(seq.blocks_held)
        self.preemptions += 1
        self.recomputed_tokens += seq.num_computed
        seq.blocks_held = 0
        seq.num_computed = 0
        seq.recompute_tokens = seq.num_output
        seq.blocks_to_admit = kv_rules.blocks_to_admit(seq.prefill_len, self.block_size)
        seq.blocks_to_step = 0
        self.running.remove(seq)
        waiting = self.waiting
        waiting.append(seq)
        if len(waiting) > 1:
            waiting.sort(key=_arrival_time)
        self.sim.preempted(seq, now)

    def _start_stretch(self, now: float, iterations: int) -> None:
        running = self.stretch_seqs = self.running[:]
        n = len(running)
        context = 0
        for seq in running:
            context += seq.prompt_len + seq.num_output
        a, b = self.sim.cost.decode_step_coeffs(n, context)
        self.plan_context = context
        self.stretch = True
        self.stretch_allocated = False
        self.stretch_a, self.stretch_b = a, b
        self.iterations = iterations
        self.reported = 0
        if self.sim.tracks_tokens:
            counts: dict[str, int] = {}
            for seq in running:
                counts[seq.client] = counts.get(seq.client, 0) + 1
            self.stretch_clients = counts
        self._launch(now, iterations * a + b * iterations * (iterations - 1) / 2)

    def allocate_stretch(self) -> None:
        """The stretch's length is fixed: take the blocks its decodes grow into (the engine takes them iteration by
        iteration; nothing else reads the pool in between)."""
        if not self.stretch_allocated:
            self.stretch_allocated = True
            stretch.take_blocks(self.stretch_seqs, self.iterations, self.blocks, self.block_size)

    def _launch(self, now: float, duration: float) -> None:
        self.busy = True
        self.t_start = now
        self.t_end = now + duration
        self.duration = duration
        self.generation += 1
        self.sim.schedule_worker(self)

    def completed_iterations(self, t: float) -> int:
        """Stretch iterations that ended by time ``t``."""
        return stretch.completed_iterations(self.stretch_a, self.stretch_b, self.iterations, t - self.t_start)

    def decode_work(self, iterations: int) -> tuple[int, int]:
        """``(decode_tokens, decode_context_tokens)`` once ``iterations`` iterations of the stretch in flight are
        counted too (each decode's context grows by one token per iteration)."""
        n = len(self.stretch_seqs)
        return (self.decode_tokens + iterations * n,
                self.decode_context_tokens + iterations * self.plan_context + n * iterations * (iterations - 1) // 2)

    def wake(self, now: float) -> None:
        """Work reached this worker at ``now``: an idle or polling worker plans at once, a busy one at its next
        iteration (``interrupt``)."""
        if self.busy and not self.polling:
            self.interrupt(now)
            return
        if self.polling:  # its pending wake-up event is dropped (``generation``)
            self.polling = self.busy = False
            self.generation += 1
        self.start(now)

    def interrupt(self, t: float) -> None:
        """Something changed at ``t`` while this worker runs: a stretch is cut at the end of the iteration in
        progress (its sequences were fixed when it started), whose blocks are then taken; the next iteration
        consults the policy."""
        self.dirty = True
        if not (self.busy and self.stretch):
            return
        j = self.completed_iterations(t)
        if j + 1 < self.iterations:
            self.iterations = j + 1
            a, b, k = self.stretch_a, self.stretch_b, self.iterations
            self.t_end = self.t_start + k * a + b * k * (k - 1) / 2
            self.duration = self.t_end - self.t_start
            self.generation += 1
            self.sim.schedule_worker(self)
        self.allocate_stretch()

    def sync_tokens(self, t: float) -> None:
        """Report to the admission policy the tokens of stretch iterations that ended by ``t``."""
        if not (self.busy and self.stretch):
            return
        j = self.completed_iterations(t)
        if j > self.reported:
            step = j - self.reported
            on_tokens = self.sim.admission.on_output_tokens
            for client, count in self.stretch_clients.items():
                on_tokens(client, count * step)
            self.reported = j

    def finish(self) -> None:
        """The iteration (or stretch) in flight ended at ``t_end``: apply it, then start the next one."""
        t = self.t_end
        if self.polling:
            self.polling = False
        elif self.stretch:  # still busy while applying: work placed meanwhile waits for the next iteration
            finish_stretch(self, t)
        else:
            finish_plan(self, t)
        self.busy = False
        if self.pending_reservations:
            self.sim.grant_reservations(self, t)
        if self.draining_to is not None and self.is_empty():
            self.sim.switch_role(self, t)
        if self.has_work() and not self.busy:
            self.start(t)

    def release(self, seq: SimSeq) -> None:
        """The request leaves this engine: free its blocks, forget it."""
        self.blocks.free(seq.blocks_held)
        seq.blocks_held = 0
        self.running.remove(seq)
        del self.by_id[seq.request_id]
        self.dirty = True


def _arrival_time(seq: SimSeq) -> float:
    return seq.arrival_time
