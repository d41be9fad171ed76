"""KV memory on demand, as the cluster core places it: each request is accounted its expected footprint on the worker
that decodes it (prompt + min(max_tokens, expected_output_tokens), capped at the pool), the decode engine reserves
only the prompt's blocks, real memory may be over-committed while the queue is bounded by footprints, max_tokens never
refuses a request, and a refused reservation keeps its place and is retried with backoff."""

from __future__ import annotations

import pytest

from diptych.cluster.blocks import blocks_for
from diptych.cluster.core import RESERVE_RETRY_S, ClusterCore, Dispatch
from diptych.cluster.placement import DEFAULT_EXPECTED_OUTPUT_TOKENS, Placer
from diptych.cluster.pools import PoolManager
from diptych.cluster.workers import WorkerRegistry
from diptych.policies.admission import ADMISSION_POLICIES
from diptych.policies.pool import POOL_POLICIES
from diptych.proto.roles import RequestPhase
from tests.cluster.test_core import BLOCK, core, submit

CONTEXT = 32768
"""A model context much larger than the pools below."""


def core_expecting(workers: dict[str, tuple[str, int]], expected_output_tokens: int) -> ClusterCore:
    registry = WorkerRegistry()
    for worker_id, (role, blocks) in workers.items():
        assert registry.register(worker_id, role, blocks, BLOCK, 0.0, model="m") is None
    placer = Placer(registry, 4096, 64, expected_output_tokens=expected_output_tokens)
    return ClusterCore(ADMISSION_POLICIES.create("fcfs"), registry, placer,
                       PoolManager(registry, POOL_POLICIES.create("static")))


def test_the_decode_worker_is_accounted_the_expected_footprint_and_reserves_the_prompt():
    c = core({"p0": ("prefill", 1000), "d0": ("decode", 100)})
    for rid in ("a", "b", "c"):
        submit(c, rid, 100, 4000)  # footprint blocks_for(100 + 512) = 39; whole outputs would take 257 blocks each
    assert c.admit(0.0) == [Dispatch("a", "p0", "d0", 7, 7, False), Dispatch("b", "p0", "d0", 7, 7, False)]
    d0 = c.workers.workers["d0"]
    assert d0.reserved_blocks == 2 * 39 and len(c.admission) == 1  # c waits: 22 unreserved blocks < 39
    assert c.waiting_for_kv
    # over-commit by design: the two placed may grow to 2 x 257 blocks of a 100-block pool (their engine preempts)
    assert 2 * blocks_for(100 + 4000, BLOCK) > d0.total_blocks
    a = c.requests.get("a")
    assert a is not None and a.decode_reserved_blocks == 39 and a.decode_blocks == 7
    a.decode_holds = False
    c.release_decode(a)
    assert [d.request_id for d in c.admit(1.0)] == ["c"] and d0.reserved_blocks == 2 * 39


def test_short_outputs_are_accounted_whole_and_the_knob_sets_the_expected_growth():
    c = core({"p0": ("prefill", 1000), "d0": ("decode", 100)})
    submit(c, "short", 100, 60)
    c.admit(0.0)
    assert c.workers.workers["d0"].reserved_blocks == blocks_for(160, BLOCK)  # max_tokens under the expected 512
    assert DEFAULT_EXPECTED_OUTPUT_TOKENS == 512
    prompt_only = core_expecting({"p0": ("prefill", 1000), "d0": ("decode", 100)}, expected_output_tokens=0)
    submit(prompt_only, "r", 100, 4000)
    assert prompt_only.admit(0.0)[0].decode_blocks == 7 and prompt_only.workers.workers["d0"].reserved_blocks == 7
    with pytest.raises(ValueError, match="expected_output_tokens"):
        Placer(WorkerRegistry(), 4096, 8, expected_output_tokens=-1)


