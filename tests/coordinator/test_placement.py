"""The coordinator's decode placement cap (``--max-decode-sequences``): the command line and requests held back at
the cap (the rules themselves: ``tests/cluster``)."""

from __future__ import annotations

import argparse
import asyncio

import pytest
import zmq.asyncio

from diptych.proto.messages import KVReserved, RegisterWorker, RequestDone, ReserveKV, SubmitRequest, WorkerLoad
from diptych.services.coordinator.config import CoordinatorConfig, add_arguments, from_args
from diptych.services.coordinator.server import Coordinator
from tests.coordinator.test_coordinator import LAYOUT, Peer, request
from tests.integration.conftest import free_port_block


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
            load = WorkerLoad(free_blocks=64, total_blocks=64, num_waiting=0, num_running=0, waiting_prompt_tokens=0)
            await peers[name].send(RegisterWorker(worker_id=name, role=role, model="m", layout=LAYOUT,
                                                  kv_addr="tcp://127.0.0.1:1" if role == "decode" else "",
                                                  load=load, max_model_len=512))
            assert (await peers[name].recv()).ok
        for rid in ("a", "b"):  # 2 blocks each of 64: only the cap holds b back
            await peers["frontend"].send(SubmitRequest(request=request(rid)))
        reserve = await peers["decode-0"].recv()
        assert isinstance(reserve, ReserveKV) and reserve.request_id == "a"
        await peers["decode-0"].expect_nothing()
        assert coordinator.placer.waiting_for == "decode"
        await peers["decode-0"].send(KVReserved(request_id="a", worker_id="decode-0", ok=True))
        await peers["prefill-0"].recv()
        await peers["decode-0"].send(RequestDone(request_id="a", worker_id="decode-0", finish_reason="abort"))
        reserve = await peers["decode-0"].recv()
        assert isinstance(reserve, ReserveKV) and reserve.request_id == "b"
        assert coordinator.workers.workers["decode-0"].decode_requests == 1
    finally:
        stop.set()
        await task
        for peer in peers.values():
            peer.sock.close()
        ctx.term()
