"""Stationary decode stretches (``sim.worker``): ``k`` consecutive pure-decode iterations of the same sequences run
as one event, the i-th (from 0) taking ``a + b*i`` seconds. Here: how many iterations ended by a time, the blocks
the sequences grow into over ``k`` iterations (``engine.kv_rules.blocks_to_step`` at the last position each
computes), and the longest stretch whose growth fits in the free blocks.

Units: seconds, KV blocks; a sequence's ``num_computed`` is the position its next decode computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from diptych.cluster.blocks import blocks_for
from diptych.engine import kv_rules
from diptych.engine.block_pool import BlockCounter
from diptych.policies.batch import SequenceState


def completed_iterations(a: float, b: float, iterations: int, elapsed: float) -> int:
    """Iterations of a stretch of ``iterations`` that ended ``elapsed`` seconds after it started: the largest ``j``
    with ``j*a + b*j*(j-1)/2 <= elapsed``."""
    if elapsed <= 0:
        return 0
    if b <= 0:
        j = int(elapsed / a) if a > 0 else iterations
    else:
        half = b / 2
        j = int((-(a - half) + math.sqrt((a - half) ** 2 + 4 * half * elapsed)) / (2 * half))
    j = max(0, min(j, iterations))
    while j > 0 and j * a + b * j * (j - 1) / 2 > elapsed + 1e-12:
        j -= 1
    while j < iterations and (j + 1) * a + b * (j + 1) * j / 2 <= elapsed + 1e-12:
        j += 1
    return j


def growth(seqs: Sequence[SequenceState], k: int, block_size: int) -> int:
    """Blocks that ``k`` more decodes of each of ``seqs`` take (the last computes position ``num_computed + k - 1``).
    """
    step = kv_rules.blocks_to_step
    return sum(step(seq.num_computed + k - 1, seq.blocks_held, block_size) for seq in seqs)


def feasible_iterations(seqs: Sequence[SequenceState], most: int, free: int, block_size: int) -> int:
    """The largest ``k <= most`` whose ``growth`` fits in ``free`` blocks (0 when not even one iteration fits)."""
    # k positions more take at most blocks_for(k) blocks per sequence: enough room needs no exact count
    if len(seqs) * blocks_for(most, block_size) <= free or growth(seqs, most, block_size) <= free:
        return most
    lo, hi = 0, most - 1  # the answer is in [lo, hi]; growth is monotone in k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if growth(seqs, mid, block_size) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def take_blocks(seqs: Sequence[SequenceState], k: int, blocks: BlockCounter, block_size: int) -> None:
    """Allocate from ``blocks`` what ``k`` decodes of each of ``seqs`` grow into (``blocks_held`` grows; their
    ``num_computed`` is left to the caller)."""
    step = kv_rules.blocks_to_step
    for seq in seqs:
        more = step(seq.num_computed + k - 1, seq.blocks_held, block_size)
        if more:
            seq.blocks_held += blocks.allocate(more)
