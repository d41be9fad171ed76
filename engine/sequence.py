"""One request inside an engine: its tokens, KV blocks, progress and stop conditions.

Token positions: the prompt occupies positions ``0 .. prompt_len - 1``, output token ``k`` position
``prompt_len + k``. ``num_computed`` positions (a prefix) have KV in the pool. While ``num_computed < prefill_len``
the sequence is in prefill; afterwards each iteration computes the KV of the newest token (position
``num_computed``, which is then ``num_tokens - 1``) and samples the next.

KV on demand (``engine.kv_rules``): admission takes the blocks of the ``prefill_len`` positions, each decode a
block when its position starts one. Preemption by recompute (``preempt``) drops every block and keeps every token:
the sequence waits again with ``recompute_tokens = len(output_token_ids)``, so ``prefill_len`` covers the prompt and
all its outputs; the prefill that recomputes them samples the next output token (index ``len(output_token_ids)``),
so the stream to the client continues without a lost or repeated token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from diptych.engine import kv_rules
from diptych.policies.batch import SequenceState
from diptych.proto.messages import SLO, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Admitted to the engine, no KV blocks yet."""
    RUNNING = "running"
    """Holds its blocks; in prefill or decoding."""
    PREFILLED = "prefilled"
    """A ``prefill_only`` sequence whose prompt KV is complete and first token sampled; holds its blocks until
    exported and released."""
    FINISHED = "finished"


FINISH_STOP = "stop"
"""EOS or a stop token id."""
FINISH_LENGTH = "length"
"""``max_tokens`` (or ``stop_after_tokens``) generated, or the most positions the engine allows
(``kv_rules.max_positions``: the context length, or the whole KV pool) reached."""


@dataclass
class Sequence:
    """A request's state in one engine. ``block_table`` lists the blocks holding its positions, in order."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    slo: SLO = field(default_factory=SLO)
    prefill_only: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    last_token_time: float | None = None
    recompute_tokens: int = 0
    """Output tokens whose KV is being recomputed after a preemption (0 otherwise); reset when the next token is
    sampled."""
    preempted_times: list[float] = field(default_factory=list)
    """When this sequence was preempted (seconds since the epoch), in order."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return self.prompt_len + len(self.output_token_ids)

    @property
    def prefill_len(self) -> int:
        """Positions computed before the next token is sampled: the prompt, plus outputs being recomputed."""
        return len(self.prompt_token_ids) + self.recompute_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prefill_len

    def blocks_to_admit(self, block_size: int) -> int:
        return kv_rules.blocks_to_admit(self.prefill_len, block_size)

    def blocks_to_step(self, block_size: int) -> int:
        """Blocks the next decode takes (0 or 1); 0 while in prefill (admission took the prefill's blocks)."""
        if self.in_prefill:
            return 0
        return kv_rules.blocks_to_step(self.num_computed, len(self.block_table), block_size)

    def next_chunk(self, num_tokens: int) -> tuple[list[int], int]:
        """The next ``num_tokens`` tokens to prefill (prompt, then outputs being recomputed) and the position of
        the first."""
        start = self.num_computed
        if num_tokens <= 0 or start + num_tokens > self.prefill_len:
            raise ValueError(
                f"request {self.request_id}: prefill chunk of {num_tokens} tokens at {start} "
                f"exceeds its prefill of {self.prefill_len}"
            )
        prompt_len = len(self.prompt_token_ids)
        end = start + num_tokens
        if end <= prompt_len:
            return self.prompt_token_ids[start:end], start
        tokens = self.prompt_token_ids + self.output_token_ids[: end - prompt_len]
        return tokens[start:end], start

    def preempt(self, now: float) -> None:
        """Drop the KV (the caller frees ``block_table``) and wait to recompute prompt and outputs."""
        self.recompute_tokens = len(self.output_token_ids)
        self.num_computed = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
        self.preempted_times.append(now)

    def decode_input(self) -> tuple[list[int], int]:
        """The newest token (whose KV is not computed yet) and its position."""
        computed = self.num_computed
        if computed < len(self.prompt_token_ids) or computed != len(self.prompt_token_ids) + len(
                self.output_token_ids) - 1:
            raise ValueError(f"request {self.request_id} is not ready to decode")
        return [self.output_token_ids[-1]], self.num_computed

    def append_token(self, token_id: int, now: float, eos_token_ids: set[int], max_positions: int) -> str | None:
        """Record sampled output token; returns (and stores) the finish reason, or None if it keeps going.
        ``max_positions``: the most positions the sequence may reach (``kv_rules.max_positions``)."""
        self.output_token_ids.append(token_id)
        self.last_token_time = now
        self.recompute_tokens = 0
        self.finish_reason = self._stop_reason(token_id, eos_token_ids, max_positions)
        return self.finish_reason

    def _stop_reason(self, token_id: int, eos_token_ids: set[int], max_positions: int) -> str | None:
        sampling = self.sampling
        if not sampling.ignore_eos and token_id in eos_token_ids:
            return FINISH_STOP
        if token_id in sampling.stop_token_ids:
            return FINISH_STOP
        num_output = len(self.output_token_ids)
        limit = sampling.max_tokens if sampling.stop_after_tokens is None else min(sampling.max_tokens,
                                                                                   sampling.stop_after_tokens)
        if num_output >= limit or len(self.prompt_token_ids) + num_output >= max_positions:
            return FINISH_LENGTH
        return None

    def to_state(self, block_size: int) -> SequenceState:
        """What the batch policy sees: the blocks admission takes (waiting), the blocks the next decode takes
        (running), and whether it may be preempted (not a prefill-only prompt, whose KV may be streaming out)."""
        slo = self.slo
        waiting = self.status is SequenceStatus.WAITING
        return SequenceState(
            request_id=self.request_id, arrival_time=self.arrival_time, prompt_len=len(self.prompt_token_ids),
            num_computed=min(self.num_computed, self.prefill_len), num_output=len(self.output_token_ids),
            blocks_to_admit=self.blocks_to_admit(block_size) if waiting else 0,
            blocks_to_step=0 if waiting else self.blocks_to_step(block_size), blocks_held=len(self.block_table),
            last_token_time=self.last_token_time, tbt_slo_s=slo.tbt_s, ttft_slo_s=slo.ttft_s, tier=slo.tier,
            recompute_tokens=self.recompute_tokens, preemptible=not self.prefill_only,
        )
