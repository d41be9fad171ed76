"""The simulator's pool moves: ``PoolStats`` built as ``services/coordinator/pools.py`` builds them, the pool
policy's decisions carried out with a drain, and the role switch once the worker is empty. A mixin of
``sim.simulator.Simulator`` (it uses the simulator's workers, cost model, queues and event heap)."""

from __future__ import annotations

from policies.pool import DECODE as POOL_DECODE
from policies.pool import PoolStats
from sim.worker import DECODE, PREFILL, Worker

EV_POOL = 2
"""Event kind of a pool tick on the simulator's heap (after worker iterations, 0, and KV landings, 1)."""
RATE_WINDOW_S = 30.0  # prompt arrival rate window (services/coordinator/pools.py)


class PoolMoves:
    def _count(self, role: str) -> int:
        return sum(1 for w in self.workers if w.role == role)

    def _pool_stats(self, now: float) -> PoolStats:
        prefill = [w for w in self.workers if w.role == PREFILL]
        decode = [w for w in self.workers if w.role == DECODE]
        while self.recent_prompts and self.recent_prompts[0][0] < now - RATE_WINDOW_S:
            self.recent_prompts.popleft()
        window = min(RATE_WINDOW_S, now) if now > 0 else RATE_WINDOW_S
        arrival_tps = sum(p for _, p in self.recent_prompts) / window
        budget = getattr(prefill[0].policy if prefill else None, "token_budget", 2048)
        per_worker = self.cost.prefill_throughput_tps(budget, int(self.prompt_mean))
        total = sum(w.total_blocks for w in decode)
        return PoolStats(  # as services/coordinator/pools.py builds them (no TBT slack there either)
            prefill_workers=len(prefill), decode_workers=len(decode),
            queued_prompt_tokens=self.queued_prompt + sum(w.backlog_tokens for w in prefill),
            prefill_throughput_tps=per_worker * len(prefill),
            decode_kv_utilization=sum(w.reserved_blocks for w in decode) / total if total else 1.0,
            running_decodes=sum(len(w.running) for w in decode), prompt_arrival_tps=arrival_tps,
        )

    def _pool_tick(self, now: float, arrivals_left: bool) -> None:
        stats = self._pool_stats(now)
        decision = self.pool_policy.decide(stats, now)
        if decision is not None:
            donors = [w for w in self.workers if w.role == decision.from_pool and w.draining_to is None]
            if len(donors) >= 2:
                if decision.from_pool == POOL_DECODE:
                    worker = min(donors, key=lambda w: (w.reserved_blocks, w.index))
                else:
                    worker = min(donors, key=lambda w: (w.backlog_tokens, w.index))
                worker.draining_to = decision.to_pool
                self._refresh_pools()
                self.pool_moves.append({"time": now, "worker": worker.worker_id, "from": decision.from_pool,
                                        "to": decision.to_pool, "reason": decision.reason})
                self._maybe_switch(worker, now)
        busy = any(w.busy or w.num_requests for w in self.workers) or len(self.admission)
        if arrivals_left or busy:
            self._push(now + self.config.pool_tick_s, EV_POOL, 0, 0)

    def _maybe_switch(self, worker: Worker, now: float) -> None:
        if worker.draining_to is not None and worker.is_empty():
            self.switch_role(worker, now)

    def switch_role(self, worker: Worker, now: float) -> None:
        role = worker.draining_to
        assert role is not None
        worker.role = role
        worker.worker_id = f"{role}-{worker.index}"
        worker.draining_to = None
        worker.set_policy(self._new_policy(role))
        worker.reserved_blocks = worker.backlog_tokens = worker.backlog_blocks = 0
        worker.free_blocks = worker.total_blocks
        worker.plan_all_decodes = False
        self._refresh_pools()
        self.pool_history.append((now, self._count(PREFILL), self._count(DECODE)))
        self._admit(now)

