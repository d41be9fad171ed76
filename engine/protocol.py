"""What a worker may call on its engine: ``WorkerEngine``, satisfied by ``Engine`` (a model) and ``SimEngine`` (the
cost model's timing, placeholder tokens).

Workers (``services.worker``, the entry points ``services.prefill_worker`` and ``services.decode_worker``) and the KV
sender use nothing else. Threads: every member is called from one thread at a time (the worker's engine thread runs
``step``; its loop thread calls the rest between iterations), except ``reserve`` and ``reserved_blocks``, which may
run while ``step`` runs on another thread.

Units: blocks are KV blocks of ``layout.block_size`` tokens; times are seconds since the epoch.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from diptych.engine.outputs import StepOutput
from diptych.proto.messages import SLO, KVLayout, SamplingParams, WorkerLoad


class BlockCounter(Protocol):
    """The engine's block allocator, as far as a worker reads it."""

    @property
    def num_free(self) -> int:
        """Blocks free now."""


class KVPoolView(Protocol):
    """The engine's KV pool, as far as a worker reads it. A pool whose blocks are tensors (``KVCachePool``) also has
    ``pool``, the block tensor; workers look for it with ``getattr`` to choose GPU-to-GPU handoff paths, and hand
    such a pool to ``engine.kv_transfer``."""

    @property
    def allocator(self) -> BlockCounter:
        """Its block allocator."""


@runtime_checkable
class WorkerEngine(Protocol):
    """The engine of one worker process: requests in, one batched iteration per ``step``, tokens out.

    Lifecycle of a request id: ``add_request`` -> ``step`` admits and runs it -> finished; with ``prefill_only``,
    prefilled -> ``export_kv`` (or a GPU-to-GPU push reading ``computed_blocks``) -> ``release``. On a decode worker:
    ``reserve`` -> ``add_prefilled`` -> finished. ``abort`` ends a request in any state.
    """

    @property
    def model_name(self) -> str:
        """The model served (sent at registration; every worker of a cluster must serve the same one)."""

    @property
    def layout(self) -> KVLayout:
        """Shape of one KV block; a handoff is accepted only between equal layouts."""

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output, in tokens."""

    @property
    def kv(self) -> KVPoolView:
        """Its KV pool."""

    # ------------------------------------------------------------------ requests in

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, *,
                    arrival_time: float | None = None, slo: SLO | None = None, prefill_only: bool = False) -> None:
        """Queue a request. With ``prefill_only`` it stops after its prefill and first token, its blocks kept for
        the handoff. ``ValueError`` for a request that cannot run here (bad, too long, duplicate id)."""

    def reserve(self, request_id: str, num_blocks: int) -> bool:
        """Hold ``num_blocks`` blocks for KV that will arrive by ``add_prefilled``; False (holding nothing) when
        fewer are free. Safe while ``step`` runs."""

    def reserved_blocks(self, request_id: str) -> list[int]:
        """The block ids reserved for ``request_id``; ``KeyError`` if none. Safe while ``step`` runs."""

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                      sampling: SamplingParams, frames: list[Any] | None, num_tokens: int, *,
                      arrival_time: float | None = None, slo: SLO | None = None,
                      first_token_time: float | None = None) -> None:
        """Start decoding a handed-off request in its reserved blocks: ``frames`` (one buffer per block covering
        ``num_tokens`` prompt positions) are written into them, or ``None`` when the KV is already there (GPU to
        GPU). ``KeyError`` without a reservation; ``ValueError`` (reservation kept) for a handoff that does not
        fit."""

    # ------------------------------------------------------------------ KV out, cancellation

    def computed_blocks(self, request_id: str) -> tuple[list[int], int]:
        """``(block_table, num_computed)`` of a running or prefilled request (positions with KV); ``KeyError``
        otherwise."""

    def export_kv(self, request_id: str) -> list[Any]:
        """The prompt KV of a prefilled request, one buffer per block, valid after ``release``. ``KeyError`` if it
        is not prefilled here."""

    def release(self, request_id: str) -> bool:
        """Free a prefilled request's blocks once its KV is handed off; False if it is not prefilled here."""

    def abort(self, request_id: str) -> bool:
        """End the request wherever it is and free its blocks; False if the engine does not hold it."""

    def take_reservation(self, request_id: str) -> list[int] | None:
        """End a reservation without freeing its blocks (a peer may still write into them); the caller gives them
        back with ``free_blocks``. None if there is no reservation."""

    def free_blocks(self, block_ids: list[int]) -> None:
        """Return blocks taken with ``take_reservation`` to the pool."""

    # ------------------------------------------------------------------ iterations

    def request_ids(self) -> list[str]:
        """Every request id held: waiting, running, prefilled or reserved."""

    def has_work(self) -> bool:
        """True while a request needs iterations."""

    def step(self) -> StepOutput:
        """Run one iteration (runs on the worker's engine thread)."""

    def load(self) -> WorkerLoad:
        """The engine's part of the worker's heartbeat (``prefill_tps`` and ``handoffs`` are the worker's)."""
