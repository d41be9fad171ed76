"""One event sequence fed to both drivers of the cluster core: the coordinator (real messages through its handlers,
a fake clock, sends captured) and the simulator (its callbacks, no event loop). Both must take the same decisions:
which workers each request goes to, how many blocks its decode engine reserves for the prompt, the expected footprint
each worker is accounted, and which worker a pool move drains.

The coordinator's workers register as ``flex`` (only those move there) in the order prefill, decode, prefill,
decode, which puts them in the pools the simulator gives its workers 0-1 (prefill) and 2-3 (decode), in the same
order within each pool. Both pool managers get the same scripted policy, since their statistics differ by design."""

from __future__ import annotations

from typing import Any

from diptych.policies.pool import PoolDecision, PoolPolicy, PoolStats
from diptych.proto.messages import (
    Heartbeat,
    KVLayout,
    KVReserved,
    PrefillDone,
    PrefillTask,
    RegisterWorker,
    Request,
    RequestDone,
    ReserveKV,
    SamplingParams,
    SubmitRequest,
    WorkerLoad,
)
from diptych.services.coordinator.config import CoordinatorConfig
from diptych.services.coordinator.server import Coordinator
from diptych.sim.config import ClusterConfig
from diptych.sim.simulator import Simulator
from diptych.workloads.spec import RequestSpec
from tests.cluster.fakes import FakeClock
from tests.integration.conftest import free_port_block

BLOCKS, BLOCK_SIZE = 64, 16
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=BLOCK_SIZE, dtype="float32")
SIM_TO_COORDINATOR = {0: "w0", 1: "w2", 2: "w1", 3: "w3"}  # simulator worker index -> coordinator worker id
# id, prompt tokens, max tokens: expected footprints of 32, 7, 50, 44 and 5 blocks (max_tokens under the expected
# 512 output tokens), prompts of 19, 3, 32, 25 and 3 blocks
REQUESTS = [("a", 300, 200), ("b", 40, 60), ("c", 500, 300), ("d", 400, 300), ("e", 40, 40)]


class MoveOneDecodeWorker(PoolPolicy):
    """Moves one worker from decode to prefill the first time it is asked."""

    name = "scripted"

    def __init__(self) -> None:
        self.asked = 0

    def decide(self, stats: PoolStats, now: float) -> PoolDecision | None:
        self.asked += 1
        return PoolDecision("decode", "prefill", "scripted", 1) if self.asked == 1 else None


class CoordinatorPath:
    def __init__(self) -> None:
        self.clock = FakeClock(0.0)
        config = CoordinatorConfig(address=f"tcp://127.0.0.1:{free_port_block(1)}", watchdog_interval_s=3600.0,
                                   max_decode_sequences=3, pool_policy="rad")
        self.coordinator = Coordinator(config, clock=self.clock)
        self.coordinator.pools.policy = MoveOneDecodeWorker()
        self.sent: list[tuple[bytes, Any]] = []

        async def capture(identity: bytes, msg: Any) -> bool:
            self.sent.append((identity, msg))
            return True

        self.coordinator._send = capture  # type: ignore[method-assign]

    async def register(self) -> None:
        for worker_id in ("w0", "w1", "w2", "w3"):
            await self.coordinator.handle(worker_id.encode(), RegisterWorker(
                worker_id=worker_id, role="flex", model="m", layout=LAYOUT, kv_addr=f"tcp://{worker_id}",
                load=WorkerLoad(free_blocks=BLOCKS, total_blocks=BLOCKS, num_waiting=0, num_running=0,
                                waiting_prompt_tokens=0, prefill_tps=5000.0), max_model_len=4096))

    async def arrive(self, rid: str, prompt: int, max_tokens: int) -> dict[str, tuple[str, str, int]]:
        """Submit; returns the placements made, confirming each reservation so the prefill task goes out."""
        self.sent.clear()
        request = Request(request_id=rid, client_id="alice", prompt_token_ids=list(range(1, prompt + 1)),
                          sampling=SamplingParams(max_tokens=max_tokens), arrival_time=self.clock(), stream_addr="tcp://frontend")
        await self.coordinator.handle(b"frontend", SubmitRequest(request=request))
        return await self._placed_from_sent()

    async def finish(self, rid: str) -> dict[str, tuple[str, str, int]]:
        record = self.coordinator.requests.get(rid)
        assert record is not None and record.prefill_worker and record.decode_worker
        self.sent.clear()
        await self.coordinator.handle(record.prefill_worker.encode(), PrefillDone(
            request_id=rid, worker_id=record.prefill_worker, handed_off=True, prefill_start=0.0, prefill_end=0.0))
        await self.coordinator.handle(record.decode_worker.encode(), RequestDone(
            request_id=rid, worker_id=record.decode_worker, finish_reason="length"))
        return await self._placed_from_sent()

    async def _placed_from_sent(self) -> dict[str, tuple[str, str, int]]:
        placed = {}
        for identity, msg in list(self.sent):
            if isinstance(msg, ReserveKV):
                placed.update(await self._confirm(identity, msg))
        return placed

    async def _confirm(self, identity: bytes, msg: ReserveKV) -> dict[str, tuple[str, str, int]]:
        await self.coordinator.handle(identity, KVReserved(request_id=msg.request_id, worker_id=identity.decode(),
                                                           ok=True))
        prefill = next(i.decode() for i, m in self.sent if isinstance(m, PrefillTask)
                       and m.request.request_id == msg.request_id)
        return {msg.request_id: (prefill, identity.decode(), msg.num_blocks)}

    async def pool_tick(self) -> list[str]:
        """Heartbeats (a measured prefill rate), then the watchdog twice: the move starts, then empty drains end."""
        self.clock.advance(1.0)
        for worker_id in ("w0", "w1", "w2", "w3"):
            load = WorkerLoad(free_blocks=BLOCKS, total_blocks=BLOCKS, num_waiting=0, num_running=0,
                              waiting_prompt_tokens=0, prefill_tps=5000.0)
            await self.coordinator.handle(worker_id.encode(), Heartbeat(worker_id=worker_id, load=load,
                                                                        time=self.clock()))
        await self.coordinator.watchdog()
        moved = [m["worker"] for m in self.coordinator.pools.moves]
        await self.coordinator.watchdog()
        return moved

    def pools(self) -> dict[str, str]:
        return {w.worker_id: w.pool.value for w in self.coordinator.workers.workers.values()}

    def accounted(self) -> dict[str, int]:
        return {w.worker_id: w.reserved_blocks for w in self.coordinator.workers.workers.values()}


