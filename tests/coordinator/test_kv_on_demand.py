"""The coordinator under KV memory on demand: a decode worker is sent the prompt's blocks to reserve, a chat-sized
request is served on a pool much smaller than the context, and a reservation the decode engine refuses (no free
blocks at the moment) is retried with backoff until it is accepted, the request is cancelled, its worker is evicted,
or the limit passes (503, never 500). Messages go through ``Coordinator.handle`` with sends captured; time is a fake
clock, except for the test of the watchdog loop's own timing."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import pytest

from diptych.cluster.core import RESERVE_RETRY_S
from diptych.launcher import free_port_block
from diptych.proto.messages import (
    CancelRequest,
    Heartbeat,
    KVReserved,
    PrefillTask,
    RegisterWorker,
    RequestDone,
    RequestFailed,
    RequestLost,
    ReserveKV,
    StatusQuery,
    SubmitRequest,
    WorkerLoad,
)
from diptych.services.coordinator.config import CoordinatorConfig, add_arguments, from_args
from diptych.services.coordinator.server import Coordinator
from tests.cluster.fakes import FakeClock
from tests.coordinator.test_coordinator import LAYOUT, request

CONTEXT = 1024
"""The workers' ``max_model_len`` (tokens)."""
DECODE_BLOCKS = 16
"""The decode worker's pool: 256 tokens, a quarter of the context."""


class Harness:
    """A coordinator with one prefill and one decode worker registered, its sends captured per receiver. Workers are
    not evicted for silence unless ``heartbeat_timeout_s`` is given."""

    def __init__(self, clock: Any = None, **config: Any) -> None:
        self.clock = clock if clock is not None else FakeClock()
        config.setdefault("heartbeat_timeout_s", 3600.0)
        self.coordinator = Coordinator(CoordinatorConfig(address=f"tcp://127.0.0.1:{free_port_block(1)}",
                                                         watchdog_interval_s=3600.0, **config), clock=self.clock)
        self.sent: list[tuple[bytes, Any]] = []

        async def capture(identity: bytes, msg: Any) -> bool:
            self.sent.append((identity, msg))
            return True

        self.coordinator._send = capture  # type: ignore[method-assign]

    async def start(self) -> Harness:
        for name, role, blocks in (("prefill-0", "prefill", 64), ("decode-0", "decode", DECODE_BLOCKS)):
            await self.coordinator.handle(name.encode(), RegisterWorker(
                worker_id=name, role=role, model="m", layout=LAYOUT,
                kv_addr="tcp://127.0.0.1:1" if role == "decode" else "", load=self.load(blocks),
                max_model_len=CONTEXT))
        self.take()
        return self

    @staticmethod
    def load(blocks: int, preemptions: int = 0, recomputed_tokens: int = 0) -> WorkerLoad:
        return WorkerLoad(free_blocks=blocks, total_blocks=blocks, num_waiting=0, num_running=0,
                          waiting_prompt_tokens=0, preemptions=preemptions, recomputed_tokens=recomputed_tokens)

    def take(self, to: str | None = None) -> list[Any]:
        """The messages sent (to ``to`` only, if given) since the last call, in order."""
        sent = [msg for identity, msg in self.sent if to is None or identity == to.encode()]
        self.sent.clear()
        return sent

    async def submit(self, rid: str, prompt: int = 40, max_tokens: int = 12) -> None:
        await self.coordinator.handle(b"frontend", SubmitRequest(request=request(rid, prompt, max_tokens)))

    async def answer(self, rid: str, ok: bool) -> None:
        await self.coordinator.handle(b"decode-0", KVReserved(request_id=rid, worker_id="decode-0", ok=ok,
                                                              error="" if ok else "not enough free blocks"))

    async def at(self, seconds: float) -> None:
        """Advance the clock by ``seconds`` and run the watchdog."""
        self.clock.advance(seconds)
        await self.coordinator.watchdog()

    async def worker(self, worker_id: str) -> dict[str, Any]:
        await self.coordinator.handle(b"frontend", StatusQuery())
        status, = self.take("frontend")
        return status.workers[worker_id]

    def close(self) -> None:
        self.coordinator.sock.close()
        self.coordinator.ctx.term()


