"""KV block accounting without storage: who holds which blocks of a worker's pool (no torch).

``BlockAllocator`` hands out real block ids (the model engine writes KV into them; the sim engine keeps the ids so a
handoff names blocks as on a GPU). ``BlockCounter`` counts blocks only, for the discrete-event simulator, which
never names a block (its handle of ``n`` blocks is the int ``n``). Both satisfy ``Blocks``: ``num_blocks``,
``num_free``, ``allocate(n)`` and ``free(held)``, where ``held`` is what ``allocate`` returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

Held = TypeVar("Held")


class OutOfBlocksError(RuntimeError):
    """An allocation asked for more blocks than are free."""


class Blocks(Protocol[Held]):
    """A pool of ``num_blocks`` KV blocks, ``num_free`` of them free. ``allocate(n)`` takes ``n`` (all or none,
    ``OutOfBlocksError`` when fewer are free) and returns what ``free`` later gives back."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    def allocate(self, n: int) -> Held: ...

    def free(self, held: Held) -> None: ...


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks - 1``. Invariant: every id is either free or allocated, never both;
    freeing a block that is not allocated raises ``ValueError`` (double free or foreign id)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; raises ``OutOfBlocksError`` (taking none) when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, only {len(self._free)} of {self.num_blocks} are free")
        taken = [self._free.pop() for _ in range(n)]
        self._allocated.update(taken)
        return taken

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the free list. Raises ``ValueError`` (freeing none) if any id is not allocated or
        repeats."""
        ids = list(block_ids)
        if len(set(ids)) != len(ids) or not self._allocated.issuperset(ids):
            bad = sorted(set(i for i in ids if i not in self._allocated or ids.count(i) > 1))
            raise ValueError(f"double free or unknown KV blocks: {bad}")
        self._allocated.difference_update(ids)
        self._free.extend(reversed(ids))


class BlockCounter:
    """Count-only pool: ``allocate(n)`` returns ``n`` and ``free(n)`` gives ``n`` blocks back. Invariant:
    ``0 <= num_free <= num_blocks``; freeing more than is allocated raises ``ValueError``."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.num_free = num_blocks

    def allocate(self, n: int) -> int:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} KV blocks, only {self.num_free} of {self.num_blocks} are free")
        self.num_free -= n
        return n

    def free(self, n: int) -> None:
        if n < 0 or self.num_free + n > self.num_blocks:
            raise ValueError(f"freeing {n} KV blocks with {self.num_blocks - self.num_free} allocated")
        self.num_free += n