def test_a_chat_request_without_max_tokens_is_served_on_a_pool_much_smaller_than_the_context():
    c = core({"p0": ("prefill", 1000), "d0": ("decode", 32)})  # 512 tokens of KV
    prompt, max_tokens = 100, CONTEXT - 100  # what the frontend fills in for a chat request without max_tokens
    assert c.fits_anywhere(prompt, max_tokens) and not c.never_fits(prompt, max_tokens)
    submit(c, "chat", prompt, max_tokens)
    submit(c, "next", prompt, max_tokens)
    assert c.admit(0.0) == [Dispatch("chat", "p0", "d0", 7, 7, False)]
    assert c.workers.workers["d0"].reserved_blocks == 32  # min(blocks_for(612), the pool): a sequence stops there
    assert len(c.admission) == 1  # the next one waits for the footprint to be released
    colocated = core({"c0": ("colocated", 32)})
    assert colocated.fits_anywhere(prompt, max_tokens)
    submit(colocated, "chat", prompt, max_tokens)
    assert colocated.admit(0.0) == [Dispatch("chat", "c0", "c0", 7, 0, True)]
    assert colocated.workers.workers["c0"].reserved_blocks == 32


def test_only_the_prompt_and_its_first_decode_are_compared_with_pools():
    c = core({"p0": ("prefill", 8), "d0": ("decode", 8)})  # 128 tokens each
    assert c.fits_anywhere(127, CONTEXT) and not c.fits_anywhere(128, 2)  # 128 + 1 positions: 9 blocks
    assert c.fits_anywhere(128, 1)  # no decode: the prompt's 8 blocks
    assert not c.fits_anywhere(129, 1)  # the prefill worker cannot hold the prompt
    assert c.never_fits(128, 2)
    submit(c, "edge", 127, CONTEXT)
    dispatch, = c.admit(0.0)
    assert dispatch.decode_blocks == 8 and c.workers.workers["d0"].reserved_blocks == 8


def test_a_refused_reservation_keeps_its_place_and_is_due_again_with_doubling_delays():
    c = core({"p0": ("prefill", 1000), "d0": ("decode", 100)})
    r = submit(c, "r", 100, 20)
    c.admit(0.0)
    d0, p0 = c.workers.workers["d0"], c.workers.workers["p0"]
    accounted = (d0.reserved_blocks, d0.decode_requests, p0.backlog_tokens)
    first, longest = RESERVE_RETRY_S
    delays, now = [], 0.0
    for _ in range(7):
        delay = c.reservation_refused(r, now)
        delays.append(delay)
        assert not r.decode_holds and r.phase is RequestPhase.RESERVING
        assert (d0.reserved_blocks, d0.decode_requests, p0.backlog_tokens) == accounted  # keeps its place
        assert c.requests.next_reservation_retry() == now + delay
        assert c.reservations_due(now + delay / 2) == []
        now += delay
        assert c.reservations_due(now) == [r] and r.decode_holds and r.reserve_retry_at is None
        assert c.reservations_due(now) == []  # handed out once
    assert delays == [min(first * 2 ** k, longest) for k in range(7)] and delays[-1] == longest
    assert r.refused_reservations == d0.refused_reservations == 7


def test_a_request_waiting_to_retry_is_released_by_a_cancel_or_the_decode_workers_eviction():
    c = core({"p0": ("prefill", 1000), "d0": ("decode", 100)})
    cancelled, lost = submit(c, "cancelled", 100, 20), submit(c, "lost", 100, 20)
    c.admit(0.0)
    for record in (cancelled, lost):
        c.reservation_refused(record, 0.0)
    c.release_unheld(cancelled)  # the coordinator's cancel: no worker holds it, nothing to wait for
    assert c.end(cancelled) == [] and "cancelled" not in c.requests
    assert c.reservations_due(10.0) == [lost]
    c.reservation_refused(lost, 10.0)
    worker, affected = c.evict("d0")
    assert worker is not None and affected == [lost]  # waiting on d0 though d0 holds nothing
    assert not lost.decode_accounted and lost.prefill_accounted  # the driver ends it, releasing the prefill side
    c.release_unheld(lost)
    assert c.workers.workers["p0"].backlog_tokens == 0
