"""Runs a worker's engine iterations on a dedicated thread, so its event loop keeps receiving control and KV
messages while an iteration is in flight (a request that arrives mid-iteration joins the very next one, as in
``diptych simulate``, instead of waiting for the loop to come round).

Invariant: the engine is touched by one thread at a time. An *iteration* is ``Engine.step`` on the engine thread
plus the worker's handling of its output on the loop thread; while one is in flight, engine calls made through
``call`` are queued and applied, in the order they were made, on the loop thread right after it ends. The
exceptions are ``Engine.reserve`` and ``Engine.reserved_blocks``, which the engine allows concurrently with
``step`` (see its docstring).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from diptych.engine.protocol import WorkerEngine

T = TypeVar("T")


class EngineThread:
    def __init__(self, engine: WorkerEngine, name: str) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self._step: asyncio.Future | None = None
        self._in_iteration = False
        self._queued: list[tuple[Callable[[], Any], asyncio.Future]] = []

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the loop thread: at once between iterations, else right after the current
        one. Exceptions propagate to the caller."""
        if not self._in_iteration:
            return fn(*args, **kwargs)
        future = asyncio.get_running_loop().create_future()
        self._queued.append((lambda: fn(*args, **kwargs), future))
        return await future

    @asynccontextmanager
    async def iteration(self) -> AsyncIterator[Callable[[], asyncio.Future]]:
        """``async with thread.iteration() as step: output = await step(); ...handle output...``. Calls made
        meanwhile are queued and applied when the block exits (also on error or cancellation, after the engine
        thread has finished the step)."""
        self._in_iteration = True
        try:
            yield self._run_step
        finally:
            if self._step is not None and not self._step.done():
                await asyncio.wait([self._step])  # cancelled mid-step: the thread still owns the engine
            self._step = None
            self._in_iteration = False
            self._apply_queued()

    def _run_step(self) -> asyncio.Future:
        self._step = asyncio.get_running_loop().run_in_executor(self._executor, self.engine.step)
        return asyncio.shield(self._step)

    def _apply_queued(self) -> None:
        queued, self._queued = self._queued, []
        for fn, future in queued:
            if future.cancelled():
                continue
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001  handed to the caller, which decides
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self) -> None:
        """Stop the engine thread (after the step in flight, if any)."""
        self._executor.shutdown(wait=True)
