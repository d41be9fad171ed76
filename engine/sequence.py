"""One request inside an engine: its tokens, KV blocks, progress and stop conditions.

Token positions: the prompt occupies positions ``0 .. prompt_len - 1``, output token ``k`` position
``prompt_len + k``. ``num_computed`` positions (a prefix) have KV in the pool. While ``num_computed < prompt_len``
the sequence is in prefill; afterwards each iteration computes the KV of the newest token (position
``num_computed``, which is then ``num_tokens - 1``) and samples the next.

Reservation rule: a sequence's blocks are taken once, at admission, and cover every position it can ever need
(``blocks_to_reserve``), so a running sequence never asks for another block and no one is ever preempted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from diptych.cluster.blocks import blocks_for
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
"""``max_tokens`` generated or ``max_model_len`` reached."""


def blocks_to_reserve(prompt_len: int, max_tokens: int, block_size: int, prefill_only: bool = False) -> int:
    """Blocks a request takes at admission (the reservation rule): ``blocks_for(prompt_len + max_tokens)``, or
    only ``blocks_for(prompt_len)`` for a prefill-only request (its decode runs elsewhere)."""
    return blocks_for(prompt_len if prefill_only else prompt_len + max_tokens, block_size)


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

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return self.prompt_len + len(self.output_token_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    def blocks_to_admit(self, block_size: int) -> int:
        return blocks_to_reserve(self.prompt_len, self.sampling.max_tokens, block_size, self.prefill_only)

    def next_chunk(self, num_tokens: int) -> tuple[list[int], int]:
        """The next ``num_tokens`` prompt tokens to prefill and the position of the first."""
        start = self.num_computed
        if num_tokens <= 0 or start + num_tokens > self.prompt_len:
            raise ValueError(
                f"request {self.request_id}: prefill chunk of {num_tokens} tokens at {start} "
                f"exceeds its prompt of {self.prompt_len}"
            )
        return self.prompt_token_ids[start : start + num_tokens], start

    def decode_input(self) -> tuple[list[int], int]:
        """The newest token (whose KV is not computed yet) and its position."""
        computed = self.num_computed
        if computed < len(self.prompt_token_ids) or computed != len(self.prompt_token_ids) + len(
                self.output_token_ids) - 1:
            raise ValueError(f"request {self.request_id} is not ready to decode")
        return [self.output_token_ids[-1]], self.num_computed

    def append_token(self, token_id: int, now: float, eos_token_ids: set[int], max_model_len: int) -> str | None:
        """Record sampled output token; returns (and stores) the finish reason, or None if it keeps going."""
        self.output_token_ids.append(token_id)
        self.last_token_time = now
        self.finish_reason = self._stop_reason(token_id, eos_token_ids, max_model_len)
        return self.finish_reason

    def _stop_reason(self, token_id: int, eos_token_ids: set[int], max_model_len: int) -> str | None:
        if not self.sampling.ignore_eos and token_id in eos_token_ids:
            return FINISH_STOP
        if token_id in self.sampling.stop_token_ids:
            return FINISH_STOP
        num_output = len(self.output_token_ids)
        if num_output >= self.sampling.max_tokens or len(self.prompt_token_ids) + num_output >= max_model_len:
            return FINISH_LENGTH
        return None

    def to_state(self, block_size: int) -> SequenceState:
        """What the batch policy sees. Under the reservation rule a running sequence needs no more blocks
        (``blocks_to_step == 0``)."""
        prompt_len = len(self.prompt_token_ids)
        slo = self.slo
        return SequenceState(
            request_id=self.request_id, arrival_time=self.arrival_time, prompt_len=prompt_len,
            num_computed=min(self.num_computed, prompt_len), num_output=len(self.output_token_ids),
            blocks_to_admit=self.blocks_to_admit(block_size) if self.status is SequenceStatus.WAITING else 0,
            blocks_to_step=0, blocks_held=len(self.block_table), last_token_time=self.last_token_time,
            tbt_slo_s=slo.tbt_s, ttft_slo_s=slo.ttft_s, tier=slo.tier,
        )
