"""vLLM-style prefill-first batching (the pre-chunking vLLM scheduler): prefills and decodes never share an
iteration.

Each iteration:
1. Prefill iteration, if any prompt can start: whole prompts, no decodes. Running sequences still in prefill (e.g. a
   worker that switched policy mid-prompt) go first, then waiting requests FCFS while the prompt fits in the token
   budget ``max_num_batched_tokens``, the blocks fit and fewer than ``max_running`` sequences hold KV. The first
   prompt always runs whole even if longer than the budget. Admission stops at the first request that does not fit
   (head of line).
2. Otherwise a decode iteration: every running decode, oldest first, up to ``max_decodes``; out of blocks, the most
   recently admitted running sequence is preempted (vLLM's recompute rule).

Running decodes stall for the whole prefill iteration: the TBT cost Sarathi-Serve removes. Lengths in tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from diptych.policies.batch import BATCH_POLICIES, BatchPlan, BatchPolicy, KVState, SequenceState, schedule_all_decodes
from diptych.policies.knobs import Knob
from diptych.policies.kv_planner import KVPlanner


@BATCH_POLICIES.register("prefill-first")
class PrefillFirstBatching(BatchPolicy):
    """Knobs: ``max_num_batched_tokens`` (prefill tokens per iteration, 2048), ``max_running`` (sequences holding
    KV, 128), ``max_decodes`` (decodes per iteration, 128)."""

    summary = "vLLM-style: whole prompts first, decodes stall while prefills run"
    knobs = (
        Knob("max_num_batched_tokens", int, 2048, "prefill tokens per iteration"),
        Knob("max_running", int, 128, "sequences holding KV at once"),
        Knob("max_decodes", int, 128, "decodes per iteration"),
    )

    def __init__(self, max_num_batched_tokens: int = 2048, max_running: int = 128, max_decodes: int = 128) -> None:
        if max_num_batched_tokens <= 0 or max_running <= 0 or max_decodes <= 0:
            raise ValueError("max_num_batched_tokens, max_running and max_decodes must be positive")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_running = max_running
        self.max_decodes = max_decodes

    def schedule(
        self, waiting: Sequence[SequenceState], running: Sequence[SequenceState], kv: KVState, now: float
    ) -> BatchPlan:
        plan = self._prefill_iteration(waiting, running, kv)
        if not plan.is_empty():
            return plan
        plan = BatchPlan()
        schedule_all_decodes(running, KVPlanner(kv, plan), self.max_decodes)
        return plan

    def _prefill_iteration(
        self, waiting: Sequence[SequenceState], running: Sequence[SequenceState], kv: KVState
    ) -> BatchPlan:
        plan = BatchPlan()
        blocks = KVPlanner(kv, plan)
        budget = self.max_num_batched_tokens
        num_running = len(running)
        candidates = [(seq, False) for seq in running if seq.in_prefill] + [(seq, True) for seq in waiting]
        for seq, needs_admission in candidates:
            if plan.prefill_chunks and seq.remaining_prompt > budget:
                break
            if needs_admission:
                if num_running >= self.max_running or not blocks.admit(seq):
                    break
                num_running += 1
            plan.prefill_chunks.append((seq.request_id, seq.remaining_prompt))
            budget -= seq.remaining_prompt
        return plan
