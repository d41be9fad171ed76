"""``--engine sim``: an ``Engine`` whose iterations wait the cost model's time instead of running a model.

The real services then run at cluster scale on a CPU, with the same sequences, KV block accounting, batch policy
and stop rules as the model engine (the same ``Engine`` around the same ``Scheduler``; only the executor differs),
so a run can be
compared with ``diptych simulate`` on the same workload. Differences from the model engine:

- ``step`` sleeps ``CostModel.iteration_time`` of the planned batch (seconds) and emits ``PLACEHOLDER_TOKEN`` for
  every sampled position: requests end by ``max_tokens`` (or the context length), never by EOS;
- KV blocks carry no data: a handoff sends empty frames, and a handed-off request joins the first iteration that
  starts after the modelled transfer, ``handoff_latency_s + prompt_tokens * kv_bytes_per_token /
  handoff_bandwidth_Bps`` seconds from the end of its prefill (its first token's time), as in the simulator;
- the KV pool holds what fits next to the weights in the modelled GPU memory (``CostModel.kv_capacity_tokens``),
  unless ``EngineConfig.num_blocks`` says otherwise; the layout is the modelled model's;
- back-to-back iterations follow each other every modelled iteration time: the host work around an iteration
  (recording tokens after the wait, and the worker's gap until the next iteration) is measured (a moving average)
  and taken off the next wait, as a GPU's forward pass would overlap it. When host work alone exceeds the modelled
  time, iterations take longer: the host is then the bottleneck, as it would be on a GPU. How far back-to-back
  iterations run over their modelled time is logged every ``LagMonitor.interval_s`` (a CPU that cannot keep up
  shows there first).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from diptych.engine.block_pool import BlockAllocator
from diptych.engine.config import EngineConfig
from diptych.engine.engine import Engine
from diptych.engine.outputs import StepOutput
from diptych.engine.sampler import SamplingRequest
from diptych.engine.scheduler import ForwardItem
from diptych.policies.batch import BatchPolicy
from diptych.proto.messages import KVLayout
from diptych.sim.cost_model import CostModel

log = logging.getLogger(__name__)

PLACEHOLDER_TOKEN = 42
SIM_CONTEXT_LEN = 32768
SIM_VOCAB_SIZE = 256


@dataclass
class SimHandoff:
    """Knobs of the modelled KV transfer: bytes per second and a fixed latency in seconds."""

    bandwidth_Bps: float = 50e9
    latency_s: float = 1e-3


class SimKVPool:
    """Block accounting without storage: same allocator as the model engine, empty frames on export."""

    def __init__(self, layout: KVLayout, num_blocks: int) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)

    def export_blocks(self, block_ids: list[int]) -> list[bytes]:
        return [b""] * len(block_ids)

    def import_blocks(self, block_ids: list[int], frames: list[Any]) -> None:
        if len(frames) != len(block_ids):
            raise ValueError(f"{len(frames)} frames for {len(block_ids)} blocks")


class CostModelExecutor:
    """Stands in for the model runner and the sampler: waits the iteration's modelled time, samples placeholders."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.vocab_size = SIM_VOCAB_SIZE
        self.step_started = time.perf_counter()
        """Set by ``SimEngine.step``: the modelled time counts from there, so scheduling is inside it."""
        self.host_overhead_s = 0.0
        """Moving average of the host seconds an iteration spends outside ``step_started .. wait end`` (set by
        ``SimEngine.step``); taken off the wait."""
        self.wait_ended = self.step_started
        self.modelled_s = 0.0
        """The last iteration's modelled seconds."""

    def execute(self, items: list[ForwardItem]) -> int:
        """Wait until the iteration's modelled time has passed since it began; returns how many positions need a
        token."""
        prefill_tokens = num_decodes = decode_context = 0
        pairs = 0.0
        for item in items:
            n = len(item.token_ids)
            if n == 1 and item.start_position > 0:  # a decode (or a one-token chunk, costed alike)
                num_decodes += 1
                decode_context += item.start_position + 1
            else:
                prefill_tokens += n
                pairs += CostModel.chunk_pairs(n, item.start_position)
        seconds = self.cost.iteration_time(prefill_tokens, num_decodes, decode_context, pairs, len(items))
        self.modelled_s = seconds
        time.sleep(max(0.0, self.step_started + seconds - self.host_overhead_s - time.perf_counter()))
        self.wait_ended = time.perf_counter()
        return sum(1 for item in items if item.needs_logits)

    def sample(self, rows: int, requests: list[SamplingRequest]) -> list[int]:
        return [PLACEHOLDER_TOKEN] * len(requests)


