"""Discrete-event simulation of a Diptych cluster in virtual time, running the services' policy objects and the
cluster core (``diptych.cluster``) the coordinator runs.

What is simulated, and which service it mirrors:

- **Coordinator** (``services/coordinator``, ``cluster.core``): every arrival goes to the admission policy
  (``add``; a ``Rejection`` refuses it). After every event that adds work or frees capacity (arrival, prefill done,
  request done, a worker changing pool) the core's admission loop runs: ``peek()`` the head, place it or stop at the
  first request that cannot be placed (the policy's order is never bypassed), ``pop(now)``, account, dispatch.
  Placement (``cluster.placement``): the prefill worker with the least queued prompt tokens among those whose queue
  stays within ``max_prefill_backlog_tokens`` (an idle one always takes a request) and whose KV pool holds its
  queued prompts; the decode worker with the most unreserved blocks that can account the request's expected KV
  footprint and holds fewer than ``max_decode_sequences`` requests. Requests larger than any worker's pool (or
  longer than the engines' ``max_positions``) are refused at arrival. Output tokens are charged to the admission
  policy as workers report them (the first token when the prefill ends, then every decode token); before each
  admission decision the counters are brought up to the current time. The core's ledger counts input tokens only
  (output tokens go to the admission policy from the hot loop).
- **Workers** (``engine/engine.py``, ``sim.worker``): the batch policy composes each iteration from ``waiting`` and
  ``running`` ``SequenceState``s and the KV state; the iteration takes the cost model's time; the first token is
  sampled when the last prompt chunk ends; each decode yields one token per iteration. Work that reaches a busy
  worker joins its next iteration.
- **Decode reservations** (``Engine.reserve``): a dispatched request's ``decode_blocks`` are taken from its decode
  worker's pool only if that leaves the worker's admission watermark free; otherwise it waits in the worker's FIFO of
  pending reservations, granted as blocks free up at the worker's iteration ends (or when a request it reserved
  for ends on its prefill worker). Its prefill task is sent once granted (the services send it after
  ``KVReserved``). Colocated dispatches reserve nothing: the worker's own admission decides.
- **KV on demand** (``engine.kv_rules``, ``sim.worker``): sequences take blocks as they grow, batch policies preempt
  by recompute under pressure, and a sequence stops at ``kv_rules.max_positions`` positions. ``RunResult.meta``
  carries ``preemptions``, ``recomputed_tokens`` and ``peak_running`` (the most sequences running at once on one
  worker), and ``kv_workers`` the same per worker; ``times["preempted"]`` is each request's first preemption and
  ``meta["request_preemptions"]`` how many it had.
- **KV handoff**: when a prefill ends, its blocks are freed, the first token is out, and the KV reaches the decode
  worker after ``handoff_latency_s + bytes / handoff_bandwidth_Bps`` (bytes = whole prompt blocks x KV bytes per
  token); the sequence joins the decode worker's next iteration.
- **Pools** (``policies.pool``, ``cluster.pools``): every ``pool_tick_s`` the pool policy gets ``PoolStats``
  built by the core as for the services (queued prompt tokens of the coordinator plus the prefill pool's backlog,
  or, while the queue's head waits for decode KV, the queue's prompt blocks as KV waiting; decode KV reserved /
  total, running decodes, prompt tokens arrived over the last 30 s, divided by the time elapsed while shorter; no
  TBT slack), except that prefill throughput is the cost model's estimate rather than a measurement and the decode
  token rate and capacity are filled too (``sim.pool_moves``). A move drains the donor workers with the least
  outstanding work (no new placements; each finishes or hands off what it holds), then switches their role and
  batch policy. Every worker may move (the services move only ``flex`` workers).
- **Colocated workers** (prefill and decode in one engine): placed as the services place them (least queued prompt
  tokens within the backlog limit, the request's expected KV footprint accounted at placement, backlog released with
  the first token). With ``colocated_reserve=False`` [simulator only] nothing is accounted at placement and the
  worker's batch policy admits by KV itself, so with no backlog limit it sees every arrived request (SLAI's setting).

Messages between processes take no time. Speed: a decode worker whose last plan ran every running sequence as a
decode, with nothing waiting and nothing changed since, is assumed to plan the same again while every decode's
block fits (true of every registered policy: each schedules all decodes while they fit its caps and preempts only
when a block does not fit; ``tests/sim`` checks it against ``exact`` mode); such *stationary stretches* run as one
event until a sequence finishes, new work arrives, or the blocks they grow into would no longer fit. The policy's
``on_iteration_end`` is still called for every iteration, in order, and token charges reach the admission policy
at each iteration's end time. ``ClusterConfig.exact`` turns this off.
"""

