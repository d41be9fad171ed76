"""The engine one worker runs: requests in, one batched model iteration per ``step``, tokens out.

``Engine`` composes the request state machine (``engine.scheduler.Scheduler``: waiting / running / prefilled /
reserved tables, block accounting, plan admission, stop rules; its module docstring states the lifecycle and
invariants) with an executor that runs the iteration: a model forward pass (``ModelRunner``) and a ``Sampler``
here, a modelled wait in ``engine.sim_engine``. Prefilled requests' KV leaves by ``export_kv`` then ``release``;
handed-off KV enters by ``reserve`` then ``add_prefilled``.

Threads: call the engine from one thread, except ``reserve`` and ``reserved_blocks`` (and ``take_reservation`` /
``free_blocks``), which may run on another thread while ``step`` executes (a decode worker reserves room for
incoming KV without waiting for the iteration in flight, and names the blocks to a GPU-to-GPU sender). They take
``blocks_lock`` around what touches the allocator and the request tables, and ``step`` releases it for the forward
pass.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Protocol

from diptych.cluster.blocks import blocks_for
from diptych.engine.config import EngineConfig
from diptych.engine.model_runner import ModelRunner
from diptych.engine.outputs import StepOutput
from diptych.engine.sampler import Sampler, SamplingRequest
from diptych.engine.scheduler import ForwardItem, Scheduler
from diptych.engine.tiny_model import resolve_model
from diptych.policies.batch import BatchPolicy, SarathiBatching
from diptych.proto.messages import SLO, KVLayout, SamplingParams, WorkerLoad

log = logging.getLogger(__name__)

WARM_UP_PROMPT_TOKENS = (2048, 1, 17, 100, 700)
"""Prompt lengths (tokens, clipped to the context and the pool) of ``Engine.warm_up``'s throwaway requests: one long
prefill alone, then several lengths together (chunked prefill mixed with decodes)."""
WARM_UP_DECODE_BATCH = 16
"""Most short requests ``Engine.warm_up`` decodes together, with filtered sampling (fewer if the pool is small)."""
WARM_UP_OUTPUT_TOKENS = 4
WARM_UP_SWEEP_TOKENS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)
"""On a GPU, ``Engine.warm_up`` also prefills one prompt of each of these lengths alone (one output token): the GEMM
and attention kernels chosen per row count are loaded (CUDA loads kernels lazily) before the first requests."""


class Executor(Protocol):
    """Runs one iteration's forward items; returns what ``TokenSampler.sample`` turns into one token per item
    that needs logits."""

    vocab_size: int

    def execute(self, items: list[ForwardItem]) -> Any: ...


class TokenSampler(Protocol):
    def sample(self, logits: Any, requests: list[SamplingRequest]) -> list[int]: ...


class KVPool(Protocol):
    """The KV pool the scheduler's blocks index: its allocator and raw export/import of blocks."""

    layout: KVLayout

    @property
    def allocator(self) -> Any: ...

    def export_blocks(self, block_ids: list[int]) -> list[Any]: ...

    def import_blocks(self, block_ids: list[int], frames: list[Any]) -> None: ...


