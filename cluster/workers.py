"""The cluster's workers as the core sees them: role, pool, liveness, and what the coordinator has placed on each.

Accounting invariants (blocks are KV blocks of the worker's own pool, tokens are prompt tokens):
- ``reserved_blocks`` is the sum of the expected footprints (``cluster.placement``) of the requests placed on the
  worker to decode (or colocated) and not yet released; placement never adds more than ``total_blocks -
  reserved_blocks - backlog_blocks``. It is an account, not memory: the engine allocates on demand, a request may
  outgrow its footprint (the engine then preempts), and ``total_blocks - free_blocks`` as the worker reports it may
  be above or below it;
- ``backlog_tokens``/``backlog_blocks`` cover the prompts placed on the worker to prefill whose prefill has not
  ended (a colocated placement adds tokens only: its footprint covers the prompt's blocks);
- ``decode_requests``/``prefill_requests`` count the placements whose reservation / backlog still counts here;
- ``refused_reservations`` counts the handoff reservations the worker's engine refused (no free blocks at the time,
  each retried by the driver) since it registered.
"""

from __future__ import annotations

from dataclasses import dataclass

from diptych.cluster.blocks import blocks_for
from diptych.proto.roles import Pool, WorkerRole


@dataclass(eq=False)
class WorkerState:
    worker_id: str
    role: WorkerRole
    pool: Pool
    """The pool the worker serves: its role, or for a movable worker the one the pool policy assigned."""
    total_blocks: int
    block_size: int
    """Tokens per KV block."""
    last_heartbeat: float = 0.0
    """Seconds (the driver's clock)."""
    draining_to: Pool | None = None
    """A worker being moved: it takes no new work until its old pool's work is done, then joins this pool."""
    reserved_blocks: int = 0
    backlog_tokens: int = 0
    backlog_blocks: int = 0
    decode_requests: int = 0
    prefill_requests: int = 0
    refused_reservations: int = 0

    @property
    def unreserved_blocks(self) -> int:
        """Blocks neither accounted to decodes (expected footprints) nor held by queued prefills."""
        return self.total_blocks - self.reserved_blocks - self.backlog_blocks

    @property
    def accepting(self) -> Pool | None:
        """The pool this worker takes new work for, or None while it drains."""
        return None if self.draining_to is not None else self.pool

    @property
    def outstanding(self) -> int:
        """Work the worker still holds for its current pool (prompt tokens queued, or decode blocks reserved)."""
        return self.backlog_tokens if self.pool == Pool.PREFILL else self.reserved_blocks

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)


class WorkerRegistry:
    """Registered workers by id, in registration order. The first worker fixes the cluster's model and KV layout
    (compared by equality); later ones must match, so any prefill worker can hand KV to any decode worker."""

    def __init__(self, heartbeat_timeout_s: float = float("inf")) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: dict[str, WorkerState] = {}
        self.model: str | None = None
        self.layout: object | None = None
        self.colocated_workers = 0
        """Registered workers of role ``colocated``."""

    def register(self, worker_id: str, role: str, total_blocks: int, block_size: int, now: float,
                 model: str = "", layout: object | None = None) -> str | None:
        """Add the worker; returns an error string (and changes nothing) if it cannot join. A ``flex`` worker starts
        in the smaller of the prefill and decode pools (prefill on a tie)."""
        try:
            worker_role = WorkerRole(role)
        except ValueError:
            return f"unknown role {role!r}; expected one of {tuple(r.value for r in WorkerRole)}"
        if self.model is not None and model != self.model:
            return f"model {model!r} does not match the cluster's {self.model!r}"
        if self.layout is not None and layout != self.layout:
            return f"KV layout {layout} does not match the cluster's {self.layout}"
        if worker_id in self.workers:
            return f"worker id {worker_id!r} is already registered"
        self.model, self.layout = model, layout
        pool = self._smaller_pool() if worker_role is WorkerRole.FLEX else Pool(worker_role.value)
        self.workers[worker_id] = WorkerState(worker_id, worker_role, pool, total_blocks, block_size,
                                              last_heartbeat=now)
        self.colocated_workers += worker_role is WorkerRole.COLOCATED
        return None

    def _smaller_pool(self) -> Pool:
        prefill, decode = len(self.in_pool(Pool.PREFILL)), len(self.in_pool(Pool.DECODE))
        return Pool.PREFILL if prefill <= decode else Pool.DECODE

    def heartbeat(self, worker_id: str, now: float, total_blocks: int | None = None) -> bool:
        """Record a sign of life (and the pool size it reports); False for an unknown worker."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.last_heartbeat = now
        if total_blocks is not None:
            worker.total_blocks = total_blocks
        return True

    def silent(self, now: float) -> list[WorkerState]:
        """Workers whose last heartbeat is older than the timeout."""
        return [w for w in self.workers.values() if now - w.last_heartbeat > self.heartbeat_timeout_s]

    def remove(self, worker_id: str) -> WorkerState | None:
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            self.colocated_workers -= worker.role is WorkerRole.COLOCATED
        if not self.workers:
            self.model, self.layout = None, None
        return worker

    def accepting(self, pool: str) -> list[WorkerState]:
        """Workers taking new work for ``pool`` now."""
        return [w for w in self.workers.values() if w.accepting == pool]

    def in_pool(self, pool: str) -> list[WorkerState]:
        """Workers counted in ``pool``, draining ones included (they still serve their old pool's work)."""
        return [w for w in self.workers.values() if w.pool == pool]

    def get(self, worker_id: str) -> WorkerState | None:
        return self.workers.get(worker_id)

    def __len__(self) -> int:
        return len(self.workers)
