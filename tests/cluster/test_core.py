"""The cluster core driven directly, with a fake clock: admission and placement, footprint and backlog released
exactly once, endings, eviction and liveness, drains, and the service ledger."""

from __future__ import annotations

from diptych.cluster.core import ClusterCore, Dispatch
from diptych.cluster.placement import Placer
from diptych.cluster.pools import ArrivalRate, PoolManager
from diptych.cluster.requests import RequestRecord
from diptych.cluster.workers import WorkerRegistry
from diptych.policies.admission import ADMISSION_POLICIES, PendingRequest
from diptych.policies.pool import POOL_POLICIES, PoolDecision
from diptych.proto.roles import Pool, RequestPhase
from tests.cluster.fakes import FakeClock

BLOCK = 16


def core(workers: dict[str, tuple[str, int]], max_backlog: int | None = 4096, max_decodes: int = 8,
         heartbeat_timeout_s: float = 10.0, clock: FakeClock | None = None) -> ClusterCore:
    now = clock() if clock is not None else 0.0
    registry = WorkerRegistry(heartbeat_timeout_s)
    for worker_id, (role, blocks) in workers.items():
        assert registry.register(worker_id, role, blocks, BLOCK, now, model="m", layout=("layout", BLOCK)) is None
    placer = Placer(registry, max_backlog, max_decodes)
    pools = PoolManager(registry, POOL_POLICIES.create("static"))
    return ClusterCore(ADMISSION_POLICIES.create("fcfs"), registry, placer, pools)


def submit(c: ClusterCore, rid: str, prompt: int, max_tokens: int, now: float = 0.0,
           client: str = "alice") -> RequestRecord:
    record = RequestRecord(rid, client, prompt, max_tokens)
    assert c.submit(record, PendingRequest(rid, client, prompt, max_tokens, now), now) is None
    return record


def test_admission_places_in_order_and_stops_at_the_first_that_does_not_fit():
    c = core({"p0": ("prefill", 100), "d0": ("decode", 10), "d1": ("decode", 8)})
    submit(c, "a", 20, 12)   # footprint 2 blocks
    submit(c, "b", 140, 20)  # footprint 10 blocks; its 141 positions (9 blocks) never fit d1
    submit(c, "c", 20, 12)   # would fit, but waits behind b
    assert c.queued_prompt_tokens == 180
    first = c.admit(1.0)
    assert first == [Dispatch("a", "p0", "d0", 2, 2, False)]  # d0 has the most unreserved blocks
    assert c.waiting_for_kv and c.queued_prompt_tokens == 160
    a = c.requests.get("a")
    assert a is not None and a.phase is RequestPhase.RESERVING and a.admitted_time == 1.0
    assert c.ledger.snapshot()["alice"]["input_tokens"] == 20
    a.decode_holds = False
    assert c.release_decode(a) and not c.release_decode(a)  # exactly once
    assert c.workers.workers["d0"].reserved_blocks == 0 and c.workers.workers["d0"].decode_requests == 0
    assert c.admit(2.0) == [Dispatch("b", "p0", "d0", 9, 9, False), Dispatch("c", "p0", "d1", 2, 2, False)]
    assert c.workers.workers["d0"].reserved_blocks == 10 and c.workers.workers["d1"].reserved_blocks == 2
    assert c.workers.workers["p0"].backlog_tokens == 180 and c.workers.workers["p0"].backlog_blocks == 2 + 9 + 2
    assert c.release_prefill(a) and not c.release_prefill(a)
    assert c.workers.workers["p0"].backlog_tokens == 160 and c.workers.workers["p0"].backlog_blocks == 11


def test_colocated_placement_accounts_the_expected_footprint_and_no_prompt_blocks():
    c = core({"c0": ("colocated", 50), "c1": ("colocated", 50)}, max_backlog=100)
    submit(c, "a", 80, 20)  # footprint blocks_for(100) = 7, prompt 5 blocks
    submit(c, "b", 40, 8)
    dispatches = c.admit(0.0)
    assert dispatches == [Dispatch("a", "c0", "c0", 5, 0, True), Dispatch("b", "c1", "c1", 3, 0, True)]
    c0 = c.workers.workers["c0"]
    assert (c0.reserved_blocks, c0.backlog_tokens, c0.backlog_blocks) == (7, 80, 0)
    a = c.requests.get("a")
    assert a is not None and a.phase is RequestPhase.DECODING and not a.prefill_holds and a.decode_holds
    c.release_prefill(a)  # first token: the prompt left the backlog, the footprint stays
    assert (c0.reserved_blocks, c0.backlog_tokens) == (7, 0)


