"""The simulator's pool moves: the inputs of the cluster core's ``PoolStats`` that only the simulator knows, the
pool policy's decisions carried out through the core's drains, and the role switch once a worker is empty.

The core (``diptych.cluster.pools``) builds the statistics as the services do; the simulator passes in the cost
model's prefill throughput per worker (the services measure theirs) and fills the decode pool's token rate and
capacity (the services' workers do not report a decode capacity yet): ``decode_tokens_per_s`` is the decode tokens
produced over the last 30 s, and ``decode_capacity_tps`` the cost model's decode tokens/s of the pool at a full batch
(the placement cap on sequences per decode worker, or the decode batch policy's ``max_decodes`` if smaller) of
sequences at the mean context of the tokens of that window (so that a change of workload changes both together).
Every simulated worker may move (the core's ``movable_roles`` are prefill and decode); a moving worker drains in the
core, and switches role here once its engine is empty too.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from diptych.cluster.pools import RATE_WINDOW_S
from diptych.policies.pool import PoolStats
from diptych.proto.roles import Pool
from diptych.sim.roles import DECODE
from diptych.sim.worker import Worker

if TYPE_CHECKING:
    from diptych.sim.simulator import Simulator

EV_POOL = 2
"""Event kind of a pool tick on the simulator's heap (after worker iterations, 0, and KV landings, 1)."""


class PoolMoves:
    sim: Simulator
    decode_samples: deque[tuple[float, int, int]]
    """(tick time, decode tokens and their context tokens by then) over the last ``RATE_WINDOW_S``."""
    history: list[tuple[float, int, int]]
    """(time, prefill workers, decode workers) at the start and after every role switch."""
    moves: list[dict[str, Any]]
    """Every move started, as ``RunResult.meta["pool_moves"]`` lists them."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.decode_samples = deque()
        self.history = []
        self.moves = []

    def count(self, pool: Pool) -> int:
        return len(self.sim.core.workers.in_pool(pool))

    def stats(self, now: float) -> PoolStats | None:
        sim = self.sim
        core = sim.core
        prefill = [sim.worker_of[w.worker_id] for w in core.workers.in_pool(Pool.PREFILL)]
        decode = [sim.worker_of[w.worker_id] for w in core.workers.in_pool(Pool.DECODE)]
        budget = getattr(prefill[0].policy if prefill else None, "token_budget", 2048)
        per_worker = sim.cost.prefill_throughput_tps(budget, int(sim.prompt_mean))
        decode_rate, decode_capacity = self._decode_rate_and_capacity(now, decode)
        return core.pools.stats(now, core.queued_prompt_tokens, core.waiting_for_kv, per_worker,
                                sum(len(w.running) for w in decode), decode_rate, decode_capacity)

    def _decode_rate_and_capacity(self, now: float, decode: list[Worker]) -> tuple[float, float]:
        """Decode tokens/s produced over the last ``RATE_WINDOW_S`` (since the start while shorter), and the cost
        model's decode tokens/s of the ``decode`` workers, each at a full batch of sequences at the mean context of
        those tokens."""
        sim = self.sim
        tokens = context = 0
        for w in sim.workers:
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
        mean_context = (context - start_context) / produced if produced else sim.prompt_mean
        batch = sim.config.max_decode_sequences
        policy_limit = getattr(decode[0].policy, "max_decodes", None) if decode else None
        if policy_limit is not None:
            batch = min(batch, policy_limit)
        return rate, len(decode) * batch / sim.cost.iteration_time(0, batch, int(batch * mean_context))

    def tick(self, now: float, arrivals_left: bool) -> None:
        """Ask the pool policy (every tick: the event queue spaces them), start the move it decides, switch the
        moved workers that are empty already, and schedule the next tick while work remains."""
        sim = self.sim
        moved = []
        for move in sim.core.pools.decide(self.stats(now), now):
            worker = sim.worker_of[move.worker_id]
            worker.draining_to = move.to_pool
            moved.append(worker)
            self.moves.append({"time": now, "worker": worker.worker_id, "from": move.from_pool, "to": move.to_pool,
                               "reason": move.reason})
        for worker in moved:
            self.maybe_switch(worker, now)
        busy = any(w.busy or w.num_requests for w in sim.workers) or len(sim.admission)
        if arrivals_left or busy:
            sim.push(now + sim.config.pool_tick_s, EV_POOL, 0, 0)

    def maybe_switch(self, worker: Worker, now: float) -> None:
        if worker.draining_to is not None and worker.is_empty():
            self.switch_role(worker, now)

    def switch_role(self, worker: Worker, now: float) -> None:
        """The drained ``worker`` joins its new pool: new role, name and batch policy (all its blocks are free: it
        holds no sequence and no reservation)."""
        sim = self.sim
        role = worker.draining_to
        assert role is not None
        sim.core.pools.complete_drain(sim.core_id[worker.index], now)
        worker.role = role
        worker.worker_id = f"{role}-{worker.index}"
        worker.draining_to = None
        worker.set_policy(sim.new_policy(role))
        worker.plan_all_decodes = False
        self.history.append((now, self.count(Pool.PREFILL), self.count(Pool.DECODE)))
        sim.admit(now)