@pytest.fixture
async def harness():
    h = await Harness().start()
    yield h
    h.close()


async def test_the_decode_worker_reserves_the_prompt_and_a_chat_request_fits_a_small_pool(harness):
    prompt, max_tokens = 100, CONTEXT - 100  # a chat request without max_tokens: the context's remainder
    await harness.submit("chat", prompt, max_tokens)
    reserve, = harness.take("decode-0")
    assert isinstance(reserve, ReserveKV) and reserve.num_blocks == 7  # blocks_for(100, 16): the prompt's
    assert (await harness.worker("decode-0"))["reserved_blocks"] == DECODE_BLOCKS  # 612 tokens capped at the pool
    await harness.answer("chat", ok=True)
    task, = harness.take("prefill-0")
    assert isinstance(task, PrefillTask) and task.request.request_id == "chat"
    await harness.submit("too-long", DECODE_BLOCKS * 16, 2)  # the prompt and its first decode exceed the pool
    failed, = harness.take("frontend")
    assert isinstance(failed, RequestFailed) and failed.code == 400 and "prompt (256 tokens)" in failed.message


async def test_a_refused_reservation_is_retried_with_backoff_until_accepted(harness):
    await harness.submit("r")
    assert [type(m) for m in harness.take()] == [ReserveKV]
    accounted = await harness.worker("decode-0")
    first, _ = RESERVE_RETRY_S
    for refusal, delay in enumerate((first, 2 * first, 4 * first), start=1):
        await harness.answer("r", ok=False)
        assert harness.take() == []  # no failure: the request keeps its place
        await harness.at(delay * 0.8)
        assert harness.take() == []  # not yet due
        await harness.at(delay * 0.2 + 1e-6)
        retry, = harness.take()
        assert isinstance(retry, ReserveKV) and retry.request_id == "r" and retry.num_blocks == 3
        status = await harness.worker("decode-0")
        assert status["refused_reservations"] == refusal
        assert status["reserved_blocks"] == accounted["reserved_blocks"] == 4  # blocks_for(40 + 12)
    await harness.answer("r", ok=True)
    task, = harness.take("prefill-0")
    assert isinstance(task, PrefillTask) and task.request.request_id == "r"


async def test_a_reservation_refused_past_the_queue_timeout_fails_with_503(harness):
    await harness.submit("r")
    harness.take()
    waited = 0.0
    while waited <= harness.coordinator.config.queue_timeout_s:
        await harness.answer("r", ok=False)
        await harness.at(1.0)
        waited += 1.0
        sent = harness.take()
    failed, = [m for m in sent if isinstance(m, RequestFailed)]
    assert failed.code == 503 and failed.retry_after_s is not None
    assert "decode worker decode-0 had no free KV blocks" in failed.message and "within 60 s" in failed.message
    assert not any(isinstance(m, CancelRequest) for m in sent)  # the worker holds nothing
    assert (await harness.worker("decode-0"))["reserved_blocks"] == 0 and len(harness.coordinator.requests) == 0


async def test_without_a_queue_timeout_the_reserve_timeout_bounds_the_retries():
    h = await Harness(queue_timeout_s=None, reserve_timeout_s=5.0).start()
    try:
        await h.submit("r")
        await h.at(100.0)  # no queue timeout: a request may wait as long as it takes
        h.take()
        await h.answer("r", ok=False)
        for _ in range(4):
            await h.at(1.0)
            assert [type(m) for m in h.take()] == [ReserveKV]
            await h.answer("r", ok=False)
        await h.at(1.5)
        failed, = h.take("frontend")
        assert isinstance(failed, RequestFailed) and failed.code == 503 and "within 5 s" in failed.message
    finally:
        h.close()


