"""A worker process: registration, the engine loop with its heartbeats, cancellation, and its roles' hooks run in
``ROLE_ORDER`` (``services.worker.role``).

Concurrency model: one asyncio loop per worker process receives control and KV messages at any time;
``step()`` runs on the engine thread (``EngineThread``), and engine calls made while an iteration is in flight
(``WorkerLinks.engine_call``) are applied right after it. Heartbeats are sent from the engine loop itself, so a
worker whose engine is stuck goes silent and is evicted by the coordinator.

A flex worker composes every role: the coordinator moves it between pools by what it sends it (``PrefillTask`` in
the prefill pool, ``ReserveKV`` in the decode pool) and drains the old pool's work first, so a move needs no word to
the worker and its roles stay ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from diptych.engine.outputs import StepOutput
from diptych.proto import ProtocolError
from diptych.proto.messages import (
    CancelRequest,
    Heartbeat,
    PrefillTask,
    RegisterAck,
    RegisterWorker,
    RequestDone,
    WorkerLoad,
)
from diptych.proto.roles import WorkerRole
from diptych.services.common.sockets import recv_message
from diptych.services.worker.links import WorkerLinks
from diptych.services.worker.role import ROLE_ORDER, Role

log = logging.getLogger("diptych.worker")

UNKNOWN_WORKER = "unknown worker"
REGISTER_ACK_TIMEOUT_S = 5.0
"""How long a registration waits for its ``RegisterAck`` before it is sent again (a lost ack, a coordinator not up)."""
REGISTER_BACKOFF_S = (1.0, 30.0)
"""First and longest wait before registering again after a refusal or a lost ack (doubling in between)."""
IDLE_REPLAN_S = 0.002
"""Seconds the engine loop waits after an iteration that ran nothing while requests were held (a batch policy may
defer every decode while no KV block is free, until one becomes urgent), unless a message wakes it sooner."""


class Worker:
    """One engine (in ``links``) and its ``roles``, whose hooks run in ``ROLE_ORDER`` whatever order they are given
    in. The worker registers as ``role``."""

    def __init__(self, links: WorkerLinks, role: WorkerRole, roles: Sequence[Role],
                 heartbeat_interval_s: float) -> None:
        kinds = [r.kind for r in roles]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a worker has each role at most once, got {kinds}")
        self.links = links
        self.engine = links.engine
        self.worker_id = links.worker_id
        self.role = role
        self.roles: list[Role] = sorted(roles, key=lambda r: ROLE_ORDER.index(r.kind))
        self.heartbeat_interval_s = heartbeat_interval_s
        self._last_heartbeat = 0.0
        self._prefill_tps = 0.0
        """Recent prompt tokens per second while prefilling (exponential average over iterations)."""
        self._shipping: asyncio.Task[None] | None = None
        self._registering: asyncio.Task[None] | None = None
        self._register_answer: asyncio.Future[bool] | None = None
        """The answer to the registration in flight: the coordinator's ``RegisterAck.ok``."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        self._register_answer = asyncio.get_running_loop().create_future()
        await self._register()  # before the first heartbeat leaves on the same socket
        self._registering = asyncio.create_task(self._register_until_accepted(sent=True))
        tasks = [asyncio.create_task(self._control_loop()),
                 *(asyncio.create_task(loop) for loop in self.links.background()),
                 *(asyncio.create_task(loop) for role in self.roles for loop in role.background())]
        engine_task = asyncio.create_task(self._engine_loop(stop))
        done, _ = await asyncio.wait([engine_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in [engine_task, *tasks]:
            task.cancel()
        if self._registering is not None:
            self._registering.cancel()
            tasks.append(self._registering)
        await asyncio.gather(engine_task, *tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("worker %s stopped on an error: %r", self.worker_id, task.exception())
        await self._abort_all("worker shutting down")
        self.links.close()
        log.info("worker %s stopped", self.worker_id)

    async def _register(self) -> None:
        kv_addr, kv_share = next((i for i in (r.kv_ingress() for r in self.roles) if i is not None), ("", {}))
        msg = RegisterWorker(worker_id=self.worker_id, role=self.role.value, model=self.engine.model_name,
                             layout=self.engine.layout, kv_addr=kv_addr, load=await self.links.engine_call(self.load),
                             max_model_len=self.engine.max_model_len, kv_share=kv_share)
        await self.links.send_control(msg)
        log.info("worker %s (%s) registering with %s blocks", self.worker_id, self.role.value, msg.load.total_blocks)

    async def _control_loop(self) -> None:
        while True:
            _, msg = await recv_message(self.links.control)
            if isinstance(msg, ProtocolError):
                log.warning("dropped a malformed control message: %s", msg)
            elif isinstance(msg, RegisterAck):
                await self._on_register_ack(msg)
            elif isinstance(msg, CancelRequest):
                if await self.abort(msg.request_id):
                    log.info("req=%s aborted (%s)", msg.request_id, msg.reason)
                    await self.links.send_control(RequestDone(request_id=msg.request_id, worker_id=self.worker_id,
                                                              finish_reason="abort"))
            else:
                await self.dispatch(msg)
            self.links.wake()

    async def dispatch(self, msg: object) -> None:
        """Hand a coordinator message to the first role that takes it."""
        for role in self.roles:
            if await role.handle(msg):
                return
        if isinstance(msg, PrefillTask):  # no role of this worker can run it: fail it rather than leave it hanging
            rid = msg.request.request_id
            log.error("req=%s %s task sent to %s, a %s worker", rid, "colocated" if msg.colocated else "prefill",
                      self.worker_id, self.role.value)
            await self.links.send_control(RequestDone(request_id=rid, worker_id=self.worker_id,
                                                      finish_reason="error"))
        else:
            log.warning("dropped unexpected %s", type(msg).__name__)

    async def _on_register_ack(self, msg: RegisterAck) -> None:
        """An answer to a registration, or ``UNKNOWN_WORKER`` to a heartbeat (the coordinator restarted or evicted
        this worker: register again, unless a registration is under way). Never raises: a refusal is logged and the
        registration retried with backoff."""
        answer = self._register_answer
        if msg.error == UNKNOWN_WORKER:
            if self._registering is None or self._registering.done():
                log.warning("coordinator does not know worker %s; re-registering", self.worker_id)
                await self._abort_all("coordinator lost this worker")
                self._registering = asyncio.create_task(self._register_until_accepted(sent=False))
        elif answer is not None and not answer.done():
            if msg.ok:
                log.info("worker %s registered", self.worker_id)
            else:
                log.error("coordinator refused worker %s: %s", self.worker_id, msg.error)
            answer.set_result(msg.ok)
        elif msg.ok:
            log.debug("worker %s: a repeated registration ack", self.worker_id)

    async def _register_until_accepted(self, sent: bool) -> None:
        """Register (``sent``: the first registration already left) until the coordinator accepts; after a refusal
        or no answer within ``REGISTER_ACK_TIMEOUT_S``, wait (doubling from ``REGISTER_BACKOFF_S[0]``), drop every
        request held (a repeated registration replaces this worker's entry at the coordinator) and send again."""
        delay, longest = REGISTER_BACKOFF_S
        while True:
            if not sent:
                self._register_answer = asyncio.get_running_loop().create_future()
                await self._register()
            sent = False
            assert self._register_answer is not None
            try:
                if await asyncio.wait_for(asyncio.shield(self._register_answer), REGISTER_ACK_TIMEOUT_S):
                    return
            except asyncio.TimeoutError:
                log.warning("no answer to the registration of %s; sending it again", self.worker_id)
            await asyncio.sleep(delay)
            delay = min(2 * delay, longest)
            await self._abort_all("registering again")

    # ------------------------------------------------------------------ cancellation

    async def abort(self, request_id: str) -> bool:
        """End the request and free its blocks; True if this worker held it (False: it already ended, and the
        iteration that ended it has reported it). A role may end it itself (``Role.prepare_abort``); otherwise the
        engine drops it, and the output being shipped is shipped first, so its last tokens are reported before the
        caller reports the abort. Every role then drops its state (``Role.aborted``)."""
        claimed = False
        for role in self.roles:
            if await role.prepare_abort(request_id):
                claimed = True
                break
        held = claimed or await self.links.engine_call(self.engine.abort, request_id)
        if not claimed and self._shipping is not None:
            await asyncio.wait([self._shipping])
        for role in self.roles:
            await role.aborted(request_id, held)
        return held

    async def _abort_all(self, reason: str) -> None:
        for rid in await self.links.engine_call(self.engine.request_ids):
            if await self.abort(rid):
                log.info("req=%s aborted (%s)", rid, reason)

    # ------------------------------------------------------------------ iterations

    def load(self) -> WorkerLoad:
        """The heartbeat's load: the engine's, this worker's prefill rate, and each role's figures."""
        load = self.engine.load()
        load.prefill_tps = self._prefill_tps
        for role in self.roles:
            role.report(load)
        return load

    async def _engine_loop(self, stop: asyncio.Event) -> None:
        """Iterations back to back. An output whose handling needs the engine (``Role.output_needs_engine``) is
        handled before the next iteration starts; any other is shipped while the next iteration runs (outputs are
        shipped in order, one at a time), so the host work of streaming tokens overlaps the next forward pass."""
        try:
            while not stop.is_set():
                now = time.time()
                if now - self._last_heartbeat >= self.heartbeat_interval_s:
                    self._last_heartbeat = now
                    await self.links.send_control(Heartbeat(worker_id=self.worker_id, load=self.load(), time=now))
                if self.engine.has_work():
                    output: StepOutput | None
                    async with self.links.engine_thread.iteration() as step:
                        output = await step()
                        if any(role.output_needs_engine(output) for role in self.roles):
                            await self._shipped()
                            await self.after_step(output)
                            output = None
                    if output is not None:
                        await self._shipped()
                        self._shipping = asyncio.create_task(self.after_step(output))
                        if output.duration_s == 0 and not output.tokens and not output.preempted:
                            await self._idle(IDLE_REPLAN_S)  # the policy ran nothing (e.g. decodes deferred)
                else:
                    await self._shipped()
                    await self._idle(self.heartbeat_interval_s)
        finally:
            await self._shipped()

    async def _idle(self, timeout_s: float) -> None:
        """Wait until a message wakes the engine loop, at most ``timeout_s`` seconds."""
        self.links.woken.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.links.woken.wait(), timeout=timeout_s)

    async def after_step(self, output: StepOutput) -> None:
        """Ship one iteration's results: each role in ``ROLE_ORDER`` handles the requests it owns."""
        if output.num_prefill_tokens and output.duration_s > 0:
            rate = output.num_prefill_tokens / output.duration_s
            self._prefill_tps = rate if not self._prefill_tps else 0.8 * self._prefill_tps + 0.2 * rate
        for role in self.roles:
            await role.after_step(output)

    async def _shipped(self) -> None:
        """Wait until the previous output is shipped (its errors propagate)."""
        if self._shipping is not None:
            await self._shipping