from __future__ import annotations

import gc
import heapq
import math
from typing import Any

from diptych.cluster.blocks import blocks_for
from diptych.cluster.core import ClusterCore, Dispatch
from diptych.cluster.placement import Placer
from diptych.cluster.pools import ArrivalRate, PoolManager
from diptych.cluster.requests import RequestRecord
from diptych.cluster.workers import WorkerRegistry, WorkerState
from diptych.engine import kv_rules
from diptych.metrics.results import STATUS_CODES, RunResult
from diptych.policies.admission import ADMISSION_POLICIES, AdmissionPolicy, PendingRequest
from diptych.policies.batch import BATCH_POLICIES, BatchPolicy
from diptych.policies.pool import POOL_POLICIES
from diptych.proto.roles import Pool
from diptych.sim.config import ClusterConfig
from diptych.sim.pool_moves import EV_POOL, PoolMoves
from diptych.sim.result_assembly import NAN, assemble_result
from diptych.sim.roles import COLOCATED, DECODE, PREFILL
from diptych.sim.token_accounting import TokenAccounting
from diptych.sim.worker import SimSeq, Worker
from diptych.workloads.spec import RequestSpec

EV_WORKER, EV_HANDOFF = 0, 1
EV_DISPATCH = 3  # a dispatched request reaches its worker's queue (after EV_POOL = 2 on ties)


