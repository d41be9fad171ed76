"""The coordinator over real ZeroMQ sockets, with the test playing the frontend and the workers. Time is a fake
clock the tests advance; the watchdog runs when a test calls it."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from diptych.proto.messages import (
    CancelRequest,
    ClusterStatus,
    Heartbeat,
    KVLayout,
    KVReceived,
    KVReserved,
    PrefillDone,
    PrefillTask,
    RegisterAck,
    RegisterWorker,
    Request,
    RequestDone,
    RequestFailed,
    RequestLost,
    ReserveKV,
    SamplingParams,
    StatusQuery,
    SubmitRequest,
    TokenReport,
    WorkerLoad,
)
from diptych.services.common.sockets import make_socket, recv_message, send_message
from diptych.services.coordinator.config import CoordinatorConfig
from diptych.services.coordinator.server import Coordinator
from tests.cluster.fakes import FakeClock
from tests.integration.conftest import free_port_block

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="float32")


class Peer:
    def __init__(self, ctx, addr, identity):
        self.identity = identity
        self.sock = make_socket(ctx, zmq.DEALER, connect=addr, identity=identity)

    async def send(self, msg):
        await send_message(self.sock, msg)

    async def recv(self, timeout=3.0):
        _, msg = await asyncio.wait_for(recv_message(self.sock), timeout)
        return msg

    async def expect_nothing(self, wait=0.3):
        with pytest.raises(asyncio.TimeoutError):
            await self.recv(timeout=wait)


@pytest.fixture
async def cluster():
    addr = f"tcp://127.0.0.1:{free_port_block(1)}"
    coordinator = Coordinator(CoordinatorConfig(address=addr, heartbeat_timeout_s=1.0, handoff_timeout_s=0.3,
                                                watchdog_interval_s=3600.0), clock=FakeClock())
    stop = asyncio.Event()
    task = asyncio.create_task(coordinator.run(stop))
    ctx = zmq.asyncio.Context()
    peers = {name: Peer(ctx, addr, name) for name in ("frontend", "prefill-0", "decode-0")}

    async def register(name, role, blocks=64, layout=LAYOUT, model="m"):
        kv_addr = "tcp://127.0.0.1:1" if role == "decode" else ""
        load = WorkerLoad(free_blocks=blocks, total_blocks=blocks, num_waiting=0, num_running=0,
                          waiting_prompt_tokens=0)
        await peers[name].send(RegisterWorker(worker_id=name, role=role, model=model, layout=layout, kv_addr=kv_addr,
                                              load=load, max_model_len=1024))
        return await peers[name].recv()

    assert (await register("prefill-0", "prefill")).ok
    assert (await register("decode-0", "decode")).ok
    yield coordinator, peers, register, ctx
    stop.set()
    await task
    for p in peers.values():
        p.sock.close()
    ctx.term()


def request(rid, prompt=20, max_tokens=12, client="alice"):
    return Request(request_id=rid, client_id=client, prompt_token_ids=list(range(1, prompt + 1)),
                   sampling=SamplingParams(max_tokens=max_tokens), arrival_time=time.time(),
                   stream_addr="tcp://127.0.0.1:2")


async def status(peers, via: str = "frontend") -> ClusterStatus:
    await peers[via].send(StatusQuery())
    return await peers[via].recv()


async def eventually(peers, predicate, timeout=3.0) -> ClusterStatus:
    """Messages from different peers may be handled in any order: poll the status until ``predicate`` holds."""
    deadline = time.time() + timeout
    while True:
        st = await status(peers)
        if predicate(st) or time.time() > deadline:
            return st
        await asyncio.sleep(0.05)


async def drive_to_decoding(peers, rid):
    reserve = await peers["decode-0"].recv()
    assert isinstance(reserve, ReserveKV) and reserve.request_id == rid
    await peers["decode-0"].send(KVReserved(request_id=rid, worker_id="decode-0", ok=True))
    task = await peers["prefill-0"].recv()
    assert isinstance(task, PrefillTask) and task.decode_worker_id == "decode-0"
    return reserve


async def test_happy_path_releases_all_accounting(cluster):
    _coordinator, peers, *_ = cluster
    await peers["frontend"].send(SubmitRequest(request=request("r1")))
    reserve = await drive_to_decoding(peers, "r1")
    assert reserve.num_blocks == 2  # ceil(20 / 16): the decode engine reserves the prompt, the rest comes on demand
    await peers["prefill-0"].send(PrefillDone(request_id="r1", worker_id="prefill-0", handed_off=True,
                                              prefill_start=time.time(), prefill_end=time.time()))
    await peers["decode-0"].send(KVReceived(request_id="r1", worker_id="decode-0", num_tokens=20, transfer_s=0.001))
    await peers["decode-0"].send(TokenReport(worker_id="decode-0", counts={"r1": 11}))
    await peers["decode-0"].send(RequestDone(request_id="r1", worker_id="decode-0", finish_reason="length"))
    st = await eventually(peers, lambda st: st.in_flight == 0)
    assert st.in_flight == 0 and st.waiting == 0
    assert st.workers["decode-0"]["reserved_blocks"] == 0 and st.workers["prefill-0"]["backlog_tokens"] == 0


async def test_expected_footprints_bound_decode_placement(cluster):
    _coordinator, peers, _register, _ = cluster
    # decode-0 has 64 blocks; each request is expected to take ceil((200 + 300) / 16) = 32 blocks
    for rid in ("a", "b", "c"):
        await peers["frontend"].send(SubmitRequest(request=request(rid, prompt=200, max_tokens=300)))
    first = await peers["decode-0"].recv()
    second = await peers["decode-0"].recv()
    assert {first.request_id, second.request_id} == {"a", "b"} and first.num_blocks == 13  # the prompt's
    await peers["decode-0"].expect_nothing()
    st = await eventually(peers, lambda st: st.waiting == 1)
    assert st.waiting == 1 and st.workers["decode-0"]["reserved_blocks"] == 64
    await peers["decode-0"].send(RequestDone(request_id="a", worker_id="decode-0",
                                             finish_reason="abort"))  # frees room for c
    third = await peers["decode-0"].recv()
    assert third.request_id == "c"


async def test_cancel_reaches_every_holder(cluster):
    _coordinator, peers, *_ = cluster
    await peers["frontend"].send(SubmitRequest(request=request("r1")))
    await drive_to_decoding(peers, "r1")
    await peers["frontend"].send(CancelRequest(request_id="r1", reason="abort"))
    assert isinstance(await peers["prefill-0"].recv(), CancelRequest)
    assert isinstance(await peers["decode-0"].recv(), CancelRequest)
    await peers["prefill-0"].send(RequestDone(request_id="r1", worker_id="prefill-0", finish_reason="abort"))
    await peers["decode-0"].send(RequestDone(request_id="r1", worker_id="decode-0", finish_reason="abort"))
    st = await eventually(peers, lambda st: st.in_flight == 0)
    assert st.in_flight == 0 and st.workers["decode-0"]["reserved_blocks"] == 0


async def test_cancel_while_queued_frees_the_queue_place(cluster):
    _coordinator, peers, _register, _ = cluster
    await peers["frontend"].send(SubmitRequest(request=request("big", prompt=200, max_tokens=800)))
    await peers["frontend"].send(SubmitRequest(request=request("queued", prompt=200, max_tokens=800)))
    await peers["decode-0"].recv()
    assert (await eventually(peers, lambda st: st.waiting == 1)).waiting == 1
    await peers["frontend"].send(CancelRequest(request_id="queued"))
    st = await eventually(peers, lambda st: st.waiting == 0)
    assert st.waiting == 0 and st.in_flight == 1


async def test_mismatched_worker_is_refused(cluster):
    coordinator, peers, register, ctx = cluster
    peers["decode-1"] = Peer(ctx, coordinator.config.address, "decode-1")
    bad = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=32, dtype="float32")
    ack = await register("decode-1", "decode", layout=bad)
    assert isinstance(ack, RegisterAck) and not ack.ok and "layout" in ack.error
    peers["prefill-1"] = Peer(ctx, coordinator.config.address, "prefill-1")
    ack = await register("prefill-1", "prefill", model="other")
    assert not ack.ok and "model" in ack.error


async def test_silent_worker_is_evicted_and_its_requests_are_lost_to_their_frontend(cluster):
    coordinator, peers, *_ = cluster
    await peers["frontend"].send(SubmitRequest(request=request("r1")))
    await drive_to_decoding(peers, "r1")
    # only the prefill worker keeps heartbeating; decode-0 goes silent
    clock = coordinator.clock
    silent_since = clock()
    while "decode-0" in coordinator.workers.workers:
        assert clock() - silent_since < 1.5  # evicted once over the 1 s heartbeat timeout
        clock.advance(0.1)
        idle = WorkerLoad(free_blocks=64, total_blocks=64, num_waiting=0, num_running=0, waiting_prompt_tokens=0)
        await peers["prefill-0"].send(Heartbeat(worker_id="prefill-0", load=idle, time=clock()))
        await status(peers, via="prefill-0")  # the heartbeat was handled (one connection keeps the order)
        await coordinator.watchdog()
    lost = await peers["frontend"].recv()  # the frontend resubmits it (docs/reliability.md)
    assert isinstance(lost, RequestLost) and lost.request_id == "r1" and "decode-0" in lost.reason
    assert isinstance(await peers["prefill-0"].recv(), CancelRequest)
    assert "r1" not in coordinator.requests or coordinator.requests.get("r1").phase.value == "ended"
    st = await status(peers)
    assert st.decode_workers == 0
    idle = WorkerLoad(free_blocks=64, total_blocks=64, num_waiting=0, num_running=0, waiting_prompt_tokens=0)
    await peers["decode-0"].send(Heartbeat(worker_id="decode-0", load=idle, time=time.time()))
    ack = await peers["decode-0"].recv()
    assert isinstance(ack, RegisterAck) and not ack.ok  # told to re-register


async def test_handoff_timeout_fails_the_request(cluster):
    coordinator, peers, *_ = cluster
    await peers["frontend"].send(SubmitRequest(request=request("r1")))
    await drive_to_decoding(peers, "r1")
    await peers["prefill-0"].send(PrefillDone(request_id="r1", worker_id="prefill-0", handed_off=True,
                                              prefill_start=time.time(), prefill_end=time.time()))
    await status(peers, via="prefill-0")
    await coordinator.watchdog()
    await peers["frontend"].expect_nothing(wait=0.1)  # within the handoff timeout
    coordinator.clock.advance(0.5)
    await coordinator.watchdog()
    failed = await peers["frontend"].recv()
    assert isinstance(failed, RequestFailed) and "handoff" in failed.message
    assert isinstance(await peers["decode-0"].recv(), CancelRequest)


async def test_malformed_frames_are_dropped_and_service_goes_on(cluster):
    _coordinator, peers, *_ = cluster
    await peers["frontend"].sock.send_multipart([b"\x93garbage"])
    await peers["frontend"].sock.send_multipart([b"\x83\xa1v\x07\xa1t\xa6cancel\xa1b\x80"])  # version 7
    st = await status(peers)
    assert st.prefill_workers == 1 and st.decode_workers == 1


async def test_request_longer_than_the_context_is_refused(cluster):
    _coordinator, peers, *_ = cluster
    await peers["frontend"].send(SubmitRequest(request=request("huge", prompt=500, max_tokens=1000)))
    failed = await peers["frontend"].recv()
    assert isinstance(failed, RequestFailed) and failed.code == 400 and "context of 1024 tokens" in failed.message


async def test_gpu_pool_share_and_reserved_blocks_reach_the_prefill_worker(cluster):
    _coordinator, peers, _register, ctx = cluster
    share = {"host": "h", "device_uuid": "GPU-x", "device_index": 1, "handle": b"\x01ipc"}
    peers["decode-1"] = Peer(ctx, peers["frontend"].sock.getsockopt_string(zmq.LAST_ENDPOINT), "decode-1")
    await peers["decode-1"].send(RegisterWorker(worker_id="decode-1", role="decode", model="m", layout=LAYOUT,
                                                kv_addr="tcp://127.0.0.1:3",
                                                load=WorkerLoad(free_blocks=64, total_blocks=64, num_waiting=0,
                                                                num_running=0, waiting_prompt_tokens=0),
                                                max_model_len=1024, kv_share=share))
    assert (await peers["decode-1"].recv()).ok
    for rid in ("r1", "r2"):  # one reservation on each decode worker (placement spreads them)
        await peers["frontend"].send(SubmitRequest(request=request(rid)))
    reserve = await peers["decode-1"].recv()
    assert isinstance(reserve, ReserveKV)
    await peers["decode-1"].send(KVReserved(request_id=reserve.request_id, worker_id="decode-1", ok=True,
                                            block_ids=[9, 4]))
    task = await peers["prefill-0"].recv()
    assert task.decode_worker_id == "decode-1" and task.decode_blocks == [9, 4] and task.decode_kv_share == share
    st = await status(peers)
    assert st.workers["decode-1"]["shares_kv_pool"] and not st.workers["decode-0"]["shares_kv_pool"]
