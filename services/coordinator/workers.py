"""The coordinator's view of its workers: registration checks, liveness, and KV/backlog accounting.

Accounting invariants (blocks are KV blocks of the worker's own pool, tokens are prompt tokens):
- a decode worker's ``reserved_blocks`` is the sum of the reservations the coordinator asked of it for requests it
  still holds; the coordinator never asks for more than ``total_blocks - reserved_blocks``;
- a prefill worker's ``backlog_tokens``/``backlog_blocks`` cover the prompts dispatched to it whose prefill has not
  ended; ``has_room`` keeps both under the worker's limits (an idle worker always takes one request).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from diptych.proto.messages import KVLayout, RegisterWorker, WorkerLoad

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated", "flex")
POOLS = ("prefill", "decode", "colocated")


@dataclass
class WorkerInfo:
    worker_id: str
    identity: bytes
    role: str
    model: str
    layout: KVLayout
    kv_addr: str
    max_model_len: int
    load: WorkerLoad
    last_heartbeat: float
    pool: str = ""
    """The pool the worker serves: its role, or for a flex worker the one the pool policy assigned."""
    draining_to: str | None = None
    """A flex worker being moved: it takes no new work until its old pool's work is done, then joins this pool."""
    reserved_blocks: int = 0
    backlog_tokens: int = 0
    backlog_blocks: int = 0
    kv_share: dict = field(default_factory=dict)
    """Decode roles on a GPU: their pool shared for GPU-to-GPU pushes (``RegisterWorker.kv_share``)."""

    @property
    def total_blocks(self) -> int:
        return self.load.total_blocks

    @property
    def unreserved_blocks(self) -> int:
        """Blocks neither reserved for decodes nor held by queued prefills."""
        return self.total_blocks - self.reserved_blocks - self.backlog_blocks

    @property
    def accepting(self) -> str | None:
        """The pool this worker takes new work for, or None while it drains."""
        return None if self.draining_to else self.pool

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.layout.block_size)


class WorkerRegistry:
    """Registered workers by id. The first worker fixes the cluster's model and KV layout; later ones must match,
    so any prefill worker can hand KV to any decode worker."""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: dict[str, WorkerInfo] = {}
        self.model: str | None = None
        self.layout: KVLayout | None = None

    def register(self, msg: RegisterWorker, identity: bytes, now: float) -> str | None:
        """Add the worker; returns an error string (and changes nothing) if it cannot join."""
        if msg.role not in ROLES:
            return f"unknown role {msg.role!r}; expected one of {ROLES}"
        if msg.role in ("decode", "flex") and not msg.kv_addr:
            return f"a {msg.role} worker must give its KV ingress address"
        if self.model is not None and msg.model != self.model:
            return f"model {msg.model!r} does not match the cluster's {self.model!r}"
        if self.layout is not None and msg.layout != self.layout:
            return f"KV layout {msg.layout} does not match the cluster's {self.layout}"
        if msg.worker_id in self.workers:
            return f"worker id {msg.worker_id!r} is already registered"
        self.model, self.layout = msg.model, msg.layout
        self.workers[msg.worker_id] = WorkerInfo(
            worker_id=msg.worker_id, identity=identity, role=msg.role, model=msg.model, layout=msg.layout,
            kv_addr=msg.kv_addr, max_model_len=msg.max_model_len, load=msg.load, last_heartbeat=now, kv_share=msg.kv_share,
            pool=msg.role if msg.role != "flex" else self._smaller_pool(),
        )
        return None

    def _smaller_pool(self) -> str:
        """Where a new flex worker starts: the prefill or decode pool with fewer workers (prefill on a tie)."""
        sizes = {pool: len(self.in_pool(pool)) for pool in ("prefill", "decode")}
        return "prefill" if sizes["prefill"] <= sizes["decode"] else "decode"

    def heartbeat(self, worker_id: str, load: WorkerLoad, now: float) -> bool:
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.load, worker.last_heartbeat = load, now
        return True

    def silent(self, now: float) -> list[WorkerInfo]:
        """Workers whose last heartbeat is older than the timeout."""
        return [w for w in self.workers.values() if now - w.last_heartbeat > self.heartbeat_timeout_s]

    def remove(self, worker_id: str) -> WorkerInfo | None:
        worker = self.workers.pop(worker_id, None)
        if not self.workers:
            self.model, self.layout = None, None
        return worker

    def accepting(self, pool: str) -> list[WorkerInfo]:
        """Workers taking new work for ``pool`` now."""
        return [w for w in self.workers.values() if w.accepting == pool]

    def in_pool(self, pool: str) -> list[WorkerInfo]:
        """Workers counted in ``pool``, draining ones included (they still serve their old pool's work)."""
        return [w for w in self.workers.values() if w.pool == pool]

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self.workers.get(worker_id)