def test_ending_a_queued_request_frees_its_place_and_an_admitted_one_names_its_holders():
    c = core({"p0": ("prefill", 100), "d0": ("decode", 4)})
    submit(c, "big", 20, 40)
    submit(c, "queued", 20, 40)
    assert [d.request_id for d in c.admit(0.0)] == ["big"]
    queued = c.requests.get("queued")
    assert queued is not None and c.end(queued) == [] and "queued" not in c.requests
    assert len(c.admission) == 0 and c.queued_prompt_tokens == 0
    big = c.requests.get("big")
    assert big is not None
    big.prefill_holds = True
    assert c.end(big) == ["p0", "d0"] and "big" in c.requests  # held until both let go
    big.prefill_holds = big.decode_holds = False
    c.requests.drop_if_released(big)
    assert "big" not in c.requests


def test_silent_workers_are_found_with_the_clock_and_eviction_forgets_their_accounting():
    clock = FakeClock()
    c = core({"p0": ("prefill", 100), "d0": ("decode", 40)}, heartbeat_timeout_s=1.0, clock=clock)
    submit(c, "r", 20, 12, clock())
    c.admit(clock())
    clock.advance(0.6)
    assert c.workers.heartbeat("p0", clock())
    clock.advance(0.6)
    assert [w.worker_id for w in c.workers.silent(clock())] == ["d0"]
    worker, affected = c.evict("d0")
    assert worker is not None and [r.request_id for r in affected] == ["r"]
    record = affected[0]
    assert not record.decode_holds and not record.decode_accounted and not c.release_decode(record)
    assert c.release_prefill(record) and c.workers.workers["p0"].backlog_tokens == 0
    assert not c.workers.heartbeat("d0", clock())  # gone: it must register again


def test_a_drain_completes_only_once_the_worker_holds_nothing_for_its_old_pool():
    c = core({"p0": ("prefill", 100), "f0": ("flex", 40), "f1": ("flex", 40), "d0": ("decode", 40)})
    assert [w.pool for w in c.workers.workers.values()] == ["prefill", "decode", "prefill", "decode"]
    submit(c, "r", 20, 12)
    assert c.admit(0.0)[0].decode_worker == "f0"  # most unreserved blocks, first registered on a tie
    pools = c.pools
    moves = pools.start_move(PoolDecision("decode", "prefill", "test", workers=5), 1.0)
    assert [m.worker_id for m in moves] == ["f0"]  # the only flex worker in the decode pool; d0 stays
    assert pools.drained() == []  # f0 still holds r's reservation
    assert c.placer.place(20, 12) is not None and c.placer.place(20, 12).decode_worker == "d0"  # type: ignore[union-attr]
    record = c.requests.get("r")
    assert record is not None and c.release_decode(record)
    assert [w.worker_id for w in pools.drained()] == ["f0"]
    pools.complete_drain("f0", 2.0)
    assert c.workers.workers["f0"].pool is Pool.PREFILL and c.workers.workers["f0"].accepting is Pool.PREFILL
    assert pools.snapshot()["moves"][0]["completed"] == 2.0


def test_arrival_rate_divisor_is_a_parameter():
    services, simulator = ArrivalRate(), ArrivalRate(divide_by_elapsed=True)
    for rate in (services, simulator):
        rate.add(1.0, 300)
        rate.add(2.0, 300)
    assert services.rate(3.0) == 600 / 30 and simulator.rate(3.0) == 600 / 3
    assert services.rate(40.0) == simulator.rate(40.0) == 0.0  # older than the window


def test_ledger_counts_input_at_dispatch_and_output_as_charged():
    c = core({"p0": ("prefill", 100), "d0": ("decode", 40)})
    submit(c, "a", 20, 12, client="alice")
    submit(c, "b", 30, 12, client="bob")
    c.admit(0.0)
    c.charge_output("alice", 5)
    snapshot = c.ledger.snapshot()
    assert snapshot["alice"] == {"input_tokens": 20, "output_tokens": 5, "requests": 1, "service": 30.0}
    assert snapshot["bob"]["input_tokens"] == 30 and snapshot["bob"]["output_tokens"] == 0