class Engine:
    """Model, KV pool, sequences and batch policy of one worker. Single-threaded but for ``reserve`` (module
    docstring)."""

    def __init__(self, config: EngineConfig, policy: BatchPolicy | None = None, *, model=None) -> None:
        """``model``: an already built Hugging Face model (loaded with ``attn_implementation="diptych_paged"``) to
        use instead of loading ``config.model``'s weights; the tokenizer still comes from ``config.model``."""
        model_name = resolve_model(config.model)
        runner = ModelRunner(config, model_name, model)
        self._compose(config, policy, model_name=model_name, kv=runner.kv, executor=runner,
                      sampler=Sampler(config.seed), eos_token_ids=runner.eos_token_ids,
                      max_model_len=_resolve_max_model_len(config.max_model_len, runner.max_position_embeddings),
                      tokenizer=runner.tokenizer)

    def _compose(self, config: EngineConfig, policy: BatchPolicy | None, *, model_name: str, kv: KVPool,
                 executor: Executor, sampler: TokenSampler, eos_token_ids: set[int], max_model_len: int,
                 tokenizer: Any = None) -> None:
        """Set up the engine around an executor (the model engine's or the sim engine's) and one ``Scheduler``."""
        self.config = config
        self.model_name = model_name
        self.kv = kv
        self.layout = kv.layout
        self.runner = executor
        self.sampler = sampler
        self.block_size = kv.layout.block_size
        self.num_blocks = kv.allocator.num_blocks
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(
            policy if policy is not None else SarathiBatching(), kv.allocator, block_size=self.block_size,
            vocab_size=executor.vocab_size, max_model_len=max_model_len, eos_token_ids=eos_token_ids,
            watermark=config.kv_watermark,
        )
        self.blocks_lock: threading.RLock = self.scheduler.blocks_lock
        log.info("KV pool: %d blocks of %d tokens = %d tokens on %s", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, config.device)

    @property
    def policy(self) -> BatchPolicy:
        return self.scheduler.policy

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that finish a request (unless its sampling ignores EOS)."""
        return self.scheduler.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, token_ids: set[int]) -> None:
        self.scheduler.eos_token_ids = token_ids

    @property
    def max_model_len(self) -> int:
        """Most positions (prompt plus output tokens) a request may reach."""
        return self.scheduler.max_model_len

    # ------------------------------------------------------------------ requests in

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        arrival_time: float | None = None,
        slo: SLO | None = None,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request. With ``prefill_only`` it stops after its prefill and first token (status PREFILLED,
        blocks kept for ``export_kv``) unless that token already finishes it. Raises ``ValueError`` for a bad
        request (empty prompt, duplicate id, unknown token ids, too long, or needing more blocks than the pool)."""
        self.scheduler.add_request(request_id, prompt_token_ids, sampling, arrival_time=arrival_time, slo=slo,
                                   prefill_only=prefill_only)

    def blocks_needed(self, prompt_len: int) -> int:
        """Blocks a decode worker must ``reserve`` for a handed-off request: its prompt's (it grows on demand)."""
        return blocks_for(prompt_len, self.block_size)

    def reserve(self, request_id: str, num_blocks: int) -> bool:
        """Hold ``num_blocks`` blocks for a request whose KV will arrive by ``add_prefilled``. False (holding
        nothing) when fewer are free. Repeating an identical reservation is a no-op returning True; a non-positive
        count or an id otherwise in use raises ``ValueError``. Safe to call while ``step`` runs on another
        thread."""
        return self.scheduler.reserve(request_id, num_blocks)

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        sampling: SamplingParams,
        frames: list | None,
        num_tokens: int,
        *,
        arrival_time: float | None = None,
        slo: SLO | None = None,
        first_token_time: float | None = None,
    ) -> None:
        """Write a handed-off prompt KV (``frames``: one raw buffer per block, covering ``num_tokens`` ==
        prompt length positions) into the request's reserved blocks and start decoding it, with
        ``[first_token_id]`` as its output so far. ``frames=None``: the KV is already in the reserved blocks (a
        GPU-to-GPU push, ``engine.kv_transfer``). ``KeyError`` without a reservation; ``ValueError`` (reservation
        kept, nothing written) for mismatched sizes, a too small reservation, or a first token that already
        finishes the request."""
        kv, received = self.kv, frames
        self.scheduler.add_prefilled(
            request_id, prompt_token_ids, first_token_id, sampling, num_tokens, arrival_time=arrival_time, slo=slo,
            first_token_time=first_token_time,
            write_kv=None if received is None else lambda block_ids: kv.import_blocks(block_ids, received),
        )

    # ------------------------------------------------------------------ KV out, cancellation

    def export_kv(self, request_id: str) -> list[Any]:
        """The prompt KV of a PREFILLED request: one contiguous CPU buffer per block, covering its prompt
        positions, valid after the blocks are released. Call ``release`` afterwards. ``KeyError`` if the request
        is not prefilled here."""
        sequence = self.scheduler.prefilled_sequence(request_id)
        return self.kv.export_blocks(sequence.block_table[: blocks_for(sequence.prompt_len, self.block_size)])

    def reserved_blocks(self, request_id: str) -> list[int]:
        """The block ids reserved for ``request_id`` (what a GPU-to-GPU sender writes into). ``KeyError`` if none.
        Safe to call while ``step`` runs on another thread."""
        return self.scheduler.reserved_blocks(request_id)

    def computed_blocks(self, request_id: str) -> tuple[list[int], int]:
        """``(block_table, num_computed)`` of a running or prefilled request: positions ``0 .. num_computed - 1``
        have KV in those blocks (for streaming a handoff while prefill runs). ``KeyError`` otherwise."""
        return self.scheduler.computed_blocks(request_id)

    def release(self, request_id: str) -> bool:
        """Free a PREFILLED request's blocks once its KV is exported. False if it is not prefilled here."""
        return self.scheduler.release(request_id)

    def abort(self, request_id: str) -> bool:
        """End the request wherever it is (waiting, running, prefilled, reserved) and free its blocks. Idempotent:
        False when the engine does not hold it."""
        return self.scheduler.abort(request_id)

    def take_reservation(self, request_id: str) -> list[int] | None:
        """End a reservation without freeing its blocks (a peer may still be writing into them, GPU to GPU): the
        caller owns them and gives them back with ``free_blocks``. None if ``request_id`` holds no reservation."""
        return self.scheduler.take_reservation(request_id)

    def free_blocks(self, block_ids: list[int]) -> None:
        """Return blocks taken with ``take_reservation`` to the pool."""
        self.scheduler.free_blocks(block_ids)

    # ------------------------------------------------------------------ iterations

    def request_ids(self) -> list[str]:
        """Every request id this engine holds: waiting, running, prefilled or reserved."""
        return self.scheduler.request_ids()

    def has_work(self) -> bool:
        """True while a request waits or runs (prefilled and reserved requests need no iterations)."""
        return self.scheduler.has_work()

    def step(self) -> StepOutput:
        """Run one iteration as the batch policy plans it: admit, run one packed forward pass, sample, apply stop
        conditions and free finished requests. Returns an empty output when the plan is empty."""
        started = time.perf_counter()
        start_time = time.time()
        scheduler = self.scheduler
        with self.blocks_lock:
            planned = scheduler.plan_iteration(start_time)
        plan = planned.plan
        if plan.is_empty():  # nothing runs (a plan may still have preempted a decode that did not fit)
            return StepOutput(preempted=list(plan.preempt), start_time=start_time)
        logits = self.runner.execute([item for _, item in planned.scheduled])
        sampling_sequences = scheduler.advance(planned)
        token_ids = self.sampler.sample(
            logits, [SamplingRequest(s.sampling, len(s.output_token_ids)) for s in sampling_sequences]
        )
        ended = time.time()
        output = StepOutput(
            num_prefill_tokens=sum(n for _, n in plan.prefill_chunks), num_decodes=len(plan.decodes),
            admitted=planned.admitted, start_time=start_time, preempted=list(plan.preempt),
        )
        with self.blocks_lock:
            scheduler.record_tokens(sampling_sequences, token_ids, ended, output)
        output.duration_s = time.perf_counter() - started
        scheduler.policy.on_iteration_end(output.duration_s, time.time())
        return output

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Offline convenience: run ``prompts`` to completion with the same ``sampling``; returns their output
        token ids in prompt order."""
        batch = uuid.uuid4().hex[:8]
        request_ids = [f"generate-{batch}-{i}" for i in range(len(prompts))]
        try:
            for request_id, prompt in zip(request_ids, prompts):
                self.add_request(request_id, prompt, sampling)
        except ValueError:
            for request_id in request_ids:
                self.abort(request_id)
            raise
        outputs: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
        while any(self.scheduler.in_flight(request_id) for request_id in request_ids):
            step = self.step()
            if step.duration_s == 0 and not step.tokens and not step.preempted:
                raise RuntimeError("the batch policy scheduled nothing although requests are waiting")
            for token in step.tokens:
                if token.request_id in outputs:
                    outputs[token.request_id].append(token.token_id)
        return [outputs[request_id] for request_id in request_ids]

    def load(self) -> WorkerLoad:
        return self.scheduler.load()

    def warm_up(self) -> float:
        """Run throwaway requests through every kind of iteration the engine will run (a long prefill, chunked
        prefills mixed with decodes, a batch of decodes, greedy and filtered sampling; on a GPU also a sweep of
        prompt lengths, ``WARM_UP_SWEEP_TOKENS``), so kernel compilation, autotuning, lazy kernel loading and
        allocations happen now rather than on the first clients' requests (CUDA graphs are captured when the engine
        is built). Call it before serving, with no request in the engine; afterwards the
        engine holds no request and every block is free again. A throwaway ``SarathiBatching`` plans these
        iterations, so the batch policy's iteration-time feedback never sees them. Returns the seconds spent."""
        if self.request_ids():
            raise RuntimeError("warm_up needs an idle engine")
        started = time.perf_counter()
        output = WARM_UP_OUTPUT_TOKENS
        longest = max(1, min(self.max_model_len - output - 1, self.num_blocks * self.block_size - output - 1))
        lengths = [min(n, longest) for n in WARM_UP_PROMPT_TOKENS]
        together = [n for n in lengths[1:] if n < longest] or [1]
        while sum(blocks_for(n + output, self.block_size) for n in together) > self.num_blocks:
            together.pop()
        per_decode = blocks_for(1 + output, self.block_size)
        decodes = max(1, min(WARM_UP_DECODE_BATCH, self.num_blocks // per_decode))
        greedy = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
        filtered = SamplingParams(max_tokens=output, temperature=0.8, top_p=0.9, top_k=40, seed=0, ignore_eos=True)
        token = min(1, self.runner.vocab_size - 1)
        policy = self.scheduler.policy
        self.scheduler.policy = SarathiBatching()
        try:
            self.generate([[token] * lengths[0]], greedy)
            if together:
                self.generate([[token] * n for n in together], greedy)
            self.generate([[token]] * decodes, filtered)
            if self.config.device != "cpu":
                first_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
                for n in WARM_UP_SWEEP_TOKENS:
                    if n <= longest:
                        self.generate([[token] * n], first_token)
        finally:
            self.scheduler.policy = policy
        seconds = time.perf_counter() - started
        log.info("engine warm in %.1f s", seconds)
        return seconds


def _resolve_max_model_len(configured: int | None, max_position_embeddings: int | None) -> int:
    if configured is None:
        if max_position_embeddings is None:
            raise ValueError("the model config has no max_position_embeddings: set EngineConfig.max_model_len")
        return max_position_embeddings
    if max_position_embeddings is not None and configured > max_position_embeddings:
        raise ValueError(f"max_model_len {configured} exceeds the model's max_position_embeddings "
                         f"{max_position_embeddings}")
    return configured
