"""Applying an iteration that ended on a simulated worker (``sim.worker``): positions computed, tokens recorded,
requests finished or handed off.

``finish_plan(worker, t)`` applies the plan in flight at its end ``t``: each prefill chunk computes its positions;
the chunk that computes a sequence's last prefill position samples its first token (``Simulator.first_token``), or,
after a preemption, its next regular token (``Simulator.token``); each decode yields one token (``Simulator.token``,
inlined: this is the hot loop of busy clusters). ``finish_stretch(worker, t)`` applies a stationary decode stretch
of ``worker.iterations`` iterations, which yields that many tokens per sequence (``Simulator.stretch_tokens``) and
takes the blocks they grow into (``Worker.allocate_stretch``). Either way a sequence that did not finish has its
``blocks_to_step`` set for its next decode (``engine.kv_rules.blocks_to_step``); a request finishes with its
``target``-th output token, and a prompt on a prefill worker leaves when its prefill ends (its KV is handed off).
Finished requests free their blocks (``Worker.release``) after every token is recorded.

The admission policy is charged one output token per token recorded here (a prefill worker's first token is charged
by ``Simulator.first_token``); the batch policy hears of each iteration's duration (seconds)
when it tracks iterations. Decode workers count the decode tokens and their context tokens (pool statistics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diptych.engine import kv_rules
from diptych.sim.roles import COLOCATED, DECODE, PREFILL

if TYPE_CHECKING:
    from diptych.sim.worker import SimSeq, Worker


def finish_plan(worker: Worker, t: float) -> None:
    """Apply ``worker.plan``, which ended at ``t``."""
    plan = worker.plan
    assert plan is not None
    if worker.tracks_iterations:
        worker.policy.on_iteration_end(worker.duration, t)
    sim = worker.sim
    by_id = worker.by_id
    reports: dict[str, int] | None = {} if sim.tracks_tokens else None
    done: list[SimSeq] = []
    role = worker.role
    step, size = kv_rules.blocks_to_step, worker.block_size
    for request_id, tokens in plan.prefill_chunks:
        seq = by_id[request_id]
        seq.num_computed += tokens
        if seq.num_computed < seq.prefill_len:
            continue
        if seq.num_output == 0:
            sim.first_token(worker, seq, t)
            if reports is not None and role == COLOCATED:
                reports[seq.client] = reports.get(seq.client, 0) + 1
        else:  # recomputed after a preemption: the next output token, a regular one
            seq.recompute_tokens = 0
            sim.token(seq, t)
            if reports is not None:
                reports[seq.client] = reports.get(seq.client, 0) + 1
        if role == PREFILL or seq.num_output >= seq.target:
            done.append(seq)
        else:
            seq.blocks_to_step = step(seq.num_computed, seq.blocks_held, size)
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
        seq.num_computed += 1
        seq.last_token_time = t
        if token_times is not None:
            token_times[i].append(t)
        if reports is not None:
            reports[seq.client] = reports.get(seq.client, 0) + 1
        if seq.num_output >= seq.target:
            done.append(seq)
        else:
            seq.blocks_to_step = step(seq.num_computed, seq.blocks_held, size)
    if role == DECODE:
        worker.decode_tokens += len(plan.decodes)
        worker.decode_context_tokens += worker.plan_context
    if sim.pending_count() > 1_000_000:
        sim.flush_gaps()
    if reports:
        on_tokens = sim.admission.on_output_tokens
        for client, count in reports.items():
            on_tokens(client, count)
    for seq in done:
        worker.release(seq)
        if seq.num_output >= seq.target:
            sim.finished(worker, seq, t)
        else:  # prefilled on a prefill worker: the KV is exported, the blocks freed; hand off
            sim.prefilled(worker, seq, t)


def finish_stretch(worker: Worker, t: float) -> None:
    """Apply the stretch in flight, which ended at ``t`` (the worker is still busy: work placed meanwhile waits for
    the next iteration)."""
    k = worker.iterations
    a, b = worker.stretch_a, worker.stretch_b
    sim = worker.sim
    t0 = worker.t_start
    if worker.tracks_iterations:
        on_end = worker.policy.on_iteration_end
        end = t0
        for i in range(k):
            d = a + b * i
            end += d
            on_end(d, end)
    if sim.tracks_tokens and k > worker.reported:
        on_tokens = sim.admission.on_output_tokens
        for client, count in worker.stretch_clients.items():
            on_tokens(client, count * (k - worker.reported))
    worker.reported = k  # before sequences finish: the admission they trigger syncs this (still busy) stretch
    first_end = t0 + a
    members = worker.stretch_seqs
    if worker.role == DECODE:
        worker.decode_tokens, worker.decode_context_tokens = worker.decode_work(k)
    worker.allocate_stretch()
    sim.stretch_tokens(members, k, a, b, t0, first_end, t)
    step, size = kv_rules.blocks_to_step, worker.block_size
    done = []
    for seq in members:
        seq.num_computed += k
        if seq.num_output >= seq.target:
            done.append(seq)
        else:
            seq.blocks_to_step = step(seq.num_computed, seq.blocks_held, size)
    for seq in done:
        worker.release(seq)
        sim.finished(worker, seq, t)
