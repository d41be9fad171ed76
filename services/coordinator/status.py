"""What the coordinator's ``ClusterStatus`` says of one worker (``ClusterStatus.workers``, shown by
``/admin/status`` and exported by the frontend's ``/metrics``).

Keys: ``role``, ``pool``, ``draining_to``; the core's accounting (``reserved_blocks``: expected KV footprints of the
requests placed on it, which may differ from the blocks in use: engines allocate on demand; ``backlog_tokens``;
``requests`` held; ``refused_reservations``: handoff reservations its engine refused for lack of free blocks, each
retried); and its last heartbeat (``total_blocks``, ``free_blocks``, ``running`` and ``waiting`` sequences in its
engine, ``prefill_tps``, ``kv_handoffs``,
``preemptions`` and ``recomputed_tokens`` since it started). Blocks are KV blocks of its pool.
"""

from __future__ import annotations

from typing import Any

from diptych.cluster.workers import WorkerState
from diptych.services.coordinator.endpoints import Endpoint


def worker_status(worker: WorkerState, endpoint: Endpoint, held: int) -> dict[str, Any]:
    """``worker``'s entry; ``held``: the requests it holds (``RequestTable.held_count``)."""
    load = endpoint.load
    return {
        "role": worker.role.value, "pool": worker.pool.value,
        "draining_to": worker.draining_to.value if worker.draining_to else None,
        "reserved_blocks": worker.reserved_blocks, "total_blocks": worker.total_blocks,
        "free_blocks": load.free_blocks, "running": load.num_running, "waiting": load.num_waiting,
        "backlog_tokens": worker.backlog_tokens, "requests": held,
        "refused_reservations": worker.refused_reservations, "prefill_tps": load.prefill_tps,
        "shares_kv_pool": bool(endpoint.kv_share), "kv_handoffs": load.handoffs, "preemptions": load.preemptions,
        "recomputed_tokens": load.recomputed_tokens,
    }