class SimulatorPath:
    def __init__(self) -> None:
        config = ClusterConfig(prefill_workers=2, decode_workers=2, kv_blocks=BLOCKS, block_size=BLOCK_SIZE,
                               max_decode_sequences=3)
        specs = [RequestSpec(rid, 0.0, prompt, max_tokens) for rid, prompt, max_tokens in REQUESTS]
        self.sim = Simulator(config, specs)
        self.sim.core.pools.policy = MoveOneDecodeWorker()
        self.now = 0.0

    def _placement(self, i: int) -> tuple[str, str, int]:
        sim = self.sim
        return SIM_TO_COORDINATOR[sim.req_prefill[i]], SIM_TO_COORDINATOR[sim.req_decode[i]], sim.req_blocks[i]

    def _placed_since(self, before: list[int]) -> dict[str, tuple[str, str, int]]:
        return {self.sim.specs[i].request_id: self._placement(i) for i, seen in enumerate(before)
                if seen < 0 <= self.sim.req_decode[i]}

    def arrive(self, rid: str) -> dict[str, tuple[str, str, int]]:
        before = list(self.sim.req_decode)
        self.sim._arrive(self.sim.index_of[rid], self.now)
        return self._placed_since(before)

    def finish(self, rid: str) -> dict[str, tuple[str, str, int]]:
        sim = self.sim
        i = sim.index_of[rid]
        seq = sim.req_seq[i]
        assert seq is not None
        before = list(sim.req_decode)
        prefill, decode = sim.workers[sim.req_prefill[i]], sim.workers[sim.req_decode[i]]
        sim.first_token(prefill, seq, self.now)
        prefill.waiting.clear()  # the simulated engine lets the prompt go (not under test here)
        prefill.running.clear()
        prefill.by_id.clear()
        prefill.busy = False
        sim.finished(decode, seq, self.now)
        return self._placed_since(before)

    def pool_tick(self) -> list[str]:
        self.now += 1.0
        for w in self.sim.workers:  # engines idle: only the core's accounting decides who can switch
            w.waiting.clear()
            w.running.clear()
            w.by_id.clear()
            w.busy = False
        self.sim.pool_moves.tick(self.now, True)
        # moves name the worker as it was called then ("decode-2": worker 2)
        return [SIM_TO_COORDINATOR[int(m["worker"].rsplit("-", 1)[1])] for m in self.sim.pool_moves.moves]

    def pools(self) -> dict[str, str]:
        return {SIM_TO_COORDINATOR[int(w.worker_id)]: w.pool.value for w in self.sim.core.workers.workers.values()}

    def accounted(self) -> dict[str, int]:
        return {SIM_TO_COORDINATOR[int(w.worker_id)]: w.reserved_blocks
                for w in self.sim.core.workers.workers.values()}


async def test_the_coordinator_and_the_simulator_take_the_same_decisions():
    services, simulator = CoordinatorPath(), SimulatorPath()
    try:
        await services.register()
        assert services.pools() == simulator.pools() == {"w0": "prefill", "w1": "decode", "w2": "prefill",
                                                         "w3": "decode"}
        placements = []
        for rid, prompt, max_tokens in REQUESTS[:4]:
            from_services = await services.arrive(rid, prompt, max_tokens)
            from_simulator = simulator.arrive(rid)
            assert from_services == from_simulator and services.accounted() == simulator.accounted()
            placements.append(from_services)
        assert placements[0] == {"a": ("w0", "w1", 19)}  # the engine reserves blocks_for(300, 16) for the prompt
        assert services.accounted() == {"w0": 0, "w1": 32, "w2": 0, "w3": 7 + 50}  # footprints: prompt + outputs
        assert placements[3] == {}  # d waits: neither decode worker has room for its 44 blocks of footprint
        finished = await services.finish("a")
        assert finished == simulator.finish("a") and finished["d"][1:] == ("w1", 25)
        assert services.accounted() == simulator.accounted() == {"w0": 0, "w1": 44, "w2": 0, "w3": 7 + 50}
        moved = await services.pool_tick()
        assert moved == simulator.pool_tick() == ["w1"]  # the decode worker with the fewest reserved blocks
        assert services.pools() == simulator.pools()  # w1 still drains: it holds d's reservation
        placed = await services.arrive("e", 40, 40)
        assert placed == simulator.arrive("e") and placed["e"][1:] == ("w3", 3)  # not on the draining w1
    finally:
        services.coordinator.sock.close()
        services.coordinator.ctx.term()