class LagMonitor:
    """How much longer than modelled back-to-back iterations take, from one iteration's end (its tokens' time) to
    the next's. Every ``interval_s`` seconds the median, P99 and maximum lag (milliseconds) are logged, as a warning
    when the P99 exceeds ``warn_fraction`` of the median modelled time (the host, not the model, then shapes the
    tail), and the window restarts."""

    def __init__(self, interval_s: float = 10.0, warn_fraction: float = 0.05) -> None:
        self.interval_s = interval_s
        self.warn_fraction = warn_fraction
        self._lags: list[float] = []
        self._modelled: list[float] = []
        self._since = time.perf_counter()

    def record(self, actual_s: float, modelled_s: float) -> None:
        self._lags.append(actual_s - modelled_s)
        self._modelled.append(modelled_s)
        now = time.perf_counter()
        if now - self._since >= self.interval_s:
            lags, n = sorted(self._lags), len(self._lags)
            p99, modelled = lags[min(n - 1, int(0.99 * n))], sorted(self._modelled)[n // 2]
            log.log(logging.WARNING if p99 > self.warn_fraction * modelled else logging.INFO,
                    "sim iterations over the cost model (%d back to back in %.0f s, median modelled %.2f ms): "
                    "median %.2f ms, P99 %.2f ms, max %.2f ms", n, now - self._since, 1e3 * modelled,
                    1e3 * lags[n // 2], 1e3 * p99, 1e3 * lags[-1])
            self._lags, self._modelled, self._since = [], [], now


class SimEngine(Engine):
    """``Engine`` with the cost-model executor (module docstring); adds the modelled KV transfer of handoffs."""

    def __init__(self, config: EngineConfig, policy: BatchPolicy | None = None, *, cost: CostModel,
                 handoff: SimHandoff | None = None) -> None:
        shape = cost.model
        layout = KVLayout(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                          block_size=config.block_size, dtype=f"sim-{shape.dtype}")
        executor = CostModelExecutor(cost)
        self._compose(config, policy, model_name=f"sim:{shape.name}",
                      kv=SimKVPool(layout, config.num_blocks or cost.kv_capacity_tokens() // config.block_size),
                      executor=executor, sampler=executor, eos_token_ids=set(),
                      max_model_len=config.max_model_len or SIM_CONTEXT_LEN)
        self.executor = executor
        self.cost = cost
        self.handoff = handoff or SimHandoff()
        self._arriving: dict[str, tuple[float, tuple, dict]] = {}
        """Handed-off requests whose modelled transfer has not finished: id -> (ready time, args, kwargs)."""
        self._last_step_end: float | None = None
        """When the previous iteration returned, if work was left for a back-to-back one (perf_counter seconds)."""
        self._last_wait_end = 0.0
        self.lag = LagMonitor()

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], *args: Any, **kwargs: Any) -> None:
        if request_id not in self.scheduler.reservations:
            raise KeyError(f"no KV reservation for request {request_id}")
        transfer_s = (self.handoff.latency_s
                      + len(prompt_token_ids) * self.cost.kv_bytes_per_token / self.handoff.bandwidth_Bps)
        started = kwargs.get("first_token_time") or time.time()
        self._arriving[request_id] = (started + transfer_s, (request_id, prompt_token_ids, *args), kwargs)

    def _land_arrivals(self) -> None:
        now = time.time()
        with self.blocks_lock:
            for request_id, (ready, args, kwargs) in list(self._arriving.items()):
                if ready <= now:
                    del self._arriving[request_id]
                    super().add_prefilled(*args, **kwargs)

    def has_work(self) -> bool:
        self._land_arrivals()
        return super().has_work() or bool(self._arriving)

    def step(self) -> StepOutput:
        runner = self.executor
        runner.step_started = time.perf_counter()
        last_step_end = self._last_step_end
        self._land_arrivals()
        if not self.scheduler.has_work():  # only transfers in flight: wait for the next to land
            time.sleep(max(0.0, min(ready for ready, _, _ in self._arriving.values()) - time.time()))
            self._land_arrivals()
            runner.step_started = time.perf_counter()
            last_step_end = None
        back_to_back = last_step_end is not None
        gap = runner.step_started - last_step_end if last_step_end is not None else 0.0
        output = super().step()
        ended = time.perf_counter()
        if output.duration_s > 0 and back_to_back:
            self.lag.record(runner.wait_ended - self._last_wait_end, runner.modelled_s)
        self._last_wait_end = runner.wait_ended
        if output.duration_s > 0:  # host work after the wait, plus the gap since a previous back-to-back iteration
            overhead = (ended - runner.wait_ended) + gap
            runner.host_overhead_s = 0.9 * runner.host_overhead_s + 0.1 * min(overhead, output.duration_s)
        # the next iteration follows back to back only if work is left now (else the gap is idle time)
        self._last_step_end = ended if output.duration_s > 0 and self.scheduler.has_work() else None
        return output

    def abort(self, request_id: str) -> bool:
        self._arriving.pop(request_id, None)
        return super().abort(request_id)
