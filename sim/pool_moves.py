"""The simulator's pool moves: ``PoolStats`` built as ``services/coordinator/pools.py`` builds them, the pool
policy's decisions carried out with a drain, and the role switch once the worker is empty. A mixin of
``sim.simulator.Simulator`` (it uses the simulator's workers, cost model, queues and event heap).

Beyond the services' statistics the simulator fills the decode pool's token rate and capacity (the services' workers
do not report a decode capacity yet): ``decode_tokens_per_s`` is the decode tokens produced over the last 30 s, and
``decode_capacity_tps`` the cost model's decode tokens/s of the pool at a full batch (the placement cap on sequences
per decode worker, or the decode batch policy's ``max_decodes`` if smaller) of sequences at the mean context of the
tokens of that window (so that a change of workload changes both together).
"""

from __future__ import annotations

from collections import deque

from diptych.policies.pool import DECODE as POOL_DECODE
from diptych.policies.pool import PoolStats
from diptych.sim.worker import DECODE, PREFILL, Worker

EV_POOL = 2
"""Event kind of a pool tick on the simulator's heap (after worker iterations, 0, and KV landings, 1)."""
RATE_WINDOW_S = 30.0  # prompt arrival and decode token rate window (services/coordinator/pools.py)


class PoolMoves:
    decode_samples: deque[tuple[float, int, int]]  # (tick time, decode tokens and their context tokens by then)

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
        queued = self.queued_prompt
        waiting_kv = 0.0
        if self.waiting_for_kv:  # the coordinator's queue waits for decode KV, not for prefill
            queued = 0
            waiting_kv = -(-self.queued_prompt // self.block_size) / total if total else 0.0
        decode_rate, decode_capacity = self._decode_rate_and_capacity(now, decode)
        return PoolStats(  # as services/coordinator/pools.py builds them (no TBT slack there either)
            prefill_workers=len(prefill), decode_workers=len(decode),
            queued_prompt_tokens=queued + sum(w.backlog_tokens for w in prefill),
            prefill_throughput_tps=per_worker * len(prefill),
            decode_kv_utilization=sum(w.reserved_blocks for w in decode) / total if total else 1.0,
            running_decodes=sum(len(w.running) for w in decode), prompt_arrival_tps=arrival_tps,
            kv_waiting=waiting_kv, decode_tokens_per_s=decode_rate, decode_capacity_tps=decode_capacity,
            draining_workers=sum(1 for w in self.workers if w.draining_to is not None),
        )

    def _decode_rate_and_capacity(self, now: float, decode: list[Worker]) -> tuple[float, float]:
        """Decode tokens/s produced over the last ``RATE_WINDOW_S`` (since the start while shorter), and the cost
        model's decode tokens/s of the ``decode`` workers, each at a full batch of sequences at the mean context of
        those tokens."""
        tokens = context = 0
        for w in self.workers:
            in_flight = w.completed_iterations(now) if w.busy and w.stretch and w.role == DECODE else 0
            worker_tokens, worker_context = w.decode_work(in_flight)
            tokens += worker_tokens
            context += worker_context
        samples = self.decode_samples
        samples.append((now, tokens, context))
        while len(samples) > 1 and samples[1][0] <= now - RATE_WINDOW_S:
            samples.popleft()
        start, start_tokens, start_context = samples[0] if len(samples) > 1 else (0.0, 0, 0)
        produced = tokens - start_tokens
        rate = produced / (now - start) if now > start else 0.0
        mean_context = (context - start_context) / produced if produced else self.prompt_mean
        batch = self.config.max_decode_sequences
        policy_limit = getattr(decode[0].policy, "max_decodes", None) if decode else None
        if policy_limit is not None:
            batch = min(batch, policy_limit)
        return rate, len(decode) * batch / self.cost.iteration_time(0, batch, int(batch * mean_context))

    def _pool_tick(self, now: float, arrivals_left: bool) -> None:
        stats = self._pool_stats(now)
        decision = self.pool_policy.decide(stats, now)
        if decision is not None:
            donors = [w for w in self.workers if w.role == decision.from_pool and w.draining_to is None]
            key = ((lambda w: (w.reserved_blocks, w.index)) if decision.from_pool == POOL_DECODE
                   else (lambda w: (w.backlog_tokens, w.index)))
            for worker in sorted(donors, key=key)[:min(decision.workers, len(donors) - 1)]:
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
