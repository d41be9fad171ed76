"""Moving flex workers between the prefill and decode pools, as the pool policy (``policies.pool``) decides.

Each tick builds the cluster's ``PoolStats`` and asks the policy. A move is carried out safely: the chosen flex
worker stops taking new work for its old pool at once (``draining_to``), finishes what it holds for that pool
(prefills hand off their KV; decodes run to completion), and only then joins the new pool. Every move is logged
with the policy's reason when it starts and when it completes, and kept for the admin status.

Only workers registered with role ``flex`` move; fixed-role workers give a static split.

The statistics (``PoolStats``) are built as the simulator builds them (``sim/pool_moves.py``): prompt tokens waiting
for prefill are the prefill workers' backlogs plus the admission queue's prompts, unless the queue's head waits for
decode KV (``Placer.waiting_for``); then the queue's prompt blocks count as decode KV waiting (``kv_waiting``)
instead. The decode token rate and capacity are left unknown (None): decode workers do not report a decode capacity,
so the policy's decode utilisation term is left out here.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from diptych.policies.pool import POOL_POLICIES, PoolDecision, PoolStats
from diptych.services.coordinator.workers import WorkerInfo, WorkerRegistry

log = logging.getLogger("diptych.coordinator.pools")

ARRIVAL_WINDOW_S = 30.0


class PoolManager:
    def __init__(self, registry: WorkerRegistry, policy: str = "static", knobs: dict[str, Any] | None = None,
                 interval_s: float = 1.0) -> None:
        self.registry = registry
        self.policy = POOL_POLICIES.create(policy, **(knobs or {}))
        self.interval_s = interval_s
        self.moves: deque[dict[str, Any]] = deque(maxlen=50)
        self._arrivals: deque[tuple[float, int]] = deque()
        self._last_tick = 0.0

    def on_arrival(self, prompt_tokens: int, now: float) -> None:
        self._arrivals.append((now, prompt_tokens))

    def tick(self, now: float, queued_prompt_tokens: int, waiting_for_kv: bool) -> None:
        """Complete finished drains; at most every ``interval_s``, ask the policy and start a move.
        ``queued_prompt_tokens``: prompt tokens in the admission queue; ``waiting_for_kv``: its head waits for decode
        KV."""
        self._complete_drains(now)
        if now - self._last_tick < self.interval_s:
            return
        self._last_tick = now
        if not any(w.role == "flex" and not w.draining_to for w in self.registry.workers.values()):
            return
        stats = self.stats(now, queued_prompt_tokens, waiting_for_kv)
        if stats is None:
            return
        decision = self.policy.decide(stats, now)
        if decision is not None:
            self._start_move(decision, now)

    def stats(self, now: float, queued_prompt_tokens: int, waiting_for_kv: bool) -> PoolStats | None:
        """The cluster as the pool policy sees it, or None before any prefill throughput was measured."""
        prefill = self.registry.in_pool("prefill")
        decode = self.registry.in_pool("decode")
        measured = [w.load.prefill_tps for w in prefill if w.load.prefill_tps > 0]
        if not prefill or not decode or not measured:
            return None
        per_worker = sum(measured) / len(measured)  # unmeasured workers are assumed as fast as the measured ones
        while self._arrivals and now - self._arrivals[0][0] > ARRIVAL_WINDOW_S:
            self._arrivals.popleft()
        total_blocks = sum(w.total_blocks for w in decode)
        kv_waiting = 0.0
        if waiting_for_kv:  # the admission queue waits for decode KV, not for prefill
            kv_waiting = decode[0].blocks_for(queued_prompt_tokens) / total_blocks if total_blocks else 0.0
            queued_prompt_tokens = 0
        return PoolStats(
            prefill_workers=len(prefill), decode_workers=len(decode),
            queued_prompt_tokens=queued_prompt_tokens + sum(w.backlog_tokens for w in prefill),
            prefill_throughput_tps=per_worker * len(prefill),
            decode_kv_utilization=sum(w.reserved_blocks for w in decode) / total_blocks if total_blocks else 1.0,
            running_decodes=sum(w.load.num_running for w in decode),
            prompt_arrival_tps=sum(tokens for _, tokens in self._arrivals) / ARRIVAL_WINDOW_S,
            kv_waiting=kv_waiting, draining_workers=sum(1 for w in self.registry.workers.values() if w.draining_to),
        )

    def _start_move(self, decision: PoolDecision, now: float) -> None:
        """Drain the ``decision.workers`` flex workers of the donor pool with the least outstanding work (the donor
        pool keeps at least one worker taking work)."""
        accepting = self.registry.accepting(decision.from_pool)
        candidates = sorted((w for w in accepting if w.role == "flex"), key=_outstanding)
        count = min(decision.workers, len(candidates), len(accepting) - 1)
        if count < 1:
            log.info("pool policy wants %d worker(s) moved %s -> %s, but no flex worker can leave the %s pool (%s)",
                     decision.workers, decision.from_pool, decision.to_pool, decision.from_pool, decision.reason)
            return
        for worker in candidates[:count]:
            worker.draining_to = decision.to_pool
            self.moves.append({"time": now, "worker": worker.worker_id, "from": decision.from_pool,
                               "to": decision.to_pool, "reason": decision.reason, "completed": None})
            log.info("moving worker %s from %s to %s (draining first): %s", worker.worker_id, decision.from_pool,
                     decision.to_pool, decision.reason)

    def _complete_drains(self, now: float) -> None:
        for worker in self.registry.workers.values():
            if worker.draining_to and _outstanding(worker) == 0:
                log.info("worker %s drained; now in the %s pool", worker.worker_id, worker.draining_to)
                worker.pool, worker.draining_to = worker.draining_to, None
                for move in reversed(self.moves):
                    if move["worker"] == worker.worker_id and move["completed"] is None:
                        move["completed"] = now
                        break

    def snapshot(self) -> dict[str, Any]:
        return {"policy": self.policy.name, "moves": list(self.moves)}


def _outstanding(worker: WorkerInfo) -> int:
    """Work the worker still holds for its current pool (prompt tokens queued, or decode blocks reserved)."""
    return worker.backlog_tokens if worker.pool == "prefill" else worker.reserved_blocks
