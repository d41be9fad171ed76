"""Builders of ``SequenceState`` and ``KVState`` for batch policy tests (lengths in tokens, times in seconds)."""

from __future__ import annotations

from diptych.policies.batch import KVState, SequenceState


def decode(rid: str, t_end: float | None = 0.0, tbt: float | None = None, arrival: float = 0.0,
           blocks_to_step: int = 0, blocks_held: int = 1) -> SequenceState:
    """A running sequence past its prompt whose latest token came out at ``t_end``."""
    return SequenceState(rid, arrival, prompt_len=16, num_computed=16, num_output=1, blocks_to_step=blocks_to_step,
                         last_token_time=t_end, tbt_slo_s=tbt, blocks_held=blocks_held)


def partial(rid: str, prompt: int = 1000, computed: int = 100, arrival: float = 0.0,
            blocks_held: int = 1) -> SequenceState:
    """A running sequence part-way through its prompt (its prompt's blocks are held)."""
    return SequenceState(rid, arrival, prompt_len=prompt, num_computed=computed, blocks_held=blocks_held)


def waiting(rid: str, prompt: int = 100, arrival: float = 0.0, blocks: int = 1,
            tbt: float | None = None) -> SequenceState:
    """A sequence not admitted yet; admitting it takes ``blocks`` free blocks."""
    return SequenceState(rid, arrival, prompt_len=prompt, blocks_to_admit=blocks, tbt_slo_s=tbt)


def kv(free: int = 1000, total: int = 2000) -> KVState:
    return KVState(free_blocks=free, total_blocks=total, block_size=16)
