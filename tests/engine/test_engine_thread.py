"""The worker's engine thread: messages are handled while an iteration runs, engine calls made meanwhile wait for
its end and keep their order, and ``Engine.reserve`` may run concurrently with ``step``."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from diptych.engine.config import EngineConfig
from diptych.engine.sim_engine import SimEngine
from diptych.proto.messages import SamplingParams
from diptych.services.common.engine_thread import EngineThread
from diptych.sim.cost_model import resolve


class GatedEngine:
    """``step`` blocks until the test opens the gate; every call is logged in order."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.stepping = threading.Event()
        self.log: list[str] = []

    def step(self) -> str:
        self.stepping.set()
        self.gate.wait(5)
        self.log.append("step")
        return "output"

    def touch(self, name: str) -> str:
        self.log.append(name)
        return name.upper()

    def fail(self) -> None:
        raise ValueError("bad request")


async def test_calls_during_an_iteration_run_after_it_in_order() -> None:
    engine = GatedEngine()
    thread = EngineThread(engine, "test")
    assert await thread.call(engine.touch, "before") == "BEFORE"  # no iteration: at once
    loop = asyncio.get_running_loop()
    async with thread.iteration() as step:
        pending = asyncio.ensure_future(step())
        await loop.run_in_executor(None, engine.stepping.wait, 5)
        first = loop.create_task(thread.call(engine.touch, "first"))
        failing = loop.create_task(thread.call(engine.fail))
        second = loop.create_task(thread.call(engine.touch, "second"))
        await asyncio.sleep(0.05)  # the loop is free while the step blocks; the calls wait
        assert engine.log == ["before"] and not first.done()
        engine.gate.set()
        assert await pending == "output"
        engine.log.append("handled")  # the worker handles the output before queued calls apply
    assert await first == "FIRST" and await second == "SECOND"
    with pytest.raises(ValueError, match="bad request"):
        await failing
    assert engine.log == ["before", "step", "handled", "first", "second"]
    thread.close()


async def test_cancelled_iteration_waits_for_the_engine_thread() -> None:
    engine = GatedEngine()
    thread = EngineThread(engine, "test")
    loop = asyncio.get_running_loop()

    async def iterate() -> None:
        async with thread.iteration() as step:
            await step()

    task = loop.create_task(iterate())
    await loop.run_in_executor(None, engine.stepping.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the step that owns the engine
    engine.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.log == ["step"]
    assert await thread.call(engine.touch, "after") == "AFTER"
    thread.close()


def test_reserve_runs_safely_while_steps_execute() -> None:
    """Reservations from another thread while the engine admits and finishes requests: the block accounting stays
    exact (every block either free, running or reserved)."""
    engine = SimEngine(EngineConfig(block_size=16, num_blocks=400), cost=resolve("h200-mistral-7b"))
    for i in range(40):
        engine.add_request(f"r{i}", [1] * 40, SamplingParams(max_tokens=4))
    stop = threading.Event()
    reserved: list[str] = []

    def reserve_loop() -> None:  # at most 100 of the 400 blocks, so the queued requests can still be admitted
        i = 0
        while not stop.is_set() and i < 50:
            if engine.reserve(f"k{i}", 2):
                reserved.append(f"k{i}")
            i += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=reserve_loop)
    thread.start()
    try:
        while engine.has_work():
            engine.step()
    finally:
        stop.set()
        thread.join()
    assert len(reserved) == 50
    assert engine.kv.allocator.num_free == 400 - 2 * len(reserved)
    assert sorted(engine.request_ids()) == sorted(reserved)
