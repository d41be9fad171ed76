"""The cluster core under faults and overload: bounded admission queue with explicit shedding, request deadlines,
releases of a request ended before its workers hold it, eviction of a prefill worker with requests reserving KV
for it, and requests that wait for an empty pool instead of being refused."""

from __future__ import annotations

from collections import Counter

import pytest

from diptych.cluster.core import ClusterCore
from diptych.cluster.overload import QueueLimits, Shed
from diptych.cluster.placement import Placer
from diptych.cluster.pools import PoolManager
from diptych.cluster.requests import RequestRecord
from diptych.cluster.workers import WorkerRegistry
from diptych.policies.admission import ADMISSION_POLICIES, PendingRequest
from diptych.policies.pool import POOL_POLICIES
from diptych.proto.roles import RequestPhase
from tests.cluster.test_core import core, submit


def limited_core(limits: QueueLimits) -> ClusterCore:
    registry = WorkerRegistry()
    placer = Placer(registry, 4096, 8)
    return ClusterCore(ADMISSION_POLICIES.create("fcfs"), registry, placer,
                       PoolManager(registry, POOL_POLICIES.create("static")), limits=limits)


def offer(c: ClusterCore, rid: str, prompt: int, client: str = "alice") -> Shed | None:
    record = RequestRecord(rid, client, prompt, 8)
    answer = c.submit(record, PendingRequest(rid, client, prompt, 8, 0.0), 0.0)
    assert answer is None or isinstance(answer, Shed)
    return answer


def test_a_full_queue_sheds_new_requests_with_503_and_retry_after_and_takes_them_again_once_drained():
    c = limited_core(QueueLimits(max_requests=2, max_tokens=1000, retry_after_s=2.0))
    assert offer(c, "a", 10) is None and offer(c, "b", 10) is None
    shed = offer(c, "c", 10)
    assert shed == Shed(503, "admission queue full (2 requests queued)", 2.0)
    assert "c" not in c.requests and len(c.admission) == 2
    a = c.requests.get("a")
    assert a is not None
    c.end(a)
    assert c.queued_by_client == Counter(alice=1) and offer(c, "c", 10) is None


def test_the_token_bound_sheds_but_an_empty_queue_takes_any_one_request():
    c = limited_core(QueueLimits(max_requests=100, max_tokens=50))
    assert offer(c, "huge", 500) is None  # alone in the queue: taken
    shed = offer(c, "small", 1)
    assert shed is not None and shed.code == 503 and "prompt tokens" in shed.reason


def test_under_fair_sharing_the_client_over_its_share_gets_429_and_the_others_503():
    c = limited_core(QueueLimits(max_requests=3, per_client=True))
    for rid in ("a1", "a2"):
        assert offer(c, rid, 5, client="alice") is None
    assert offer(c, "b1", 5, client="bob") is None
    alice, bob, carol = offer(c, "a3", 5, "alice"), offer(c, "b2", 5, "bob"), offer(c, "c1", 5, "carol")
    assert alice is not None and alice.code == 429
    assert bob is not None and bob.code == 503  # one of three queued: under its share of two clients
    assert carol is not None and carol.code == 503


def test_limits_are_validated():
    with pytest.raises(ValueError):
        QueueLimits(max_requests=0)
    with pytest.raises(ValueError):
        QueueLimits(retry_after_s=0)


def test_requests_past_their_deadline_are_overdue_only_before_they_reach_a_prefill_worker():
    c = core({"p0": ("prefill", 100), "d0": ("decode", 4)})
    big, queued = submit(c, "big", 20, 40), submit(c, "queued", 20, 40)
    big.deadline = queued.deadline = 5.0
    c.admit(0.0)
    assert big.phase is RequestPhase.RESERVING and queued.phase is RequestPhase.QUEUED
    assert c.requests.overdue(4.0) == [] and c.requests.overdue(6.0) == [big, queued]
    big.phase = RequestPhase.PREFILLING
    assert c.requests.overdue(6.0) == [queued]


def test_a_request_cancelled_while_reserving_gives_back_the_prefill_backlog_at_once():
    c = core({"p0": ("prefill", 100), "d0": ("decode", 40)})
    r = submit(c, "r", 20, 12)
    c.admit(0.0)
    p0, d0 = c.workers.workers["p0"], c.workers.workers["d0"]
    assert (p0.backlog_tokens, d0.reserved_blocks) == (20, 2)
    c.release_unheld(r)  # the decode worker holds the reservation; the prompt never reached p0
    assert c.end(r) == ["d0"]
    assert (p0.backlog_tokens, p0.backlog_blocks, p0.prefill_requests) == (0, 0, 0) and d0.reserved_blocks == 2
    r.decode_holds = False
    c.release_decode(r)
    c.requests.drop_if_released(r)
    assert d0.reserved_blocks == 0 and "r" not in c.requests


def test_evicting_a_prefill_worker_returns_the_requests_reserving_kv_for_it():
    c = core({"p0": ("prefill", 100), "d0": ("decode", 40)})
    r = submit(c, "r", 20, 12)
    c.admit(0.0)
    _, affected = c.evict("p0")
    assert affected == [r] and not r.prefill_accounted and r.decode_holds


def test_a_request_waits_for_an_empty_pool_but_one_too_large_for_the_workers_there_is_refused():
    c = core({"d0": ("decode", 4)})
    assert not c.never_fits(20, 12)  # no prefill worker yet: it may come
    assert not c.never_fits(20, 10**6)  # max_tokens is not compared with pools: the engine stops at its pool
    assert c.never_fits(64, 2)  # d0 can never hold the prompt and its first decode (65 positions, 5 blocks)
    assert not c.never_fits(64, 1)  # finished by its prefill: the prompt's 4 blocks are all d0 needs
    c = core({"p0": ("prefill", 4), "d0": ("decode", 100)})
    assert c.never_fits(100, 1) and not c.never_fits(20, 1)
    assert not core({}).never_fits(10**6, 10**6)


def test_held_counts_match_held_by():
    c = core({"p0": ("prefill", 100), "d0": ("decode", 40), "d1": ("decode", 40)})
    for rid in ("a", "b", "c"):
        submit(c, rid, 20, 12)
    c.admit(0.0)
    counts = c.requests.held_count()
    assert counts == {w: len(c.requests.held_by(w)) for w in ("d0", "d1") if c.requests.held_by(w)}