class Simulator:
    """The event queue and the per-request arrays around the cluster core, the simulated workers, the token
    accounting (``tokens``) and the pool moves (``pool_moves``). ``sim.worker`` calls back into it (``first_token``,
    ``prefilled``, ``finished``, ``switch_role``, ``schedule_worker``, ...) and updates the token arrays in place."""

    core: ClusterCore
    tokens: TokenAccounting
    pool_moves: PoolMoves
    workers: list[Worker]
    worker_of: dict[str, Worker]
    """Simulated worker by core worker id."""
    core_id: list[str]
    """Core worker id by worker index."""

    def __init__(self, config: ClusterConfig, specs: list[RequestSpec], until: float | None = None,
                 progress: bool = False) -> None:
        config.validate()
        if until is not None and not until > 0:
            raise ValueError("until must be > 0")
        self.config = config
        self.cost = config.cost_model
        self.block_size = config.block_size
        self.specs = sorted(specs, key=lambda s: s.arrival_time)
        if len({s.request_id for s in self.specs}) != len(self.specs):
            raise ValueError("request ids must be unique")
        self.until = until
        self.progress = progress
        self.admission: AdmissionPolicy = ADMISSION_POLICIES.create(config.admission.name, **config.admission.knobs)
        self.tracks_tokens = type(self.admission).on_output_tokens is not AdmissionPolicy.on_output_tokens
        self.core = self._new_core(config)
        blocks = config.blocks_per_worker()
        self.max_positions = kv_rules.max_positions(
            config.max_model_len if config.max_model_len is not None else blocks * self.block_size, blocks,
            self.block_size)
        self.workers = []
        self.worker_of = {}
        self.core_id = []
        for role, count in ((PREFILL, config.prefill_workers), (DECODE, config.decode_workers),
                            (COLOCATED, config.colocated_workers)):
            for _ in range(count):
                worker = Worker(self, len(self.workers), role, self.new_policy(role), blocks)
                core_id = str(worker.index)
                self.core.workers.register(core_id, role, blocks, self.block_size, 0.0)
                self.workers.append(worker)
                self.worker_of[core_id] = worker
                self.core_id.append(core_id)
        self.colocated = config.colocated_workers > 0
        n = len(self.specs)
        self.tier_names = sorted({s.tier for s in self.specs}) or ["default"]
        tier_index = {name: i for i, name in enumerate(self.tier_names)}
        self.tier_of = [tier_index[s.tier] for s in self.specs]
        self.tokens = TokenAccounting(n, len(self.tier_names), config.record_tokens)
        # sim.iteration_end updates these in place (its hot loop reads them off the simulator)
        self.pending_gaps, self.max_tbt = self.tokens.pending_gaps, self.tokens.max_tbt
        self.violations, self.num_gaps = self.tokens.violations, self.tokens.num_gaps
        self.token_times = self.tokens.token_times
        self.token, self.stretch_tokens = self.tokens.token, self.tokens.stretch_tokens
        self.pending_count, self.flush_gaps = self.tokens.pending_count, self.tokens.flush_gaps
        self.pool_moves = PoolMoves(self)
        self.slo = [s.tbt_slo_s if s.tbt_slo_s is not None else math.inf for s in self.specs]
        self.times = {phase: [NAN] * n for phase in ("admitted", "prefill_start", "prefill_end", "handoff_start",
                                                     "handoff_end", "first_token", "finish", "preempted")}
        self.req_preemptions = [0] * n
        self.status = [STATUS_CODES["unfinished"]] * n
        self.num_tokens = [0] * n
        self.req_prefill, self.req_decode = [-1] * n, [-1] * n  # worker indices
        self.req_blocks = [0] * n  # blocks the decoding (or colocated) worker holds for the request
        self.req_seq: list[SimSeq | None] = [None] * n
        self.req_record: list[RequestRecord | None] = [None] * n
        self.index_of = {s.request_id: i for i, s in enumerate(self.specs)}
        self.heap: list[tuple] = []
        self.counter = 0
        self.now = 0.0
        self.synced_at = -math.inf
        self.done = self.arrived = self.events = 0
        self.prompt_mean = 2048.0
        self._bar: Any = None

    # ------------------------------------------------------------------ setup helpers

    def _new_core(self, config: ClusterConfig) -> ClusterCore:
        """The cluster core with the simulator's parameters: every worker may move between the prefill and decode
        pools, colocated reservation and the expected output growth (``expected_output_tokens``) as configured,
        the arrival rate divided by the time elapsed while under the window (the run starts at 0)."""
        movable = (PREFILL, DECODE)
        registry = WorkerRegistry()
        placer = Placer(registry, config.max_prefill_backlog_tokens, config.max_decode_sequences,
                        colocated_reserve=config.colocated_reserve, movable_roles=movable,
                        expected_output_tokens=config.expected_output_tokens)
        policy = POOL_POLICIES.create(config.pool_policy.name, **config.pool_policy.knobs)
        pools = PoolManager(registry, policy, config.pool_tick_s, movable_roles=movable,
                            arrivals=ArrivalRate(divide_by_elapsed=True))
        return ClusterCore(self.admission, registry, placer, pools)

    def new_policy(self, role: str) -> BatchPolicy:
        """A fresh batch policy for a worker in ``role``, as configured."""
        spec = {PREFILL: self.config.prefill_policy, DECODE: self.config.decode_policy,
                COLOCATED: self.config.colocated_policy}[role]
        return BATCH_POLICIES.create(spec.name, **spec.knobs)

    def core_state(self, worker: Worker) -> WorkerState:
        """The core's view of ``worker`` (its reservations and backlog)."""
        return self.core.workers.workers[self.core_id[worker.index]]

    # ------------------------------------------------------------------ event loop

    def schedule_worker(self, worker: Worker) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (worker.t_end, self.counter, EV_WORKER, worker.index, worker.generation))

    def run(self) -> RunResult:
        enabled = gc.isenabled()
        gc.disable()  # millions of short-lived objects, no cycles worth collecting mid-run: ~20% faster
        try:
            return self._run()
        finally:
            if enabled:
                gc.enable()

    def _run(self) -> RunResult:
        specs = self.specs
        n = len(specs)
        arrivals = [s.arrival_time for s in specs]
        heap = self.heap
        workers = self.workers
        until = self.until if self.until is not None else math.inf
        if self.config.pool_policy.name != "static":
            self.push(self.config.pool_tick_s, EV_POOL, 0, 0)
            self.pool_moves.history.append((0.0, self.pool_moves.count(Pool.PREFILL),
                                            self.pool_moves.count(Pool.DECODE)))
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=n, unit="req", desc="simulating", mininterval=0.5)
        ptr = 0
        pop = heapq.heappop
        stopped = False
        while True:
            next_arrival = arrivals[ptr] if ptr < n else math.inf
            if heap and heap[0][0] < next_arrival:
                t, _, kind, a, b = heap[0]
                if t > until:
                    stopped = True
                    break
                pop(heap)
                self.now = t
                self.events += 1
                if kind == EV_WORKER:
                    worker = workers[a]
                    if worker.generation == b and worker.busy:
                        worker.finish()
                elif kind == EV_HANDOFF:
                    self._land(a, workers[b], t)
                elif kind == EV_DISPATCH:
                    seq = self.req_seq[a]
                    assert seq is not None
                    self._enqueue(workers[b], seq, t)
                else:
                    self.pool_moves.tick(t, ptr < n)
            elif next_arrival < math.inf:
                if next_arrival > until:
                    stopped = True
                    break
                self.now = next_arrival
                self._arrive(ptr, next_arrival)
                ptr += 1
            else:
                break
        end = until if stopped else self.now
        if self._bar is not None:
            self._bar.close()
        return assemble_result(self, end)

    def push(self, t: float, kind: int, a: int, b: int) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (t, self.counter, kind, a, b))

    def _tick_progress(self) -> None:
        self.done += 1
        if self._bar is not None and self.done % 256 == 0:
            self._bar.update(256)

    # ------------------------------------------------------------------ coordinator

    def _arrive(self, i: int, now: float) -> None:
        spec = self.specs[i]
        self.arrived += 1
        self.core.pools.on_arrival(spec.prompt_len, now)  # every arrival, refused or not
        self.prompt_mean += (spec.prompt_len - self.prompt_mean) / self.arrived
        max_tokens = spec.max_tokens
        assert max_tokens is not None  # RequestSpec fills it
        if spec.prompt_len > self.max_positions or not self.core.fits_anywhere(spec.prompt_len, max_tokens):
            self._reject(i, now)
            return
        self._sync(now)
        pending = PendingRequest(spec.request_id, spec.client_id, spec.prompt_len, max_tokens, spec.arrival_time,
                                 weight=spec.weight, tier=spec.tier)
        record = RequestRecord(spec.request_id, spec.client_id, spec.prompt_len, max_tokens, payload=i)
        if self.core.submit(record, pending, now) is not None:
            self._reject(i, now)
            return
        self.req_record[i] = record
        self.admit(now)

    def _reject(self, i: int, now: float) -> None:
        self.status[i] = STATUS_CODES["rejected"]
        self.times["finish"][i] = now
        self._tick_progress()

    def _sync(self, now: float) -> None:
        """Charge the admission policy for every token produced by ``now``."""
        if self.tracks_tokens and now > self.synced_at:
            self.synced_at = now
            for worker in self.workers:
                if worker.busy and worker.stretch:
                    worker.sync_tokens(now)

    def admit(self, now: float) -> None:
        self._sync(now)
        for dispatch in self.core.admit(now):
            self._dispatch(dispatch, now)


    def _target(self, i: int) -> int:
        """Output tokens request ``i`` produces: its output length, fewer if it would reach ``max_positions``."""
        spec = self.specs[i]
        return max(1, min(spec.output_len, self.max_positions - spec.prompt_len))

    def _seq(self, i: int, **state: Any) -> SimSeq:
        """Request ``i``'s sequence in an engine, in the given ``state`` (``SequenceState`` fields)."""
        spec = self.specs[i]
        return SimSeq(request_id=spec.request_id, arrival_time=spec.arrival_time, prompt_len=spec.prompt_len,
                      tbt_slo_s=spec.tbt_slo_s, ttft_slo_s=spec.ttft_slo_s, tier=spec.tier, idx=i,
                      target=self._target(i), client=spec.client_id, tier_idx=self.tier_of[i], slo=self.slo[i],
                      **state)

    def _dispatch(self, dispatch: Dispatch, now: float) -> None:
        """Send an admitted request to its worker(s); the core has accounted it. A disaggregated one first waits
        for its decode reservation (``grant_reservations``)."""
        i = self.index_of[dispatch.request_id]
        prefill = self.worker_of[dispatch.prefill_worker]
        decode = self.worker_of[dispatch.decode_worker]
        self.times["admitted"][i] = now
        self.req_prefill[i], self.req_decode[i], self.req_blocks[i] = prefill.index, decode.index, 0
        decode.num_requests += 1
        admit = kv_rules.blocks_to_admit(self.specs[i].prompt_len, self.block_size)
        seq = self.req_seq[i] = self._seq(i, blocks_to_admit=admit, preemptible=dispatch.colocated)  # not prefill-only
        if dispatch.colocated:
            self._send_to(prefill, i, seq, now)
            return
        prefill.num_requests += 1
        self.req_blocks[i] = dispatch.decode_blocks
        decode.pending_reservations.append(i)
        if len(decode.pending_reservations) == 1:
            self.grant_reservations(decode, now)

    def grant_reservations(self, decode: Worker, now: float) -> None:
        """Grant ``decode``'s pending reservations in FIFO order while they fit (``Worker.reserve``), sending each
        granted request to its prefill worker."""
        pending = decode.pending_reservations
        while pending and decode.reserve(self.req_blocks[pending[0]], now):
            i = pending.popleft()
            seq = self.req_seq[i]
            assert seq is not None
            self._send_to(self.workers[self.req_prefill[i]], i, seq, now)

    def _send_to(self, worker: Worker, i: int, seq: SimSeq, now: float) -> None:
        """Request ``i`` reaches ``worker``'s queue after the control path's ``dispatch_latency_s``."""
        if self.config.dispatch_latency_s > 0:
            self.push(now + self.config.dispatch_latency_s, EV_DISPATCH, i, worker.index)
        else:
            self._enqueue(worker, seq, now)

    def _enqueue(self, worker: Worker, seq: SimSeq, now: float) -> None:
        worker.add_waiting(seq)
        worker.wake(now)

    # ------------------------------------------------------------------ worker callbacks

    def on_prefill_start(self, worker: Worker, seq: SimSeq, now: float) -> None:
        if math.isnan(self.times["prefill_start"][seq.idx]):
            self.times["prefill_start"][seq.idx] = now

    def preempted(self, seq: SimSeq, now: float) -> None:
        """``seq`` was preempted at ``now``: keep the request's first preemption time and count them."""
        i = seq.idx
        if self.req_preemptions[i] == 0:
            self.times["preempted"][i] = now
        self.req_preemptions[i] += 1

    def first_token(self, worker: Worker, seq: SimSeq, t: float) -> None:
        """The last prompt chunk ended at ``t``: the first token is sampled and the prompt leaves the backlog."""
        i = seq.idx
        seq.num_output = 1
        seq.last_token_time = t
        self.times["first_token"][i] = t
        self.times["prefill_end"][i] = t
        if self.token_times is not None:
            self.token_times[i].append(t)
        record = self.req_record[i]
        assert record is not None
        self.core.release_prefill(record)
        if worker.role == PREFILL:
            worker.num_requests -= 1
            if self.tracks_tokens:
                self.admission.on_output_tokens(seq.client, 1)
        else:  # the prompt left a colocated worker's backlog: the coordinator retries admission (its TokenReport)
            self.admit(t)

    def prefilled(self, worker: Worker, seq: SimSeq, t: float) -> None:
        """A prefill worker exported ``seq``'s KV at ``t``: it travels to the decode worker that reserved room."""
        i = seq.idx
        spec = self.specs[i]
        blocks = blocks_for(spec.prompt_len, self.block_size)
        nbytes = blocks * self.block_size * self.cost.kv_bytes_per_token
        arrive = t + self.config.handoff_latency_s + nbytes / self.config.handoff_bandwidth_Bps
        self.times["handoff_start"][i] = t
        self.times["handoff_end"][i] = arrive
        self.push(arrive, EV_HANDOFF, i, self.req_decode[i])
        self.admit(t)

    def _land(self, i: int, decode: Worker, t: float) -> None:
        prompt_len, blocks = self.specs[i].prompt_len, self.req_blocks[i]
        seq = self.req_seq[i] = self._seq(
            i, num_computed=prompt_len, num_output=1, blocks_held=blocks, last_token_time=self.times["first_token"][i],
            blocks_to_step=kv_rules.blocks_to_step(prompt_len, blocks, self.block_size))
        decode.add_running(seq)
        decode.wake(t)

    def finished(self, worker: Worker, seq: SimSeq, t: float) -> None:
        i = seq.idx
        self.times["finish"][i] = t
        self.status[i] = STATUS_CODES["finished"]
        self.num_tokens[i] = seq.num_output
        self._tick_progress()
        record = self.req_record[i]
        assert record is not None
        self.core.release_decode(record)
        record.decode_holds = record.prefill_holds = False
        self.core.end(record)
        self.req_record[i] = None
        if worker.role == PREFILL:  # finished with its first token: release the decode reservation
            decode = self.workers[self.req_decode[i]]
            decode.blocks.free(self.req_blocks[i])
            decode.num_requests -= 1
            if decode.pending_reservations:
                self.grant_reservations(decode, t)
            self.pool_moves.maybe_switch(decode, t)
        else:
            worker.num_requests -= 1
        self.admit(t)

    def switch_role(self, worker: Worker, now: float) -> None:
        """``sim.worker``: a draining worker is empty."""
        self.pool_moves.switch_role(worker, now)


def simulate(config: ClusterConfig, specs: list[RequestSpec], until: float | None = None,
             progress: bool = False) -> RunResult:
    """Run ``specs`` on the cluster ``config``; see the module docstring."""
    return Simulator(config, specs, until, progress).run()
