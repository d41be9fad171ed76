"""How a worker composes its roles, without sockets or a model: the roles each ``WorkerRole`` runs, the order of
their hooks, which role takes which coordinator message (flex serves both pools), the colocated hand-over to the
decode role at the first token, and aborts. The engine is the cost-model engine (``--engine sim``); the worker's
links record what would be sent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from diptych.engine.config import EngineConfig
from diptych.engine.outputs import StepOutput
from diptych.engine.sim_engine import SimEngine
from diptych.proto.messages import (
    KVPushAborted,
    KVReserved,
    PrefillDone,
    PrefillTask,
    Request,
    RequestDone,
    ReserveKV,
    SamplingParams,
    TokenBatch,
    TokenReport,
    WorkerLoad,
)
from diptych.proto.roles import Pool, WorkerRole
from diptych.services.worker.main import compose_roles
from diptych.services.worker.role import ROLE_ORDER
from diptych.services.worker.worker import Worker
from diptych.sim.cost_model import DEFAULT, replace

FAST = replace(DEFAULT, overhead_s=0.0, weights_floor_s=0.0005, per_token_s=1e-6, attn_pair_s=0.0, kv_token_s=0.0)
WORKER_ID = "w-0"
STREAM = "tcp://frontend:1"
DECODE_KV = "tcp://decode:2"


class RecordingLinks:
    """``WorkerLinks`` without sockets: engine calls run at once, messages are recorded in order."""

    def __init__(self, engine: SimEngine) -> None:
        self.worker_id = WORKER_ID
        self.engine = engine
        self.control: list[Any] = []
        self.pushed: list[tuple[str, Any]] = []
        self.woken = asyncio.Event()

    async def engine_call(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    async def send_control(self, msg: Any) -> None:
        self.control.append(msg)

    async def push(self, addr: str, msg: Any, server_key: str) -> None:
        self.pushed.append((addr, msg))

    async def stream_tokens(self, streams) -> None:
        for (addr, _key), outputs in streams.items():
            self.pushed.append((addr, TokenBatch(outputs=outputs)))

    def bind_pull(self, addr: str) -> None:
        return None

    def background(self) -> list:
        return []

    def wake(self) -> None:
        self.woken.set()

    def streamed(self) -> list[Any]:
        return [out for addr, msg in self.pushed if isinstance(msg, TokenBatch) for out in msg.outputs]


def make_worker(role: WorkerRole) -> tuple[Worker, RecordingLinks]:
    links = RecordingLinks(SimEngine(EngineConfig(block_size=16, num_blocks=64), cost=FAST))
    roles = compose_roles(role, links, DECODE_KV)  # type: ignore[arg-type]
    return Worker(links, role, roles, heartbeat_interval_s=0.5), links  # type: ignore[arg-type]


def request(rid: str = "r1", prompt_len: int = 40, max_tokens: int = 4) -> Request:
    return Request(request_id=rid, client_id="c", prompt_token_ids=list(range(3, 3 + prompt_len)),
                   sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0), arrival_time=0.0,
                   stream_addr=STREAM)


def colocated_task(rid: str = "r1", max_tokens: int = 4) -> PrefillTask:
    """A colocated task as the coordinator sends it."""
    return PrefillTask(request=request(rid, max_tokens=max_tokens), decode_worker_id=WORKER_ID, decode_kv_addr="",
                       admitted_time=1.0, colocated=True)


def handoff_task(rid: str = "r1") -> PrefillTask:
    return PrefillTask(request=request(rid), decode_worker_id="decode-9", decode_kv_addr=DECODE_KV, admitted_time=1.0)


async def run_until_idle(worker: Worker) -> None:
    while worker.engine.has_work():
        await worker.after_step(worker.engine.step())


@pytest.mark.parametrize("role, kinds", [
    (WorkerRole.PREFILL, [Pool.PREFILL]),
    (WorkerRole.DECODE, [Pool.DECODE]),
    (WorkerRole.COLOCATED, [Pool.COLOCATED, Pool.DECODE]),
    (WorkerRole.FLEX, [Pool.PREFILL, Pool.COLOCATED, Pool.DECODE]),
])
def test_each_worker_role_composes_its_roles_in_role_order(role, kinds):
    worker, _ = make_worker(role)
    assert [r.kind for r in worker.roles] == kinds
    assert kinds == [kind for kind in ROLE_ORDER if kind in kinds]


class Probe:
    """A role that records the hooks called on it into a shared log."""

    def __init__(self, kind: Pool, log: list[str], takes: bool = False) -> None:
        self.kind, self.log, self.takes = kind, log, takes

    def kv_ingress(self):
        return None

    def background(self):
        return []

    async def handle(self, msg) -> bool:
        self.log.append(f"handle:{self.kind.value}")
        return self.takes

    def output_needs_engine(self, output) -> bool:
        return False

    async def after_step(self, output) -> None:
        self.log.append(f"after_step:{self.kind.value}")

    async def prepare_abort(self, request_id) -> bool:
        self.log.append(f"prepare_abort:{self.kind.value}")
        return False

    async def aborted(self, request_id, held) -> None:
        self.log.append(f"aborted:{self.kind.value}")

    def report(self, load: WorkerLoad) -> None:
        self.log.append(f"report:{self.kind.value}")


async def test_hooks_run_in_role_order_whatever_order_the_roles_are_given_in():
    log: list[str] = []
    links = RecordingLinks(SimEngine(EngineConfig(block_size=16, num_blocks=64), cost=FAST))
    probes = [Probe(Pool.DECODE, log), Probe(Pool.COLOCATED, log, takes=True), Probe(Pool.PREFILL, log)]
    worker = Worker(links, WorkerRole.FLEX, probes, heartbeat_interval_s=0.5)  # type: ignore[arg-type]
    await worker.after_step(StepOutput())
    await worker.dispatch(ReserveKV(request_id="r", num_blocks=1))
    await worker.abort("r")
    worker.load()
    assert log == ["after_step:prefill", "after_step:colocated", "after_step:decode",
                   "handle:prefill", "handle:colocated",  # the first role that takes a message ends the search
                   "prepare_abort:prefill", "prepare_abort:colocated", "prepare_abort:decode",
                   "aborted:prefill", "aborted:colocated", "aborted:decode",
                   "report:prefill", "report:colocated", "report:decode"]


def test_a_role_appears_once():
    log: list[str] = []
    links = RecordingLinks(SimEngine(EngineConfig(block_size=16, num_blocks=64), cost=FAST))
    with pytest.raises(ValueError, match="at most once"):
        Worker(links, WorkerRole.FLEX, [Probe(Pool.DECODE, log), Probe(Pool.DECODE, log)], 0.5)  # type: ignore[arg-type]


async def test_colocated_request_is_handed_to_the_decode_role_at_its_first_token():
    worker, links = make_worker(WorkerRole.COLOCATED)
    await worker.dispatch(colocated_task(max_tokens=4))
    await run_until_idle(worker)
    outputs = links.streamed()
    assert [out.index for out in outputs] == [0, 1, 2, 3]  # the first token streamed once, by the decode role
    assert set(outputs[0].events) == {"admitted", "prefill_start", "prefill_end"}
    assert all(not out.events for out in outputs[1:])
    assert sum(sum(m.counts.values()) for m in links.control if isinstance(m, TokenReport)) == 4
    assert [type(m) for m in links.control][-1] is RequestDone
    assert not any(isinstance(m, PrefillDone) for m in links.control)
    assert worker.engine.load().free_blocks == 64


async def test_a_prefill_worker_fails_a_colocated_task():
    worker, links = make_worker(WorkerRole.PREFILL)
    await worker.dispatch(colocated_task())
    assert links.control == [RequestDone(request_id="r1", worker_id=WORKER_ID, finish_reason="error")]
    assert not worker.engine.request_ids()


async def test_a_flex_worker_serves_the_pool_the_coordinator_sends_it_work_for():
    worker, links = make_worker(WorkerRole.FLEX)
    # prefill pool: a task with a handoff is prefilled only, its KV handed to the decode worker
    await worker.dispatch(handoff_task("p"))
    await run_until_idle(worker)
    handoffs = [(addr, type(msg).__name__) for addr, msg in links.pushed if addr == DECODE_KV]
    assert handoffs == [(DECODE_KV, "KVHandoff")]
    assert [out.index for out in links.streamed()] == [0]
    assert any(isinstance(m, PrefillDone) and m.handed_off for m in links.control)
    # moved to the decode pool: a reservation is the decode role's
    await worker.dispatch(ReserveKV(request_id="d", num_blocks=3))
    assert links.control[-1] == KVReserved(request_id="d", worker_id=WORKER_ID, ok=True, error="", block_ids=[])
    # and a colocated task still runs here from prompt to last token
    await worker.dispatch(colocated_task("c", max_tokens=2))
    await run_until_idle(worker)
    assert [out.index for out in links.streamed() if out.request_id == "c"] == [0, 1]


async def test_abort_of_a_prefill_tells_its_decode_worker_and_frees_the_blocks():
    worker, links = make_worker(WorkerRole.PREFILL)
    await worker.dispatch(handoff_task("p"))
    assert await worker.abort("p")
    assert links.pushed == [(DECODE_KV, KVPushAborted(request_id="p", worker_id=WORKER_ID))]
    assert not await worker.abort("p")
    assert worker.engine.load().free_blocks == 64
