"""What prefill and decode workers share: registration, the engine loop with its heartbeats, token streaming.

Concurrency model: one asyncio loop per worker process receives control and KV messages at any time;
``Engine.step()`` runs on the engine thread (``EngineThread``), and engine calls made while an iteration is in
flight (``engine_call``) are applied right after it. Heartbeats are sent from the engine loop itself, so a worker
whose engine is stuck goes silent and is evicted by the coordinator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio

from diptych.proto import ProtocolError
from diptych.proto.messages import (
    CancelRequest, Heartbeat, RegisterAck, RegisterWorker, RequestDone, TokenBatch, TokenOutput, WorkerLoad,
)
from diptych.services.common.cli import env_default
from diptych.services.common.engine_thread import EngineThread
from diptych.services.common.sockets import make_socket, recv_message, send_message

log = logging.getLogger("diptych.worker")

UNKNOWN_WORKER = "unknown worker"


def add_worker_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """Flags common to both worker kinds (engine shape, coordinator address, identity)."""
    from diptych.policies.batch import BATCH_POLICIES

    parser.add_argument("--worker-id", default=env_default("worker_id", f"{role}-{uuid.uuid4().hex[:6]}"),
                        help="unique id of this worker in the cluster [random]")
    parser.add_argument("--coordinator-addr", default=env_default("coordinator_addr", "tcp://127.0.0.1:5600"),
                        help="coordinator control socket [%(default)s]")
    parser.add_argument("--model", default=env_default("model", None),
                        help="HF model id or local directory [built-in tiny Llama]")
    parser.add_argument("--device", default=env_default("device", "cpu"), help="cpu, cuda or cuda:N [%(default)s]")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto [%(default)s]")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block [%(default)s]")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks [from --kv-memory-gb]")
    parser.add_argument("--kv-memory-gb", type=float, default=0.25, help="KV pool size in GB [%(default)s]")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length [model's]")
    parser.add_argument("--policy", default="sarathi", choices=BATCH_POLICIES.names(),
                        help="batch composition policy [%(default)s]")
    parser.add_argument("--policy-opt", action="append", metavar="KEY=VALUE",
                        help="batch policy knob, repeatable (e.g. token_budget=256)")
    parser.add_argument("--engine", default=env_default("engine", "hf"), choices=("hf", "sim"),
                        help="hf: run the model; sim: wait the cost model's time per iteration and emit placeholder "
                        "tokens (cluster-scale runs on a CPU, comparable with 'diptych simulate') [%(default)s]")
    parser.add_argument("--cost-model", default=None,
                        help="with --engine sim: a cost-model preset or JSON file [h200-mistral-7b]")
    parser.add_argument("--sim-handoff-gbps", type=float, default=50.0,
                        help="with --engine sim: modelled KV transfer bandwidth, GB/s [%(default)s]")
    parser.add_argument("--sim-handoff-latency-ms", type=float, default=1.0,
                        help="with --engine sim: modelled KV transfer latency, ms [%(default)s]")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between heartbeats")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING [INFO]")


def build_engine(args: argparse.Namespace) -> Any:
    """The engine a worker runs, from the common flags (torch is imported only here)."""
    from diptych.engine import Engine, EngineConfig
    from diptych.policies.batch import BATCH_POLICIES
    from diptych.services.common.cli import parse_knobs

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                          num_blocks=args.num_blocks, kv_memory_gb=args.kv_memory_gb, max_model_len=args.max_model_len)
    policy = BATCH_POLICIES.create(args.policy, **parse_knobs(args.policy_opt))
    if args.engine == "sim":
        from diptych.engine.sim_engine import SimEngine, SimHandoff
        from diptych.sim.cost_model import resolve

        if args.sim_handoff_gbps <= 0 or args.sim_handoff_latency_ms < 0:
            raise ValueError("--sim-handoff-gbps must be positive and --sim-handoff-latency-ms >= 0")
        handoff = SimHandoff(args.sim_handoff_gbps * 1e9, args.sim_handoff_latency_ms / 1e3)
        return SimEngine(config, policy, cost=resolve(args.cost_model), handoff=handoff)
    return Engine(config, policy)


class Worker:
    """Base of the worker roles (prefill, decode, and both at once): registration, the engine loop with heartbeats,
    cancellation, and PUSH sockets to frontends and decode workers. Role classes cooperate through ``super()``."""

    role: str = ""

    def __init__(self, args: argparse.Namespace, engine: Any) -> None:
        self.role = getattr(args, "role", None) or self.role
        self.worker_id: str = args.worker_id
        self.heartbeat_interval_s: float = args.heartbeat_interval
        self.engine = engine
        self.engine_thread = EngineThread(engine, self.worker_id)
        self.ctx = zmq.asyncio.Context()
        self.control = make_socket(self.ctx, zmq.DEALER, connect=args.coordinator_addr, identity=self.worker_id)
        self._push_sockets: dict[str, zmq.asyncio.Socket] = {}
        self._wake = asyncio.Event()
        self._last_heartbeat = 0.0
        self._registered = False
        self._prefill_tps = 0.0
        self._shipping: asyncio.Task | None = None

    # ------------------------------------------------------------------ subclass hooks

    def kv_addr(self) -> str:
        return ""

    def kv_share(self) -> dict:
        """What this worker publishes at registration for GPU-to-GPU KV pushes into its pool (decode roles)."""
        return {}

    async def handle_control(self, msg: Any) -> None:
        """A coordinator message other than RegisterAck/CancelRequest. Role classes handle theirs and pass the rest
        up with ``super()``; what reaches here is unexpected."""
        log.warning("dropped unexpected %s", type(msg).__name__)

    async def after_step(self, output: Any) -> None:
        """Ship the results of one engine iteration: each role class handles the requests it owns, then calls
        ``super()``."""
        if output.num_prefill_tokens and output.duration_s > 0:
            rate = output.num_prefill_tokens / output.duration_s
            self._prefill_tps = rate if not self._prefill_tps else 0.8 * self._prefill_tps + 0.2 * rate

    def load(self) -> WorkerLoad:
        load = self.engine.load()
        load.prefill_tps = self._prefill_tps
        return load

    def extra_tasks(self) -> list[asyncio.Task]:
        return []

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        await self._register()
        tasks = [asyncio.create_task(self._control_loop()), *self.extra_tasks()]
        engine_task = asyncio.create_task(self._engine_loop(stop))
        done, _ = await asyncio.wait([engine_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in [engine_task, *tasks]:
            task.cancel()
        await asyncio.gather(engine_task, *tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("worker %s stopped on an error: %r", self.worker_id, task.exception())
        await self._abort_all("worker shutting down")
        self.engine_thread.close()
        for sock in [self.control, *self._push_sockets.values()]:
            sock.close()
        self.ctx.term()
        log.info("worker %s stopped", self.worker_id)

    async def _register(self) -> None:
        msg = RegisterWorker(self.worker_id, self.role, self.engine.model_name, self.engine.layout, self.kv_addr(),
                             await self.engine_call(self.load), self.engine.max_model_len, self.kv_share())
        await send_message(self.control, msg)
        log.info("worker %s (%s) registering with %s blocks", self.worker_id, self.role, msg.load.total_blocks)

    async def _control_loop(self) -> None:
        while True:
            _, msg = await recv_message(self.control)
            if isinstance(msg, ProtocolError):
                log.warning("dropped a malformed control message: %s", msg)
            elif isinstance(msg, RegisterAck):
                await self._on_register_ack(msg)
            elif isinstance(msg, CancelRequest):
                if await self.abort(msg.request_id):
                    log.info("req=%s aborted (%s)", msg.request_id, msg.reason)
                    await self.send_control(RequestDone(msg.request_id, self.worker_id, "abort"))
            else:
                await self.handle_control(msg)
            self._wake.set()

    async def _on_register_ack(self, msg: RegisterAck) -> None:
        if msg.ok:
            self._registered = True
            log.info("worker %s registered", self.worker_id)
        elif msg.error == UNKNOWN_WORKER:  # the coordinator restarted or evicted us: start over
            log.warning("coordinator does not know worker %s; re-registering", self.worker_id)
            await self._abort_all("coordinator lost this worker")
            await self._register()
        else:
            raise RuntimeError(f"coordinator refused worker {self.worker_id}: {msg.error}")

    async def abort(self, request_id: str) -> bool:
        """Drop the request and free its blocks; True if the engine held it (False: it already ended, and the
        iteration that ended it has reported it). Role classes then drop their own state in ``forget``."""
        held = await self.engine_call(self.engine.abort, request_id)
        if self._shipping is not None:  # its last tokens are reported before the caller reports the abort
            await asyncio.wait([self._shipping])
        if held:
            self.forget(request_id)
        return held

    def forget(self, request_id: str) -> None:
        """Drop what a role keeps about an aborted request (each role class, then ``super()``)."""

    async def _abort_all(self, reason: str) -> None:
        for rid in await self.engine_call(self.engine.request_ids):
            if await self.abort(rid):
                log.info("req=%s aborted (%s)", rid, reason)

    async def engine_call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call an engine method from the loop: at once between iterations, else right after the current one."""
        return await self.engine_thread.call(fn, *args, **kwargs)

    async def _engine_loop(self, stop: asyncio.Event) -> None:
        """Iterations back to back. An output whose handling needs the engine (``output_needs_engine``) is handled
        before the next iteration starts; any other is shipped while the next iteration runs (outputs are shipped
        in order, one at a time), so the host work of streaming tokens overlaps the next forward pass."""
        try:
            while not stop.is_set():
                now = time.time()
                if now - self._last_heartbeat >= self.heartbeat_interval_s:
                    self._last_heartbeat = now
                    await self.send_control(Heartbeat(self.worker_id, self.load(), now))
                if self.engine.has_work():
                    async with self.engine_thread.iteration() as step:
                        output = await step()
                        if self.output_needs_engine(output):
                            await self._shipped()
                            await self.after_step(output)
                            output = None
                    if output is not None:
                        await self._shipped()
                        self._shipping = asyncio.create_task(self.after_step(output))
                else:
                    await self._shipped()
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=self.heartbeat_interval_s)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await self._shipped()

    def output_needs_engine(self, output: Any) -> bool:
        """Whether handling ``output`` (``after_step``) calls the engine; role classes that do say so."""
        return False

    async def _shipped(self) -> None:
        """Wait until the previous output is shipped (its errors propagate)."""
        if self._shipping is not None:
            await self._shipping

    # ------------------------------------------------------------------ sending

    async def send_control(self, msg: Any) -> None:
        await send_message(self.control, msg)

    async def push(self, addr: str, msg: Any) -> None:
        """Send ``msg`` over a PUSH socket connected to ``addr`` (a frontend's token stream or a decode worker's KV
        ingress), connecting on first use."""
        sock = self._push_sockets.get(addr)
        if sock is None:
            sock = self._push_sockets[addr] = make_socket(self.ctx, zmq.PUSH, connect=addr)
        await send_message(sock, msg)

    async def stream_tokens(self, by_addr: dict[str, list[TokenOutput]]) -> None:
        """Push token outputs to the frontends that own their requests (one message per frontend)."""
        for addr, outputs in by_addr.items():
            await self.push(addr, TokenBatch(outputs))

    def wake(self) -> None:
        self._wake.set()
