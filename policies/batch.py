"""Worker batch composition: which prefill chunks and which decodes run in the next iteration.

A worker (prefill-only, decode-only or colocated) keeps its sequences and KV pool; each iteration it calls
``policy.schedule(waiting, running, kv, now)`` and executes the returned ``BatchPlan``, then reports the iteration's
wall time with ``policy.on_iteration_end``. The policy speaks request ids and token counts only.

Units: times in seconds, lengths in tokens, memory in KV blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from diptych.policies.knobs import Knob
from diptych.policies.kv_planner import KVPlanner
from diptych.policies.registry import Registry


@dataclass
class SequenceState:
    """What a batch policy may know of one sequence.

    ``num_computed`` positions already have KV in the pool; the sequence is in prefill while
    ``num_computed < prefill_len``, where ``prefill_len = prompt_len + recompute_tokens``: a sequence preempted by
    recompute prefills its prompt and the ``recompute_tokens`` output tokens it had produced, then samples its next
    token. ``blocks_to_admit`` is how many free blocks admitting a waiting sequence takes (``engine.kv_rules``);
    ``blocks_to_step`` is how many more a running decode's next token takes (0 or 1: blocks are allocated as
    positions are computed). ``preemptible`` is False for a sequence the worker must not preempt (a prefill-only
    prompt whose KV may be streaming to a decode worker).
    ``last_token_time`` is when the iteration that produced its latest token ended (None before the first).
    ``blocks_held`` is how many KV blocks a running sequence holds now (what preempting it frees; a policy never
    preempts a sequence that holds none). ``tbt_slo_s`` / ``ttft_slo_s`` are its latency targets (None: the policy's
    default).
    """

    request_id: str
    arrival_time: float
    prompt_len: int
    num_computed: int = 0
    num_output: int = 0
    blocks_to_admit: int = 0
    blocks_to_step: int = 0
    last_token_time: float | None = None
    tbt_slo_s: float | None = None
    ttft_slo_s: float | None = None
    tier: str = "default"
    blocks_held: int = 0
    recompute_tokens: int = 0
    preemptible: bool = True

    @property
    def prefill_len(self) -> int:
        """Positions computed before the next token is sampled: the prompt, plus the outputs being recomputed."""
        return self.prompt_len + self.recompute_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prefill_len

    @property
    def remaining_prompt(self) -> int:
        """Positions left to prefill (prompt and recomputed outputs)."""
        return self.prefill_len - self.num_computed


@dataclass
class KVState:
    """The worker's KV pool as a policy sees it: ``free_blocks`` of ``total_blocks`` (utilisation counts blocks in
    use), and ``watermark_blocks`` that admitting new sequences must leave free (running decodes may use them)."""

    free_blocks: int
    total_blocks: int
    block_size: int
    watermark_blocks: int = 0

    @property
    def utilization(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 1.0


@dataclass
class BatchPlan:
    """One iteration. ``prefill_chunks`` are (request_id, tokens) in execution order: a waiting request listed here
    is admitted (its ``blocks_to_admit`` are allocated) and its first chunk runs. ``decodes`` each produce one token
    (taking their ``blocks_to_step``). ``preempt`` lists running requests whose KV is dropped so they recompute
    later; the engine applies preemptions first, so their blocks serve this iteration's decodes."""

    prefill_chunks: list[tuple[str, int]] = field(default_factory=list)
    decodes: list[str] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill_chunks) + len(self.decodes)

    def is_empty(self) -> bool:
        return not self.prefill_chunks and not self.decodes


class BatchPolicy(ABC):
    name: str = ""
    knobs: ClassVar[tuple[Knob, ...]] = ()
    """The constructor's keyword arguments (``policies.knobs``)."""

    @abstractmethod
    def schedule(
        self, waiting: Sequence[SequenceState], running: Sequence[SequenceState], kv: KVState, now: float
    ) -> BatchPlan:
        """Compose the next iteration. ``waiting`` hold no KV yet (arrival order); ``running`` hold KV (admission
        order, oldest first)."""

    def on_iteration_end(self, duration_s: float, now: float) -> None:  # noqa: B027 (an optional hook: no-op by default)
        """The iteration just executed took ``duration_s`` wall seconds and ended at ``now``."""

    def order_handoffs(self, pending: Sequence[SequenceState], now: float) -> list[str]:
        """The order in which a decode worker admits incoming KV handoffs (``pending``, in the order they reached
        the worker), most urgent first. Default: FIFO."""
        return [seq.request_id for seq in pending]


