"""A simulated worker: the engine's request state machine (``engine.scheduler``) in virtual time.

As in the engine, a request is *waiting* (no KV) until the batch policy admits it, when it takes its blocks
(``blocks_to_reserve``: prompt plus max_tokens, the prompt only on a prefill worker, whose requests are
prefill-only) from the worker's pool (``engine.block_pool.BlockCounter``, the count-only allocator); it is then
*running*. The policy sees ``SequenceState``s with the same fields the engine's ``Sequence.to_state`` fills
(``blocks_to_step = 0``: the reservation rule means a running sequence never needs a block), and each plan passes
the engine's ``check_plan`` (a plan that preempts is refused, as in the engine). The first token is sampled at the
end of the iteration that computes the last prompt chunk; each decode yields one token per iteration; a request
finishes with its ``target``-th output token (its output length). A decode worker holds the blocks the coordinator
reserved from admission on and gets the sequence, with its first token, when the KV handoff lands.

Iterations take ``CostModel.iteration_time`` of the plan. Stationary decode stretches (see ``sim.simulator``) are
run as one event: ``stretch_*`` fields describe ``iterations`` consecutive pure-decode iterations of the same
``running`` set from ``t_start``, the i-th taking ``a + b*i`` seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diptych.engine.block_pool import BlockCounter
from diptych.engine.scheduler import check_plan
from diptych.policies.batch import BatchPlan, BatchPolicy, KVState, SequenceState

if TYPE_CHECKING:
    from diptych.sim.simulator import Simulator

PREFILL, DECODE, COLOCATED = "prefill", "decode", "colocated"


@dataclass(eq=False)
class SimSeq(SequenceState):
    """A ``SequenceState`` the simulator keeps and updates in place (the engine rebuilds an equal one each step).
    Extra fields are the simulator's own: request index, output length to generate, client, tier index, TBT target
    (inf when none) and the KV blocks it will take or holds."""

    idx: int = 0
    target: int = 1
    client: str = ""
    tier_idx: int = 0
    slo: float = math.inf
    blocks: int = 0

    __eq__ = object.__eq__  # identity: lists of sequences are searched and edited by object
    __hash__ = object.__hash__


class Worker:
    def __init__(self, sim: Simulator, index: int, role: str, policy: BatchPolicy, total_blocks: int) -> None:
        self.sim = sim
        self.index = index
        self.worker_id = f"{role}-{index}"
        self.role = role
        self.policy = policy
        self.total_blocks = total_blocks
        self.blocks = BlockCounter(total_blocks)  # engine view: blocks allocated to sequences and reservations
        # requests the coordinator placed here and has not released (reservations and backlog: the cluster core)
        self.num_requests = 0
        self.waiting: list[SimSeq] = []
        self.running: list[SimSeq] = []
        self.by_id: dict[str, SimSeq] = {}
        self.generation = 0
        self.busy = False
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
        self.by_id[seq.request_id] = seq
        self.dirty = True

    def set_policy(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.tracks_iterations = type(policy).on_iteration_end is not BatchPolicy.on_iteration_end
        self.dirty = True

    @property
    def free_blocks(self) -> int:
        """Blocks not allocated (engine view)."""
        return self.blocks.num_free

    @free_blocks.setter
    def free_blocks(self, value: int) -> None:
        self.blocks.num_free = value

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def is_empty(self) -> bool:
        """Nothing queued, running, reserved or in flight: safe to change role."""
        return not self.waiting and not self.running and self.num_requests == 0 and not self.busy

    # ------------------------------------------------------------------ iterations

    def start(self, now: float) -> None:
        """Begin the next iteration at ``now`` (the worker is not busy)."""
        if not self.dirty and self.plan_all_decodes and not self.waiting and not self.sim.config.exact:
            self._start_stretch(now)
            return
        running = self.running
        blocks = self.blocks
        plan = self.policy.schedule(self.waiting, running,
                                    KVState(blocks.num_free, self.total_blocks, self.sim.block_size), now)
        self.dirty = False
        if not plan.prefill_chunks and not plan.decodes and not plan.preempt:
            self.plan_all_decodes = False
            return
        by_id = self.by_id
        check_plan(plan, by_id, blocks.num_free, type(self.policy).__name__)
        prefill_tokens = 0
        pairs = 0.0
        for request_id, tokens in plan.prefill_chunks:
            seq = by_id[request_id]
            if seq.blocks_held == 0:  # admitted now: take its blocks (Scheduler._admit)
                seq.blocks_held = blocks.allocate(seq.blocks_to_admit)
                seq.blocks_to_admit = 0
                self.waiting.remove(seq)
                running.append(seq)
                self.sim.on_prefill_start(self, seq, now)
            start = seq.num_computed
            if tokens <= 0 or start + tokens > seq.prompt_len:
                raise RuntimeError(f"{type(self.policy).__name__} scheduled a chunk of {tokens} tokens at {start} "
                                   f"for {request_id} (prompt {seq.prompt_len})")
            prefill_tokens += tokens
            pairs += tokens * start + tokens * (tokens + 1) / 2
        context = 0
        for request_id in plan.decodes:
            seq = by_id[request_id]
            context += seq.prompt_len + seq.num_output
        decodes = len(plan.decodes)
        self.plan_context = context
        self.plan_all_decodes = not plan.prefill_chunks and decodes == len(running)
        duration = self.sim.cost.iteration_time(prefill_tokens, decodes, context, pairs,
                                                decodes + len(plan.prefill_chunks))
        self.plan = plan
        self.stretch = False
        self._launch(now, duration)

    def _start_stretch(self, now: float) -> None:
        running = self.stretch_seqs = self.running[:]
        n = len(running)
        remaining = min(seq.target - seq.num_output for seq in running)
        context = 0
        for seq in running:
            context += seq.prompt_len + seq.num_output
        a, b = self.sim.cost.decode_step_coeffs(n, context)
        self.plan_context = context
        self.stretch = True
        self.stretch_a, self.stretch_b = a, b
        self.iterations = remaining
        self.reported = 0
        if self.sim.tracks_tokens:
            counts: dict[str, int] = {}
            for seq in running:
                counts[seq.client] = counts.get(seq.client, 0) + 1
            self.stretch_clients = counts
        self._launch(now, remaining * a + b * remaining * (remaining - 1) / 2)

    def _launch(self, now: float, duration: float) -> None:
        self.busy = True
        self.t_start = now
        self.t_end = now + duration
        self.duration = duration
        self.generation += 1
        self.sim.schedule_worker(self)

    def completed_iterations(self, t: float) -> int:
        """Stretch iterations that ended by time ``t``."""
        a, b = self.stretch_a, self.stretch_b
        elapsed = t - self.t_start
        if elapsed <= 0:
            return 0
        if b <= 0:
            j = int(elapsed / a) if a > 0 else self.iterations
        else:  # largest j with j*a + b*j*(j-1)/2 <= elapsed
            half = b / 2
            j = int((-(a - half) + math.sqrt((a - half) ** 2 + 4 * half * elapsed)) / (2 * half))
        j = max(0, min(j, self.iterations))
        while j > 0 and j * a + b * j * (j - 1) / 2 > elapsed + 1e-12:
            j -= 1
        while j < self.iterations and (j + 1) * a + b * (j + 1) * j / 2 <= elapsed + 1e-12:
            j += 1
        return j

    def decode_work(self, iterations: int) -> tuple[int, int]:
        """``(decode_tokens, decode_context_tokens)`` once ``iterations`` iterations of the stretch in flight are
        counted too (each decode's context grows by one token per iteration)."""
        n = len(self.stretch_seqs)
        return (self.decode_tokens + iterations * n,
                self.decode_context_tokens + iterations * self.plan_context + n * iterations * (iterations - 1) // 2)

    def interrupt(self, t: float) -> None:
        """Something changed at ``t`` while this worker runs: a stretch is cut at the end of the iteration in
        progress (its sequences were fixed when it started); the next iteration consults the policy."""
        self.dirty = True
        if not (self.busy and self.stretch):
            return
        j = self.completed_iterations(t)
        if j + 1 >= self.iterations:
            return
        self.iterations = j + 1
        a, b, k = self.stretch_a, self.stretch_b, self.iterations
        self.t_end = self.t_start + k * a + b * k * (k - 1) / 2
        self.duration = self.t_end - self.t_start
        self.generation += 1
        self.sim.schedule_worker(self)

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
        if self.stretch:  # still busy while applying: work placed meanwhile waits for the next iteration
            self._finish_stretch(t)
        else:
            self._finish_plan(t)
        self.busy = False
        if self.draining_to is not None and self.is_empty():
            self.sim.switch_role(self, t)
        if self.has_work() and not self.busy:
            self.start(t)

    def _finish_plan(self, t: float) -> None:
        plan = self.plan
        assert plan is not None
        if self.tracks_iterations:
            self.policy.on_iteration_end(self.duration, t)
        sim = self.sim
        by_id = self.by_id
        reports: dict[str, int] | None = {} if sim.tracks_tokens else None
        done: list[SimSeq] = []
        for request_id, tokens in plan.prefill_chunks:
            seq = by_id[request_id]
            seq.num_computed += tokens
            if seq.num_computed >= seq.prompt_len:
                sim.first_token(self, seq, t)
                if reports is not None and self.role == COLOCATED:
                    reports[seq.client] = reports.get(seq.client, 0) + 1
                done.append(seq)
        # one token per decode (Simulator.token, inlined: this is the hot loop of busy clusters)
        gaps, max_tbt, violations, num_gaps = sim.pending_gaps, sim.max_tbt, sim.violations, sim.num_gaps
        token_times = sim.token_times
        for request_id in plan.decodes:
            seq = by_id[request_id]
            i = seq.idx
            gap = t - seq.last_token_time  # type: ignore[operator]  # a decoding sequence has its last token's time
            gaps[seq.tier_idx].append(gap)
            if gap > max_tbt[i]:
                max_tbt[i] = gap
            if gap > seq.slo:
                violations[i] += 1
            num_gaps[i] += 1
            seq.num_output += 1
            seq.last_token_time = t
            if token_times is not None:
                token_times[i].append(t)
            if reports is not None:
                reports[seq.client] = reports.get(seq.client, 0) + 1
            if seq.num_output >= seq.target:
                done.append(seq)
        if self.role == DECODE:
            self.decode_tokens += len(plan.decodes)
            self.decode_context_tokens += self.plan_context
        if sim.pending_count() > 1_000_000:
            sim.flush_gaps()
        if reports:
            on_tokens = sim.admission.on_output_tokens
            for client, count in reports.items():
                on_tokens(client, count)
        for seq in done:
            if seq.num_output >= seq.target:
                self._release(seq)
                sim.finished(self, seq, t)
            elif self.role == PREFILL:  # prefilled: export the KV and free the blocks, hand off
                self._release(seq)
                sim.prefilled(self, seq, t)

    def _finish_stretch(self, t: float) -> None:
        k = self.iterations
        a, b = self.stretch_a, self.stretch_b
        sim = self.sim
        t0 = self.t_start
        if self.tracks_iterations:
            on_end = self.policy.on_iteration_end
            end = t0
            for i in range(k):
                d = a + b * i
                end += d
                on_end(d, end)
        if sim.tracks_tokens and k > self.reported:
            on_tokens = sim.admission.on_output_tokens
            for client, count in self.stretch_clients.items():
                on_tokens(client, count * (k - self.reported))
        self.reported = k  # before sequences finish: the admission they trigger syncs this (still busy) stretch
        first_end = t0 + a
        members = self.stretch_seqs
        if self.role == DECODE:
            self.decode_tokens, self.decode_context_tokens = self.decode_work(k)
        sim.stretch_tokens(members, k, a, b, t0, first_end, t)
        done = [seq for seq in members if seq.num_output >= seq.target]
        for seq in done:
            self._release(seq)
            sim.finished(self, seq, t)

    def _release(self, seq: SimSeq) -> None:
        """The request leaves this engine: free its blocks, forget it."""
        self.blocks.free(seq.blocks_held)
        seq.blocks_held = 0
        self.running.remove(seq)
        del self.by_id[seq.request_id]
        self.dirty = True
