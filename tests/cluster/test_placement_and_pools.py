"""The cluster core's placement and pools: decode placement capped at ``max_decode_sequences`` requests per
worker, the pool the admission queue waits for, and the pool statistics built from it."""

from __future__ import annotations

import pytest

from diptych.cluster.accounting import commit, release_decode
from diptych.cluster.placement import Placement, Placer
from diptych.cluster.pools import PoolManager
from diptych.cluster.requests import RequestRecord
from diptych.cluster.workers import WorkerRegistry
from diptych.policies.pool import POOL_POLICIES

BLOCK = 16


def registry(decode_blocks: int = 1000, flex: int = 0) -> WorkerRegistry:
    workers = WorkerRegistry(heartbeat_timeout_s=10.0)
    for name, role, blocks in (("prefill-0", "prefill", 1000), ("decode-0", "decode", decode_blocks),
                               ("decode-1", "decode", decode_blocks)):
        assert workers.register(name, role, blocks, BLOCK, 0.0, model="m") is None
    for i in range(flex):
        assert workers.register(f"flex-{i}", "flex", decode_blocks, BLOCK, 0.0, model="m") is None
    return workers


def place_and_commit(placer: Placer, prompt: int, max_tokens: int) -> tuple[Placement | None, RequestRecord]:
    record = RequestRecord(f"r{id(placer)}", "c", prompt, max_tokens)
    placement = placer.place(prompt, max_tokens)
    if placement is not None:
        commit(placer.registry, record, placement, 0.0)
    return placement, record


def test_a_decode_worker_takes_at_most_max_decode_sequences():
    workers = registry()
    placer = Placer(workers, max_backlog_tokens=10**6, max_decode_sequences=2)
    placed, records = [], []
    for _ in range(5):
        placement, record = place_and_commit(placer, 32, 32)
        if placement is None:
            break
        placed.append(placement.decode_worker)
        records.append(record)
    assert sorted(placed) == ["decode-0", "decode-0", "decode-1", "decode-1"]  # KV holds many more
    assert placer.waiting_for == "decode"
    release_decode(workers, next(r for r in records if r.decode_worker == "decode-1"))
    placement = placer.place(32, 32)
    assert placement is not None and placement.decode_worker == "decode-1" and placer.waiting_for is None
    workers.remove("decode-0")  # evicted: a worker that re-registers under the id starts from zero
    assert workers.register("decode-0", "decode", 1000, BLOCK, 0.0, model="m") is None
    assert {w.worker_id: w.decode_requests for w in workers.workers.values()} == {
        "prefill-0": 0, "decode-1": 1, "decode-0": 0}
    with pytest.raises(ValueError):
        Placer(registry(), 4096, 0)


def test_waiting_for_names_the_pool_without_room():
    workers = registry(decode_blocks=10)
    for name in ("decode-0", "decode-1"):
        workers.workers[name].reserved_blocks = 5
    placer = Placer(workers, max_backlog_tokens=100, max_decode_sequences=8)
    assert placer.place(32, 1000) is None and placer.waiting_for == "decode"  # footprint min(34, 10) > 5 free
    placement = placer.place(32, 32)  # footprint 4 blocks
    assert placement is not None and placement.reserved_blocks == 4 and placer.waiting_for is None
    workers.workers["prefill-0"].backlog_tokens = 90
    assert placer.place(32, 32) is None and placer.waiting_for == "prefill"  # 90 + 32 > 100 tokens of backlog
    assert placer.place(32, 1000) is None and placer.waiting_for == "decode"  # decode first when both are full


def test_a_queue_waiting_for_decode_kv_counts_as_decode_kv_not_prefill_backlog():
    workers = registry(decode_blocks=100, flex=0)
    workers.workers["decode-0"].reserved_blocks = 90
    workers.workers["prefill-0"].backlog_tokens = 500
    pools = PoolManager(workers, POOL_POLICIES.create("rad"))
    stats = pools.stats(0.0, queued_prompt_tokens=1600, waiting_for_kv=True, prefill_tps=10_000.0, running_decodes=0)
    assert stats is not None
    assert stats.queued_prompt_tokens == 500 and stats.kv_waiting == pytest.approx(100 / 200)  # 1600 tokens/16
    assert stats.decode_kv_utilization == pytest.approx(90 / 200) and stats.draining_workers == 0
    assert stats.decode_tokens_per_s is None and stats.decode_capacity_tps is None
    stats = pools.stats(0.0, queued_prompt_tokens=1600, waiting_for_kv=False, prefill_tps=10_000.0,
                        running_decodes=0)
    assert stats is not None and stats.queued_prompt_tokens == 2100 and stats.kv_waiting == 0.0
    assert pools.stats(0.0, 0, False, prefill_tps=None, running_decodes=0) is None  # nothing measured yet


def test_a_decision_to_move_several_workers_drains_that_many_flex_workers():
    workers = registry(flex=5)  # each flex worker joins the smaller pool (prefill on a tie): 4:4 in all
    assert [w.pool for w in workers.workers.values() if w.role == "flex"] == ["prefill", "prefill", "decode",
                                                                              "prefill", "decode"]
    pools = PoolManager(workers, POOL_POLICIES.create("rad", min_dwell_s=0.0))
    assert pools.due(1.0)
    # 25 s of prefill backlog: 7:1 is best
    moves = pools.decide(pools.stats(1.0, 10**6, False, prefill_tps=10_000.0, running_decodes=0), 1.0)
    assert "4:4 -> 7:1" in pools.moves[0]["reason"]
    moving = [w.worker_id for w in workers.workers.values() if w.draining_to == "prefill"]
    assert moving == ["flex-2", "flex-4"] == [m.worker_id for m in moves]  # fixed-role decode workers never move
    stats = pools.stats(2.0, 0, False, prefill_tps=10_000.0, running_decodes=0)
    assert stats is not None and stats.draining_workers == 2
    assert [w.worker_id for w in pools.drained()] == ["flex-2", "flex-4"]  # they hold nothing
    pools.complete_drain("flex-2", 3.0)
    assert workers.workers["flex-2"].pool == "prefill" and pools.moves[0]["completed"] == 3.0