BATCH_POLICIES: Registry[BatchPolicy] = Registry("batch")


@BATCH_POLICIES.register("sarathi")
class SarathiBatching(BatchPolicy):
    """Sarathi-Serve stall-free batching: every running decode joins (never limited by the budget), then partial
    prefills continue FIFO, then waiting requests are admitted FCFS, their prompts chunked to fill
    ``token_budget``. Admission stops at the first request whose blocks do not fit (head of line).

    KV pressure (vLLM's rule, which Sarathi-Serve inherits): a decode whose next token needs a block when none is
    free preempts the most recently admitted running sequence (recompute), down to itself; no new request is admitted
    in an iteration that preempted. So a running decode is never silently stalled: it decodes or is preempted.
    A prompt's KV is taken whole at admission (``blocks_to_admit``, leaving the watermark free); later chunks take no
    blocks; each decode takes a block when its position starts one.

    Knobs: ``token_budget`` (tokens per iteration, prefill chunks plus decodes; 512 under strict SLOs, 2048
    relaxed), ``max_running`` (sequences holding KV, 128), ``max_decodes`` (decodes per iteration, 128)."""

    summary = "Sarathi-Serve: every decode each iteration, prompts chunked FCFS into the token budget"
    knobs = (
        Knob("token_budget", int, 512, "tokens per iteration, prefill chunks plus decodes"),
        Knob("max_running", int, 128, "sequences holding KV at once"),
        Knob("max_decodes", int, 128, "decodes per iteration"),
    )

    def __init__(self, token_budget: int = 512, max_running: int = 128, max_decodes: int = 128) -> None:
        if token_budget <= 0 or max_running <= 0 or max_decodes <= 0:
            raise ValueError("token_budget, max_running and max_decodes must be positive")
        self.token_budget = token_budget
        self.max_running = max_running
        self.max_decodes = max_decodes

    def schedule(
        self, waiting: Sequence[SequenceState], running: Sequence[SequenceState], kv: KVState, now: float
    ) -> BatchPlan:
        plan = BatchPlan()
        blocks = KVPlanner(kv, plan)
        schedule_all_decodes(running, blocks, self.max_decodes)
        budget = continue_prefills(running, blocks, self.token_budget - len(plan.decodes))
        if not plan.preempt:
            admit_prefills(waiting, blocks, budget, self.max_running - len(running))
        return plan


def schedule_all_decodes(running: Sequence[SequenceState], blocks: KVPlanner, max_decodes: int) -> None:
    """Every running decode, oldest first, up to ``max_decodes``; out of blocks, the most recently admitted running
    sequence is preempted (possibly the decode itself)."""
    decodes = [seq for seq in running if not seq.in_prefill]
    schedule_decodes(decodes, running[::-1], blocks, max_decodes)


def schedule_decodes(decodes: Sequence[SequenceState], victims: Sequence[SequenceState], blocks: KVPlanner,
                     max_decodes: int) -> None:
    """``decodes`` in order, until the plan holds ``max_decodes``; each preempts ``victims`` in order if its block
    does not fit (see ``KVPlanner.step_or_preempt``)."""
    for seq in decodes:
        if len(blocks.plan.decodes) >= max_decodes:
            return
        if not blocks.is_decided(seq):
            blocks.step_or_preempt(seq, victims)


def continue_prefills(running: Sequence[SequenceState], blocks: KVPlanner, budget: int) -> int:
    """Next chunks of the running partial prefills, FIFO, each ``min(remaining prompt, budget left)``, skipping
    those preempted in this plan. Returns the budget left."""
    for seq in running:
        if budget <= 0:
            break
        if seq.in_prefill and not blocks.is_decided(seq):
            chunk = min(seq.remaining_prompt, budget)
            blocks.plan.prefill_chunks.append((seq.request_id, chunk))
            blocks.mark_scheduled(seq)
            budget -= chunk
    return budget


def admit_prefills(candidates: Sequence[SequenceState], blocks: KVPlanner, budget: int, slots: int) -> int:
    """Admit ``candidates`` in order, each with a first chunk of ``min(prompt, budget left)``, until the budget or
    the ``slots`` (sequences that may still take KV) run out or one's blocks do not fit (head of line: no skipping).
    Returns the budget left."""
    for seq in candidates:
        if budget <= 0 or slots <= 0 or not blocks.admit(seq):
            break
        chunk = min(seq.remaining_prompt, budget)
        blocks.plan.prefill_chunks.append((seq.request_id, chunk))
        budget -= chunk
        slots -= 1
    return budget
