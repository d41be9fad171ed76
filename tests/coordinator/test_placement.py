"""Decode placement capped at ``max_decode_sequences`` requests per worker (the rule of the simulator's placement),
the pool the admission queue waits for, and the pool statistics built from it."""

from __future__ import annotations

import argparse
import asyncio

import pytest
import zmq.asyncio

from diptych.proto.messages import KVReserved, RegisterWorker, RequestDone, ReserveKV, SubmitRequest, WorkerLoad
from diptych.services.coordinator.config import CoordinatorConfig, add_arguments, from_args
from diptych.services.coordinator.placement import Placer
from diptych.services.coordinator.pools import PoolManager
from diptych.services.coordinator.server import Coordinator
from diptych.services.coordinator.workers import WorkerRegistry
from tests.coordinator.test_coordinator import LAYOUT, Peer, request
from tests.integration.conftest import free_port_block


def registry(decode_blocks: int = 1000, prefill_tps: float = 10_000.0, flex: int = 0) -> WorkerRegistry:
    workers = WorkerRegistry(heartbeat_timeout_s=10.0)
    for name, role, blocks, tps in (("prefill-0", "prefill", 1000, prefill_tps),
                                    ("decode-0", "decode", decode_blocks, 0), ("decode-1", "decode", decode_blocks, 0)):
        load = WorkerLoad(blocks, blocks, 0, 0, 0, prefill_tps=tps)
        assert workers.register(RegisterWorker(name, role, "m", LAYOUT, "tcp://x" if role == "decode" else "", load,
                                               4096), name.encode(), 0.0) is None
    for i in range(flex):
        load = WorkerLoad(decode_blocks, decode_blocks, 0, 0, 0)
        assert workers.register(RegisterWorker(f"flex-{i}", "flex", "m", LAYOUT, "tcp://x", load, 4096),
                                b"f", 0.0) is None
    return workers


def test_a_decode_worker_takes_at_most_max_decode_sequences():
    placer = Placer(registry(), max_backlog_tokens=10**6, max_decode_sequences=2)
    placed = []
    for _ in range(5):
        placement = placer.place(32, 32)
        if placement is None:
            break
        placer.commit(placement)
        placed.append(placement.decode.worker_id)
    assert sorted(placed) == ["decode-0", "decode-0", "decode-1", "decode-1"]  # KV holds many more
    assert placer.waiting_for == "decode"
    placer.release_decode("decode-1")
    placement = placer.place(32, 32)
    assert placement is not None and placement.decode.worker_id == "decode-1" and placer.waiting_for is None
    placer.forget("decode-0")  # evicted: a worker that re-registers under the id starts from zero
    assert placer.decode_sequences == {"decode-1": 1}
    with pytest.raises(ValueError):
        Placer(registry(), 4096, 0)


def test_waiting_for_names_the_pool_without_room():
    workers = registry(decode_blocks=10)
    placer = Placer(workers, max_backlog_tokens=100, max_decode_sequences=8)
    assert placer.place(32, 1000) is None and placer.waiting_for == "decode"  # 66 blocks > 10
    workers.get("prefill-0").backlog_tokens = 90
    assert placer.place(32, 32) is None and placer.waiting_for == "prefill"  # 90 + 32 > 100 tokens of backlog
    assert placer.place(32, 1000) is None and placer.waiting_for == "decode"  # decode first when both are full


def test_a_queue_waiting_for_decode_kv_counts_as_decode_kv_not_prefill_backlog():
    workers = registry(decode_blocks=100, flex=0)
    workers.get("decode-0").reserved_blocks = 90
    workers.get("prefill-0").backlog_tokens = 500
    pools = PoolManager(workers, "rad")
    stats = pools.stats(0.0, queued_prompt_tokens=1600, waiting_for_kv=True)
    assert stats.queued_prompt_tokens == 500 and stats.kv_waiting == pytest.approx(100 / 200)  # 1600 tokens/16
    assert stats.decode_kv_utilization == pytest.approx(90 / 200) and stats.draining_workers == 0
    assert stats.decode_tokens_per_s is None and stats.decode_capacity_tps is None
    stats = pools.stats(0.0, queued_prompt_tokens=1600, waiting_for_kv=False)
    assert stats.queued_prompt_tokens == 2100 and stats.kv_waiting == 0.0


def test_a_decision_to_move_several_workers_drains_that_many_flex_workers():
    workers = registry(flex=5)  # each flex worker joins the smaller pool (prefill on a tie): 4:4 in all
    assert [w.pool for w in workers.workers.values() if w.role == "flex"] == ["prefill", "prefill", "decode",
                                                                              "prefill", "decode"]
    pools = PoolManager(workers, "rad", {"min_dwell_s": 0.0})
    pools.tick(1.0, queued_prompt_tokens=10**6, waiting_for_kv=False)  # 25 s of prefill backlog: 7:1 is best
    assert "4:4 -> 7:1" in pools.moves[0]["reason"]
    moving = [w.worker_id for w in workers.workers.values() if w.draining_to == "prefill"]
    assert moving == ["flex-2", "flex-4"] and len(pools.moves) == 2  # fixed-role decode workers never move
    assert pools.stats(2.0, 0, False).draining_workers == 2


def test_cli_knob():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--max-decode-sequences" in parser.format_help()
    assert from_args(parser.parse_args([])).max_decode_sequences == 1024
    assert from_args(parser.parse_args(["--max-decode-sequences", "256"])).max_decode_sequences == 256
    with pytest.raises(ValueError, match="max_decode_sequences"):
        CoordinatorConfig(max_decode_sequences=0)


async def test_the_coordinator_holds_requests_back_at_the_cap():
    addr = f"tcp://127.0.0.1:{free_port_block(1)}"
    coordinator = Coordinator(CoordinatorConfig(address=addr, max_decode_sequences=1, watchdog_interval_s=0.1))
    stop = asyncio.Event()
    task = asyncio.create_task(coordinator.run(stop))
    ctx = zmq.asyncio.Context()
    peers = {name: Peer(ctx, addr, name) for name in ("frontend", "prefill-0", "decode-0")}
    try:
        for name, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
            await peers[name].send(RegisterWorker(name, role, "m", LAYOUT, "tcp://127.0.0.1:1" if role == "decode"
                                                  else "", WorkerLoad(64, 64, 0, 0, 0), 512))
            assert (await peers[name].recv()).ok
        for rid in ("a", "b"):  # 2 blocks each of 64: only the cap holds b back
            await peers["frontend"].send(SubmitRequest(request(rid)))
        reserve = await peers["decode-0"].recv()
        assert isinstance(reserve, ReserveKV) and reserve.request_id == "a"
        await peers["decode-0"].expect_nothing()
        assert coordinator.placer.waiting_for == "decode"
        await peers["decode-0"].send(KVReserved("a", "decode-0", True))
        await peers["prefill-0"].recv()
        await peers["decode-0"].send(RequestDone("a", "decode-0", "abort"))
        reserve = await peers["decode-0"].recv()
        assert isinstance(reserve, ReserveKV) and reserve.request_id == "b"
        assert coordinator.placer.decode_sequences == {"decode-0": 1}
    finally:
        stop.set()
        await task
        for peer in peers.values():
            peer.sock.close()
        ctx.term()
