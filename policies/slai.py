"""SLAI, SLO-aware batching (Bari, Hegde, de Veciana, arXiv 2508.01002): decodes with slack yield their slot to
prefills, which cuts TTFT, while decodes close to their TBT target always run.

Urgency (``policies.slai_urgency``): each decode j has a last schedulable time
``LST_j = t_end_j + TBT_j - Theta * b_bar``; it is *critical* iff ``now >= LST_j``. Strict-tier decodes (TBT 0.1 s,
with ``Theta * b_bar >= 0.1``) are critical as soon as they get a token; at KV utilisation >= 0.96 Theta doubles and
nearly every decode is critical (Sarathi-like), so requests finish and free memory.

Iteration composition (token budget ``token_budget``, at most ``max_decodes`` decodes, at most ``max_running``
sequences holding KV); ``running`` is in admission order:

1. critical decodes, smallest (LST, arrival) first;
2. partial prefills continue, FIFO, each chunk ``min(remaining prompt, budget left)``;
3. new requests, shortest prompt first (``strict_tier_first``: smaller TBT target first, then shortest prompt;
   ``aging_s`` [Diptych, off by default]: a request waiting longer than ``aging_s`` goes before all others, oldest
   first), chunked to fill the budget; admission stops at the first that does not fit in KV (head of line), when
   ``max_running`` is reached or the budget is spent;
4. non-critical decodes in LST order with the budget left. Deferred decodes keep their KV and their LST.

KV pressure: a critical decode whose next token needs a block when none is free preempts, in order, the most
recently queued partial prefill, then the decode with the most slack (largest LST), down to itself. Non-critical
decodes never preempt: without a free block they are deferred. An iteration that preempted admits no new request
(the vLLM rule Sarathi-Serve and SLAI's reference code inherit). [Diptych] Work-conserving: when nothing else would
run (no critical decode, no prefill, no free block for the non-critical ones), the decodes are taken most urgent
first as if critical, preempting by the same order, instead of leaving the GPU idle until one becomes critical.

Decode-only worker [Diptych] (``waiting`` empty, no prefills): the same composition applies, so (a) every decode
joins, critical first then by LST, up to ``max_decodes`` and the budget; those beyond are the ones with the most
slack and wait an iteration; (b) ``order_handoffs`` admits incoming KV handoffs most urgent first, by
``t_end + TBT`` (the LST order: ``Theta * b_bar`` is common to all), handoffs without a token first; (c) under KV
pressure the decode with the most slack is preempted first.

Times in seconds, lengths in tokens, memory in KV blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from diptych.policies.batch import (
    BATCH_POLICIES,
    BatchPlan,
    BatchPolicy,
    KVState,
    SequenceState,
    admit_prefills,
    continue_prefills,
)
from diptych.policies.knobs import Knob
from diptych.policies.kv_planner import KVPlanner
from diptych.policies.slai_urgency import B_BAR_MODES, IterationTimer, LSTBook, Urgency


@BATCH_POLICIES.register("slai")
class SLAIBatching(BatchPolicy):
    """Knobs: ``token_budget`` (B, 512), ``max_decodes`` (D_max, 128), ``max_running`` (S_max, 128), ``theta_lo``
    (5), ``theta_hi`` (10), ``kv_threshold`` (m, 0.96), ``fixed_offset`` (Theta = theta_hi always, False),
    ``default_tbt_s`` (TBT target of sequences without one, 0.2), ``b_bar_mode`` (``"cumulative"`` or ``"ewma"``),
    ``ewma_alpha`` (0.1), ``strict_tier_first`` (False), ``aging_s`` (None = off)."""

    summary = "SLO-aware: urgent decodes first, decodes with TBT slack deferred for shortest-prompt-first prefills"
    knobs = (
        Knob("token_budget", int, 512, "B: tokens per iteration, prefill chunks plus decodes"),
        Knob("max_decodes", int, 128, "D_max: decodes per iteration"),
        Knob("max_running", int, 128, "S_max: sequences holding KV at once"),
        Knob("theta_lo", float, 5.0, "urgency offset (iterations of slack) under low KV pressure"),
        Knob("theta_hi", float, 10.0, "urgency offset (iterations of slack) under high KV pressure"),
        Knob("kv_threshold", float, 0.96, "m: KV usage fraction above which theta_lo applies"),
        Knob("fixed_offset", bool, False, "Theta = theta_hi always"),
        Knob("default_tbt_s", float, 0.2, "TBT target (seconds) of sequences without one"),
        Knob("b_bar_mode", str, "cumulative", "how the mean iteration time is kept", choices=B_BAR_MODES),
        Knob("ewma_alpha", float, 0.1, "smoothing of the ewma b_bar_mode"),
        Knob("strict_tier_first", bool, False, "serve stricter SLO tiers first"),
        Knob("aging_s", float, None, "seconds after which a waiting prompt goes first (None: off)", optional=True),
    )

    def __init__(self, token_budget: int = 512, max_decodes: int = 128, max_running: int = 128,
                 theta_lo: float = 5.0, theta_hi: float = 10.0, kv_threshold: float = 0.96,
                 fixed_offset: bool = False, default_tbt_s: float = 0.2, b_bar_mode: str = "cumulative",
                 ewma_alpha: float = 0.1, strict_tier_first: bool = False, aging_s: float | None = None) -> None:
        if token_budget <= 0 or max_decodes <= 0 or max_running <= 0:
            raise ValueError("token_budget, max_decodes and max_running must be positive")
        if aging_s is not None and aging_s < 0:
            raise ValueError("aging_s must be >= 0")
        self.token_budget = token_budget
        self.max_decodes = max_decodes
        self.max_running = max_running
        self.strict_tier_first = strict_tier_first
        self.aging_s = aging_s
        self.urgency = Urgency(theta_lo, theta_hi, kv_threshold, fixed_offset, default_tbt_s,
                               IterationTimer(b_bar_mode, ewma_alpha))
        self.lst_book = LSTBook(self.urgency)

    @property
    def mean_iteration_s(self) -> float:
        """``b_bar``: the running mean of iteration wall time (seconds)."""
        return self.urgency.timer.mean_s

    def on_iteration_end(self, duration_s: float, now: float) -> None:
        self.urgency.timer.observe(duration_s)

    def schedule(
        self, waiting: Sequence[SequenceState], running: Sequence[SequenceState], kv: KVState, now: float
    ) -> BatchPlan:
        plan = BatchPlan()
        blocks = KVPlanner(kv, plan)
        decodes = [seq for seq in running if not seq.in_prefill]
        partials = [seq for seq in running if seq.in_prefill]
        lst = self.lst_book.refresh(decodes, kv.utilization)
        by_urgency = sorted(decodes, key=lambda seq: (lst[seq.request_id], seq.arrival_time))
        victims = partials[::-1] + by_urgency[::-1]
        max_decodes = min(self.max_decodes, self.token_budget)

        for seq in by_urgency:
            if now < lst[seq.request_id] or len(plan.decodes) >= max_decodes:
                break
            if not blocks.is_decided(seq):
                blocks.step_or_preempt(seq, victims)

        budget = continue_prefills(partials, blocks, self.token_budget - len(plan.decodes))
        if not plan.preempt:
            queue = sorted(waiting, key=lambda seq: self._admission_key(seq, now))
            budget = admit_prefills(queue, blocks, budget, self.max_running - len(running))

        for seq in by_urgency:
            if budget <= 0 or len(plan.decodes) >= max_decodes:
                break
            if not blocks.is_decided(seq) and blocks.step(seq):
                budget -= 1
        if plan.is_empty() and not plan.preempt and by_urgency:  # [Diptych] work-conserving under KV pressure
            blocks.step_or_preempt(by_urgency[0], victims)
            for seq in by_urgency[1:]:
                if budget <= 1 or len(plan.decodes) >= max_decodes:
                    break
                if not blocks.is_decided(seq) and blocks.step(seq):
                    budget -= 1
        return plan

    def _admission_key(self, seq: SequenceState, now: float) -> tuple[float, ...]:
        if self.aging_s is not None and now - seq.arrival_time > self.aging_s:
            return (0, seq.arrival_time)
        tier = self.urgency.tbt(seq) if self.strict_tier_first else 0.0
        return (1, tier, seq.remaining_prompt, seq.arrival_time)

    def order_handoffs(self, pending: Sequence[SequenceState], now: float) -> list[str]:
        def deadline(seq: SequenceState) -> float:
            if seq.last_token_time is None:
                return float("-inf")
            return seq.last_token_time + self.urgency.tbt(seq)

        return [seq.request_id for seq in sorted(pending, key=lambda seq: (deadline(seq), seq.arrival_time))]
