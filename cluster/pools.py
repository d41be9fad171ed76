"""Pool statistics and moves between the prefill and decode pools, as the pool policy (``policies.pool``) decides.

``stats`` builds the cluster's ``PoolStats``: prompt tokens waiting for prefill are the prefill workers' backlogs
plus the admission queue's prompts, unless the queue's head waits for decode KV (``Placer.waiting_for``); then the
queue's prompt blocks count as decode KV waiting (``kv_waiting``) instead. What only the driver knows is passed in:
the prefill throughput per worker (the services measure it, the simulator estimates it; None: not known yet, no
statistics), running decodes, and the decode token rate and capacity (None when unknown: the policy leaves the term
out).

A move is carried out safely: each chosen worker stops taking new work for its old pool at once (``draining_to``),
finishes what it holds for that pool, and only then joins the new pool (``complete_drain``). Only workers whose
role is in ``movable_roles`` move (the services: ``flex``; the simulator: every worker); the donor pool keeps at
least one worker taking work. Moves are returned and kept (the last 50) for the admin status.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from diptych.cluster.workers import WorkerRegistry, WorkerState
from diptych.policies.pool import PoolDecision, PoolPolicy, PoolStats
from diptych.proto.roles import Pool, WorkerRole

log = logging.getLogger("diptych.cluster.pools")

RATE_WINDOW_S = 30.0
"""Seconds over which prompt arrivals (and, in the simulator, decode tokens) are averaged."""


class ArrivalRate:
    """Prompt tokens/s arrived over the last ``window_s`` seconds. ``divide_by_elapsed``: before ``window_s`` has
    passed since time 0, divide by the time elapsed (the simulator, which starts at 0) rather than by the whole
    window (the services, whose clock does not start with the cluster)."""

    def __init__(self, window_s: float = RATE_WINDOW_S, divide_by_elapsed: bool = False) -> None:
        self.window_s = window_s
        self.divide_by_elapsed = divide_by_elapsed
        self._arrivals: deque[tuple[float, int]] = deque()

    def add(self, now: float, prompt_tokens: int) -> None:
        self._arrivals.append((now, prompt_tokens))

    def rate(self, now: float) -> float:
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] < now - self.window_s:
            arrivals.popleft()
        window = self.window_s
        if self.divide_by_elapsed and now > 0:
            window = min(window, now)
        return sum(tokens for _, tokens in arrivals) / window


@dataclass(frozen=True)
class Move:
    """Worker ``worker_id`` started draining from ``from_pool`` to ``to_pool`` at ``time`` (seconds)."""

    time: float
    worker_id: str
    from_pool: str
    to_pool: str
    reason: str


class PoolManager:
    def __init__(self, registry: WorkerRegistry, policy: PoolPolicy, interval_s: float = 1.0,
                 movable_roles: Collection[str] = (WorkerRole.FLEX,), arrivals: ArrivalRate | None = None) -> None:
        self.registry = registry
        self.policy = policy
        self.interval_s = interval_s
        self.movable_roles = frozenset(movable_roles)
        self.arrivals = arrivals if arrivals is not None else ArrivalRate()
        self.moves: deque[dict[str, Any]] = deque(maxlen=50)
        self._last_tick = 0.0

    def on_arrival(self, prompt_tokens: int, now: float) -> None:
        self.arrivals.add(now, prompt_tokens)

    def stats(self, now: float, queued_prompt_tokens: int, waiting_for_kv: bool, prefill_tps: float | None,
              running_decodes: int, decode_tokens_per_s: float | None = None,
              decode_capacity_tps: float | None = None) -> PoolStats | None:
        """The cluster as the pool policy sees it, or None while a pool is empty or the prefill throughput per
        worker (``prefill_tps``, prompt tokens/s) is unknown."""
        prefill = self.registry.in_pool(Pool.PREFILL)
        decode = self.registry.in_pool(Pool.DECODE)
        if not prefill or not decode or prefill_tps is None:
            return None
        total_blocks = sum(w.total_blocks for w in decode)
        kv_waiting = 0.0
        if waiting_for_kv:  # the admission queue waits for decode KV, not for prefill
            kv_waiting = decode[0].blocks_for(queued_prompt_tokens) / total_blocks if total_blocks else 0.0
            queued_prompt_tokens = 0
        return PoolStats(
            prefill_workers=len(prefill), decode_workers=len(decode),
            queued_prompt_tokens=queued_prompt_tokens + sum(w.backlog_tokens for w in prefill),
            prefill_throughput_tps=prefill_tps * len(prefill),
            decode_kv_utilization=sum(w.reserved_blocks for w in decode) / total_blocks if total_blocks else 1.0,
            running_decodes=running_decodes, prompt_arrival_tps=self.arrivals.rate(now), kv_waiting=kv_waiting,
            decode_tokens_per_s=decode_tokens_per_s, decode_capacity_tps=decode_capacity_tps,
            draining_workers=sum(1 for w in self.registry.workers.values() if w.draining_to is not None),
        )

    def due(self, now: float) -> bool:
        """At most one decision every ``interval_s`` (the services' watchdog ticks more often), and only while some
        movable worker is not draining. Marks the tick taken."""
        if now - self._last_tick < self.interval_s:
            return False
        self._last_tick = now
        return any(w.role in self.movable_roles and w.draining_to is None for w in self.registry.workers.values())

    def decide(self, stats: PoolStats | None, now: float) -> list[Move]:
        """Ask the policy about ``stats`` and start the move it decides (no statistics: no decision)."""
        if stats is None:
            return []
        decision = self.policy.decide(stats, now)
        return [] if decision is None else self.start_move(decision, now)

    def start_move(self, decision: PoolDecision, now: float) -> list[Move]:
        """Drain the ``decision.workers`` movable workers of the donor pool with the least outstanding work
        (registration order on a tie); the donor pool keeps at least one worker taking work."""
        accepting = self.registry.accepting(decision.from_pool)
        candidates = sorted((w for w in accepting if w.role in self.movable_roles), key=_outstanding)
        count = min(decision.workers, len(candidates), len(accepting) - 1)
        if count < 1:
            log.info("pool policy wants %d worker(s) moved %s -> %s, but no worker can leave the %s pool (%s)",
                     decision.workers, decision.from_pool, decision.to_pool, decision.from_pool, decision.reason)
            return []
        moves = []
        for worker in candidates[:count]:
            worker.draining_to = Pool(decision.to_pool)
            move = Move(now, worker.worker_id, decision.from_pool, decision.to_pool, decision.reason)
            moves.append(move)
            self.moves.append({"time": now, "worker": worker.worker_id, "from": decision.from_pool,
                               "to": decision.to_pool, "reason": decision.reason, "completed": None})
            log.info("moving worker %s from %s to %s (draining first): %s", worker.worker_id, decision.from_pool,
                     decision.to_pool, decision.reason)
        return moves

    def drained(self) -> list[WorkerState]:
        """Draining workers that hold nothing more for their old pool."""
        return [w for w in self.registry.workers.values() if w.draining_to is not None and w.outstanding == 0]

    def complete_drain(self, worker_id: str, now: float) -> None:
        """The draining worker joins its new pool (the driver knows it holds nothing for the old one)."""
        worker = self.registry.workers[worker_id]
        assert worker.draining_to is not None
        log.info("worker %s drained; now in the %s pool", worker_id, worker.draining_to.value)
        worker.pool, worker.draining_to = worker.draining_to, None
        for move in reversed(self.moves):
            if move["worker"] == worker_id and move["completed"] is None:
                move["completed"] = now
                break

    def snapshot(self) -> dict[str, Any]:
        return {"policy": self.policy.name, "moves": list(self.moves)}


def _outstanding(worker: WorkerState) -> int:
    return worker.outstanding
