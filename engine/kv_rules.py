"""KV memory on demand: the allocation, watermark and capacity rules every engine applies (no torch).

The model engine (``engine.scheduler``), the sim engine (the same scheduler) and the discrete-event simulator's
workers (``sim.worker``) all take their block counts from here, so the three allocate and preempt alike.

- **Admission** takes the blocks of the positions a sequence prefills before it samples (``blocks_to_admit``): its
  prompt, or, for a sequence recomputing after a preemption, its prompt plus the output tokens it had produced.
  The whole prefill is taken at once (later chunks take no blocks): the prompt's KV is needed in full before the
  first token anyway, and partial prefills holding part of their blocks could starve each other.
- **Growth**: each decode computes the KV of one more position; it takes a block when that position starts a new
  one (``blocks_to_step``). ``max_tokens`` is never read here: it only stops generation.
- **Watermark**: admission (and a decode worker's handoff reservation) leaves ``watermark_blocks`` free for the
  running sequences to grow into, so a burst of admissions does not force immediate preemptions. It applies only
  while some sequence runs (``admission_watermark``): with none running there is nothing to protect, and a
  preempted sequence that needs nearly the whole pool can always come back.
- **Capacity**: a sequence never grows past ``max_positions`` = ``min(max_model_len, pool tokens)`` positions; one
  that reaches it finishes with reason ``length``, so a sequence alone always fits its pool.

Units: positions and tokens are tokens, everything else is KV blocks.
"""

from __future__ import annotations

from diptych.cluster.blocks import blocks_for
from diptych.policies.batch import KVState

DEFAULT_WATERMARK_FRACTION = 0.01
"""Fraction of the pool kept free at admission while sequences run (vLLM's default)."""


def watermark_blocks(fraction: float, num_blocks: int) -> int:
    """The watermark in blocks: ``floor(fraction * num_blocks)``. ``ValueError`` outside ``[0, 1)``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the KV watermark must be a fraction in [0, 1), got {fraction}")
    return int(fraction * num_blocks)


def admission_watermark(watermark: int, num_running: int) -> int:
    """The blocks admission must leave free: ``watermark`` while ``num_running > 0``, else 0."""
    return watermark if num_running > 0 else 0


def blocks_to_admit(prefill_len: int, block_size: int) -> int:
    """Blocks a waiting sequence takes when admitted: those of the ``prefill_len`` positions it prefills."""
    return blocks_for(prefill_len, block_size)


def blocks_to_step(num_computed: int, blocks_held: int, block_size: int) -> int:
    """Blocks a decode takes to compute position ``num_computed`` (0 or 1): ``blocks_for(num_computed + 1)``
    less the ``blocks_held``."""
    return max(0, blocks_for(num_computed + 1, block_size) - blocks_held)


def max_positions(max_model_len: int, num_blocks: int, block_size: int) -> int:
    """The most positions a sequence may reach in this pool: ``min(max_model_len, num_blocks * block_size)``."""
    return min(max_model_len, num_blocks * block_size)


def kv_state(free_blocks: int, total_blocks: int, block_size: int, watermark: int, num_running: int) -> KVState:
    """What a batch policy sees of the pool: free blocks (utilisation counts blocks in use, not outputs that may
    come) and the watermark admission must respect."""
    return KVState(free_blocks=free_blocks, total_blocks=total_blocks, block_size=block_size,
                   watermark_blocks=admission_watermark(watermark, num_running))