async def test_a_request_cancelled_while_waiting_to_retry_is_released_at_once(harness):
    await harness.submit("waiting")
    await harness.submit("in-flight")
    harness.take()
    for rid in ("waiting", "in-flight"):
        await harness.answer(rid, ok=False)
    await harness.coordinator.handle(b"frontend", CancelRequest(request_id="waiting"))
    assert harness.take() == []  # nobody holds it: nothing to tell
    await harness.at(RESERVE_RETRY_S[0])
    retry, = harness.take("decode-0")
    assert retry.request_id == "in-flight"
    await harness.coordinator.handle(b"frontend", CancelRequest(request_id="in-flight"))
    assert [type(m) for m in harness.take("decode-0")] == [CancelRequest]
    await harness.answer("in-flight", ok=False)  # the retry was refused before the cancel arrived: no answer to it
    assert len(harness.coordinator.requests) == 0
    status = await harness.worker("decode-0")
    assert status["reserved_blocks"] == 0 and status["requests"] == 0
    assert (await harness.worker("prefill-0"))["backlog_tokens"] == 0


async def test_a_request_waiting_to_retry_on_an_evicted_worker_is_lost_to_its_frontend():
    h = await Harness(heartbeat_timeout_s=10.0).start()
    try:
        await h.submit("r")
        h.take()
        await h.answer("r", ok=False)
        h.clock.advance(6.0)
        await h.coordinator.handle(b"prefill-0", Heartbeat(worker_id="prefill-0", load=h.load(64), time=h.clock()))
        await h.at(6.0)  # decode-0 has been silent for 12 s: evicted before its retry is sent
        sent = h.take()
        lost, = [m for m in sent if isinstance(m, RequestLost)]
        assert lost.request_id == "r" and "decode-0" in lost.reason
        assert not any(isinstance(m, (ReserveKV, RequestFailed)) for m in sent)
        assert len(h.coordinator.requests) == 0
        assert (await h.worker("prefill-0"))["backlog_tokens"] == 0
    finally:
        h.close()


async def test_status_reports_preemptions_and_recomputed_tokens(harness):
    await harness.coordinator.handle(b"decode-0", Heartbeat(
        worker_id="decode-0", load=harness.load(DECODE_BLOCKS, preemptions=3, recomputed_tokens=410),
        time=harness.clock()))
    status = await harness.worker("decode-0")
    assert (status["preemptions"], status["recomputed_tokens"], status["refused_reservations"]) == (3, 410, 0)


async def test_the_watchdog_loop_wakes_for_a_retry_before_its_interval():
    h = await Harness(clock=time.time).start()  # the loop sleeps in real time; its interval is an hour
    stop = asyncio.Event()
    task = asyncio.create_task(h.coordinator.run(stop))
    try:
        await h.submit("r")
        h.take()
        refused = time.time()
        await h.answer("r", ok=False)
        while not h.sent:
            assert time.time() - refused < 2.0
            await asyncio.sleep(0.005)
        retry, = h.take("decode-0")
        assert isinstance(retry, ReserveKV) and time.time() - refused >= RESERVE_RETRY_S[0]
        await h.coordinator.handle(b"decode-0", RequestDone(request_id="r", worker_id="decode-0",
                                                            finish_reason="abort"))
    finally:
        stop.set()
        await task


def test_cli_knobs():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    assert "--expected-output-tokens" in text and "--reserve-timeout" in text
    config = from_args(parser.parse_args([]))
    assert (config.expected_output_tokens, config.queue_timeout_s, config.reserve_timeout_s) == (512, 60.0, 120.0)
    assert config.reserve_limit_s == 60.0
    config = from_args(parser.parse_args(["--expected-output-tokens", "64", "--queue-timeout", "0",
                                          "--reserve-timeout", "30"]))
    assert (config.expected_output_tokens, config.queue_timeout_s, config.reserve_limit_s) == (64, None, 30.0)
    for bad in ({"expected_output_tokens": -1}, {"reserve_timeout_s": 0.0}, {"queue_timeout_s": -1.0}):
        with pytest.raises(ValueError):
            CoordinatorConfig(**bad)
