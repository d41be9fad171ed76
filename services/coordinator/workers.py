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

from proto.messages import KVLayout, RegisterWorker, WorkerLoad

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


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
    reserved_blocks: int = 0
    backlog_tokens: int = 0
    backlog_blocks: int = 0
    requests: set[str] = field(default_factory=set)

    @property
    def total_blocks(self) -> int:
        return self.load.total_blocks

    @property
    def unreserved_blocks(self) -> int:
        return self.total_blocks - self.reserved_blocks

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
        if msg.role == "decode" and not msg.kv_addr:
            return "a decode worker must give its KV ingress address"
        if self.model is not None and msg.model != self.model:
            return f"model {msg.model!r} does not match the cluster's {self.model!r}"
        if self.layout is not None and msg.layout != self.layout:
            return f"KV layout {msg.layout} does not match the cluster's {self.layout}"
        if msg.worker_id in self.workers:
            return f"worker id {msg.worker_id!r} is already registered"
        self.model, self.layout = msg.model, msg.layout
        self.workers[msg.worker_id] = WorkerInfo(
            worker_id=msg.worker_id, identity=identity, role=msg.role, model=msg.model, layout=msg.layout,
            kv_addr=msg.kv_addr, max_model_len=msg.max_model_len, load=msg.load, last_heartbeat=now,
        )
        return None

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

    def by_role(self, role: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.role == role]

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self.workers.get(worker_id)
