"""RAD batching, Diptych's reading of "optimal tiling" (Bari, Hegde, de Veciana, arXiv 2508.01002) [Diptych].

A matmul's cost grows in tile steps, so a batch a few tokens past a tile multiple pays for an almost empty tile.
This policy is Sarathi-Serve's stall-free batching with tile-aligned prefill packing:

1. Decodes: every running decode, oldest first, up to ``max_decodes`` (out of blocks, the most recently admitted
   running sequence is preempted, as in Sarathi). With ``decode_tile`` set (the GPU's ``b_col``), the decodes per
   iteration are rounded down to a multiple of ``decode_tile`` when at least one full tile is running; the
   decodes left out are those that got a token most recently, and they run next iteration. Fewer decodes than one
   tile all run (never held back to fill a tile). ``decode_tile=None`` (default) runs every decode: decode is
   memory-bound and deferring a decode costs TBT, so opt in only where profiling shows the tile step.
2. Prefill target: the budget left after decodes rounded down to a multiple of ``tile_quantum`` (L); when less than
   one quantum is left, the unaligned remainder (so prefills never starve behind decodes).
3. Packing: partial prefills FIFO, then waiting requests FCFS (head of line on KV and ``max_running``), each chunk
   ``min(remaining prompt, target left)``: one prompt's last chunk is completed by the next prompt's first chunk
   instead of leaving a ragged batch. No new request is admitted in an iteration that preempted.
4. Alignment: if the packed prefill tokens are not a multiple of L (not enough prompt tokens could be placed), the
   last chunks are cut back to the largest multiple of L, dropping chunks cut to zero (a dropped waiting request is
   not admitted). A total below L is kept as is: a prompt tail shorter than the quantum still runs, so the batch is
   never empty while prompt work waits.

Invariant: prefill tokens per iteration are a multiple of ``tile_quantum`` or below it (or the unaligned remainder
of step 2). Lengths in tokens.
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
    schedule_decodes,
)
from diptych.policies.knobs import Knob
from diptych.policies.kv_planner import KVPlanner


@BATCH_POLICIES.register("rad")
class RADBatching(BatchPolicy):
    """Knobs: ``token_budget`` (512), ``max_running`` (128), ``max_decodes`` (128), ``tile_quantum`` (L, 128),
    ``decode_tile`` (b_col, None = every decode runs)."""

    summary = "Sarathi-like with prefill chunks packed to multiples of the matmul tile quantum"
    knobs = (
        Knob("token_budget", int, 512, "tokens per iteration, prefill chunks plus decodes"),
        Knob("max_running", int, 128, "sequences holding KV at once"),
        Knob("max_decodes", int, 128, "decodes per iteration"),
        Knob("tile_quantum", int, 128, "L: prefill chunks are packed to multiples of this many tokens"),
        Knob("decode_tile", int, None, "b_col: decodes per iteration tile (None: every decode runs)", optional=True),
    )

    def __init__(self, token_budget: int = 512, max_running: int = 128, max_decodes: int = 128,
                 tile_quantum: int = 128, decode_tile: int | None = None) -> None:
        if min(token_budget, max_running, max_decodes, tile_quantum) <= 0:
            raise ValueError("token_budget, max_running, max_decodes and tile_quantum must be positive")
        if decode_tile is not None and decode_tile <= 0:
            raise ValueError("decode_tile must be positive or None")
        self.token_budget = token_budget
        self.max_running = max_running
        self.max_decodes = max_decodes
        self.tile_quantum = tile_quantum
        self.decode_tile = decode_tile

    def schedule(
        self, waiting: Sequence[SequenceState], running: Sequence[SequenceState], kv: KVState, now: float
    ) -> BatchPlan:
        plan = BatchPlan()
        blocks = KVPlanner(kv, plan)
        decodes = [seq for seq in running if not seq.in_prefill]
        schedule_decodes(self._decode_order(decodes), running[::-1], blocks, self._decode_cap(len(decodes)))
        budget = self.token_budget - len(plan.decodes)
        target = budget // self.tile_quantum * self.tile_quantum or budget
        if target <= 0:
            return plan
        left = continue_prefills(running, blocks, target)
        if not plan.preempt:
            admit_prefills(waiting, blocks, left, self.max_running - len(running))
        self._align(plan)
        return plan

    def _decode_cap(self, num_decodes: int) -> int:
        cap = min(num_decodes, self.max_decodes)
        if self.decode_tile is not None and cap >= self.decode_tile:
            cap = cap // self.decode_tile * self.decode_tile
        return cap

    def _decode_order(self, decodes: list[SequenceState]) -> list[SequenceState]:
        """Oldest first; with ``decode_tile``, longest since the last token first (no token yet counts as longest)."""
        if self.decode_tile is None:
            return decodes
        return sorted(decodes, key=lambda seq: (seq.last_token_time is not None, seq.last_token_time or 0.0))

    def _align(self, plan: BatchPlan) -> None:
        """Cut the last prefill chunks back to a multiple of ``tile_quantum`` (totals below one quantum stay)."""
        total = sum(tokens for _, tokens in plan.prefill_chunks)
        excess = total % self.tile_quantum if total >= self.tile_quantum else 0
        while excess > 0:
            request_id, tokens = plan.prefill_chunks.pop()
            if tokens > excess:
                plan.prefill_chunks.append((request_id, tokens - excess))
            excess -= min(tokens, excess)
