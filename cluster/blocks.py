"""KV block rounding: the one place that turns a token count into a number of KV blocks."""

from __future__ import annotations


def blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks of ``block_size`` tokens that hold ``tokens`` positions: ``ceil(tokens / block_size)``; 0 for 0."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return -(-tokens // block_size)
