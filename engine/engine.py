"""The engine one worker runs: requests in, one batched model iteration per ``step``, tokens out.

Lifecycle of a request id in one engine: ``add_request`` (waiting) -> admitted by the batch policy (running: its
blocks are taken) -> finished (blocks freed), or, with ``prefill_only``, prefilled (blocks kept) -> ``export_kv``
-> ``release``. On a decode worker: ``reserve`` (blocks held) -> ``add_prefilled`` (running) -> finished.
``abort`` ends a request in any of these states and frees what it holds.

Invariants: a request id lives in at most one of waiting / running / prefilled / reserved; every allocated block
belongs to exactly one of them; blocks are taken once per request (``blocks_to_reserve``), so a running request
never needs another block and the engine never preempts.

Threads: call the engine from one thread, except ``reserve`` and ``reserved_blocks``, which may run on another
thread while ``step`` executes (a decode worker reserves room for incoming KV without waiting for the iteration in
flight, and names the blocks to a GPU-to-GPU sender). They take ``blocks_lock`` around what touches the allocator
and the request tables, and ``step`` releases it for the forward pass.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

from diptych.engine.config import EngineConfig
from diptych.engine.model_runner import ForwardItem, ModelRunner
from diptych.engine.outputs import SampledToken, StepOutput
from diptych.engine.sampler import Sampler, SamplingRequest
from diptych.engine.sequence import Sequence, SequenceStatus, blocks_to_reserve
from diptych.engine.tiny_model import resolve_model
from diptych.policies.batch import BatchPlan, BatchPolicy, KVState, SarathiBatching
from diptych.proto.messages import SLO, SamplingParams, WorkerLoad


class Engine:
    """Model, KV pool, sequences and batch policy of one worker. Single-threaded but for ``reserve`` (module
    docstring)."""

    def __init__(self, config: EngineConfig, policy: BatchPolicy | None = None, *, model=None) -> None:
        """``model``: an already built Hugging Face model (loaded with ``attn_implementation="diptych_paged"``) to
        use instead of loading ``config.model``'s weights; the tokenizer still comes from ``config.model``."""
        self.config = config
        self.policy = policy if policy is not None else SarathiBatching()
        self.model_name = resolve_model(config.model)
        self.runner = ModelRunner(config, self.model_name, model)
        self.kv = self.runner.kv
        self.tokenizer = self.runner.tokenizer
        self.layout = self.runner.layout
        self.eos_token_ids: set[int] = self.runner.eos_token_ids
        self.block_size = self.kv.block_size
        self.num_blocks = self.kv.num_blocks
        self.max_model_len = _resolve_max_model_len(config.max_model_len, self.runner.max_position_embeddings)
        self.sampler = Sampler(config.seed)
        self._waiting: dict[str, Sequence] = {}
        self._running: dict[str, Sequence] = {}
        self._prefilled: dict[str, Sequence] = {}
        self._reservations: dict[str, list[int]] = {}
        self.blocks_lock = threading.RLock()

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
        self._check_new_id(request_id)
        self._check_request(prompt_token_ids, sampling)
        needed = blocks_to_reserve(len(prompt_token_ids), sampling.max_tokens, self.block_size, prefill_only)
        if needed > self.num_blocks:
            raise ValueError(f"request {request_id} needs {needed} KV blocks, the pool has {self.num_blocks}")
        self._waiting[request_id] = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            slo=slo or SLO(),
            prefill_only=prefill_only,
        )

    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Blocks a decode worker must ``reserve`` for a handed-off request (the admission reservation rule)."""
        return blocks_to_reserve(prompt_len, max_tokens, self.block_size)

    def reserve(self, request_id: str, num_blocks: int) -> bool:
        """Hold ``num_blocks`` blocks for a request whose KV will arrive by ``add_prefilled``. False (holding
        nothing) when fewer are free. Repeating an identical reservation is a no-op returning True; a non-positive
        count or an id otherwise in use raises ``ValueError``. Safe to call while ``step`` runs on another
        thread."""
        if num_blocks <= 0:
            raise ValueError(f"reserve needs a positive number of blocks, got {num_blocks}")
        with self.blocks_lock:
            if len(self._reservations.get(request_id, ())) == num_blocks:
                return True
            self._check_new_id(request_id)
            if num_blocks > self.kv.allocator.num_free:
                return False
            self._reservations[request_id] = self.kv.allocator.allocate(num_blocks)
            return True

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        sampling: SamplingParams,
        frames: list,
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
        if request_id not in self._reservations:
            raise KeyError(f"no KV reservation for request {request_id}")
        blocks = self._reservations[request_id]
        self._check_request(prompt_token_ids, sampling)
        self._check_vocabulary([first_token_id])
        if num_tokens != len(prompt_token_ids):
            raise ValueError(f"handoff of {num_tokens} positions for a prompt of {len(prompt_token_ids)} tokens")
        needed = self.blocks_needed(num_tokens, sampling.max_tokens)
        if len(blocks) < needed:
            raise ValueError(f"request {request_id} reserved {len(blocks)} blocks, it needs {needed}")
        now = time.time()
        sequence = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            arrival_time=now if arrival_time is None else arrival_time,
            slo=slo or SLO(),
            block_table=blocks,
            num_computed=num_tokens,
            status=SequenceStatus.RUNNING,
        )
        token_time = now if first_token_time is None else first_token_time
        if sequence.append_token(first_token_id, token_time, self.eos_token_ids, self.max_model_len) is not None:
            raise ValueError(f"request {request_id} already finished with its first token")
        if frames is not None:
            self.kv.import_blocks(blocks[: math.ceil(num_tokens / self.block_size)], frames)
        del self._reservations[request_id]
        self._running[request_id] = sequence

    # ------------------------------------------------------------------ KV out, cancellation

    def export_kv(self, request_id: str) -> list[memoryview]:
        """The prompt KV of a PREFILLED request: one contiguous CPU buffer per block, covering its prompt
        positions, valid after the blocks are released. Call ``release`` afterwards. ``KeyError`` if the request
        is not prefilled here."""
        sequence = self._prefilled.get(request_id)
        if sequence is None:
            raise KeyError(f"request {request_id} is not a prefilled request of this engine")
        return self.kv.export_blocks(sequence.block_table[: math.ceil(sequence.prompt_len / self.block_size)])

    def reserved_blocks(self, request_id: str) -> list[int]:
        """The block ids reserved for ``request_id`` (what a GPU-to-GPU sender writes into). ``KeyError`` if none.
        Safe to call while ``step`` runs on another thread."""
        with self.blocks_lock:
            return list(self._reservations[request_id])

    def computed_blocks(self, request_id: str) -> tuple[list[int], int]:
        """``(block_table, num_computed)`` of a running or prefilled request: positions ``0 .. num_computed - 1``
        have KV in those blocks (for streaming a handoff while prefill runs). ``KeyError`` otherwise."""
        sequence = self._running.get(request_id) or self._prefilled.get(request_id)
        if sequence is None:
            raise KeyError(f"request {request_id} is not running or prefilled here")
        return sequence.block_table, sequence.num_computed

    def release(self, request_id: str) -> bool:
        """Free a PREFILLED request's blocks once its KV is exported. False if it is not prefilled here."""
        sequence = self._prefilled.pop(request_id, None)
        if sequence is None:
            return False
        self._free(sequence)
        return True

    def abort(self, request_id: str) -> bool:
        """End the request wherever it is (waiting, running, prefilled, reserved) and free its blocks. Idempotent:
        False when the engine does not hold it."""
        reserved = self._reservations.pop(request_id, None)
        if reserved is not None:
            self.kv.allocator.free(reserved)
            return True
        for queue in (self._waiting, self._running, self._prefilled):
            sequence = queue.pop(request_id, None)
            if sequence is not None:
                sequence.finish_reason = "abort"
                self._free(sequence)
                return True
        return False

    def take_reservation(self, request_id: str) -> list[int] | None:
        """End a reservation without freeing its blocks (a peer may still be writing into them, GPU to GPU): the
        caller owns them and gives them back with ``free_blocks``. None if ``request_id`` holds no reservation."""
        with self.blocks_lock:
            return self._reservations.pop(request_id, None)

    def free_blocks(self, block_ids: list[int]) -> None:
        """Return blocks taken with ``take_reservation`` to the pool."""
        with self.blocks_lock:
            self.kv.allocator.free(block_ids)

    # ------------------------------------------------------------------ iterations

    def request_ids(self) -> list[str]:
        """Every request id this engine holds: waiting, running, prefilled or reserved."""
        return [*self._waiting, *self._running, *self._prefilled, *self._reservations]

    def has_work(self) -> bool:
        """True while a request waits or runs (prefilled and reserved requests need no iterations)."""
        return bool(self._waiting or self._running)

    def step(self) -> StepOutput:
        """Run one iteration as the batch policy plans it: admit, run one packed forward pass, sample, apply stop
        conditions and free finished requests. Returns an empty output when the plan is empty."""
        started = time.perf_counter()
        start_time = time.time()
        with self.blocks_lock:
            plan, scheduled, admitted = self._plan_iteration()
        if plan.is_empty():
            return StepOutput()
        logits = self.runner.execute([item for _, item in scheduled])
        sampling_sequences = []
        for sequence, item in scheduled:
            sequence.num_computed += len(item.token_ids)
            if item.needs_logits:
                sampling_sequences.append(sequence)
        token_ids = self.sampler.sample(
            logits, [SamplingRequest(s.sampling, len(s.output_token_ids)) for s in sampling_sequences]
        )
        ended = time.time()
        output = StepOutput(
            num_prefill_tokens=sum(n for _, n in plan.prefill_chunks), num_decodes=len(plan.decodes),
            admitted=admitted, start_time=start_time,
        )
        with self.blocks_lock:
            for sequence, token_id in zip(sampling_sequences, token_ids):
                self._record_token(sequence, token_id, ended, output)
        output.duration_s = time.perf_counter() - started
        self.policy.on_iteration_end(output.duration_s, time.time())
        return output

    def _plan_iteration(self) -> tuple[BatchPlan, list[tuple[Sequence, ForwardItem]], list[str]]:
        """Ask the policy for a plan, check it and admit its new requests (blocks taken); returns the plan, the
        forward items in batch order and the admitted ids."""
        plan = self.policy.schedule(
            [sequence.to_state(self.block_size) for sequence in self._waiting.values()],
            [sequence.to_state(self.block_size) for sequence in self._running.values()],
            KVState(free_blocks=self.kv.allocator.num_free, total_blocks=self.num_blocks, block_size=self.block_size),
            time.time(),
        )
        self._check_plan(plan)
        scheduled: list[tuple[Sequence, ForwardItem]] = []
        admitted: list[str] = []
        for request_id, num_tokens in plan.prefill_chunks:
            if request_id not in self._running:
                admitted.append(request_id)
            sequence = self._running[request_id] if request_id in self._running else self._admit(request_id)
            chunk, start = sequence.next_chunk(num_tokens)
            last = start + num_tokens == sequence.prompt_len
            scheduled.append((sequence, ForwardItem(chunk, start, sequence.block_table, needs_logits=last)))
        for request_id in plan.decodes:
            sequence = self._running[request_id]
            token, position = sequence.decode_input()
            scheduled.append((sequence, ForwardItem(token, position, sequence.block_table, needs_logits=True)))
        return plan, scheduled, admitted

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
        while any(request_id in self._waiting or request_id in self._running for request_id in request_ids):
            step = self.step()
            if step.duration_s == 0 and not step.tokens:
                raise RuntimeError("the batch policy scheduled nothing although requests are waiting")
            for token in step.tokens:
                if token.request_id in outputs:
                    outputs[token.request_id].append(token.token_id)
        return [outputs[request_id] for request_id in request_ids]

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            free_blocks=self.kv.allocator.num_free,
            total_blocks=self.num_blocks,
            num_waiting=len(self._waiting),
            num_running=len(self._running),
            waiting_prompt_tokens=sum(sequence.prompt_len for sequence in self._waiting.values()),
        )

    # ------------------------------------------------------------------ internals

    def _admit(self, request_id: str) -> Sequence:
        sequence = self._waiting.pop(request_id)
        sequence.block_table = self.kv.allocator.allocate(sequence.blocks_to_admit(self.block_size))
        sequence.status = SequenceStatus.RUNNING
        self._running[request_id] = sequence
        return sequence

    def _record_token(self, sequence: Sequence, token_id: int, now: float, output: StepOutput) -> None:
        reason = sequence.append_token(token_id, now, self.eos_token_ids, self.max_model_len)
        index = len(sequence.output_token_ids) - 1
        output.tokens.append(SampledToken(sequence.request_id, token_id, index, reason, now))
        if reason is not None:
            del self._running[sequence.request_id]
            self._free(sequence)
            output.finished.append(sequence.request_id)
        elif sequence.prefill_only:
            del self._running[sequence.request_id]
            sequence.status = SequenceStatus.PREFILLED
            self._prefilled[sequence.request_id] = sequence
            output.prefilled.append(sequence.request_id)

    def _free(self, sequence: Sequence) -> None:
        self.kv.allocator.free(sequence.block_table)
        sequence.block_table = []
        sequence.status = SequenceStatus.FINISHED

    def _check_plan(self, plan: BatchPlan) -> None:
        """Reject a plan this engine cannot execute, before anything changes."""
        name = type(self.policy).__name__
        if plan.preempt:
            raise RuntimeError(f"{name} asked to preempt {plan.preempt}; this engine reserves all blocks at "
                               "admission and never preempts")
        ids = [request_id for request_id, _ in plan.prefill_chunks] + list(plan.decodes)
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"{name} scheduled a request twice in one iteration: {ids}")
        admit_blocks = 0
        for request_id, _ in plan.prefill_chunks:
            if request_id in self._waiting:
                admit_blocks += self._waiting[request_id].blocks_to_admit(self.block_size)
            elif request_id not in self._running or not self._running[request_id].in_prefill:
                raise RuntimeError(f"{name} scheduled a prefill chunk for {request_id}, which is not in prefill")
        for request_id in plan.decodes:
            if request_id not in self._running or self._running[request_id].in_prefill:
                raise RuntimeError(f"{name} scheduled a decode for {request_id}, which is not decoding")
        if admit_blocks > self.kv.allocator.num_free:
            raise RuntimeError(f"{name} admitted requests needing {admit_blocks} blocks with "
                               f"{self.kv.allocator.num_free} free")

    def _check_new_id(self, request_id: str) -> None:
        if any(request_id in queue for queue in (self._waiting, self._running, self._prefilled, self._reservations)):
            raise ValueError(f"request id {request_id!r} is already in use")

    def _check_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self._check_vocabulary(prompt_token_ids)
        _check_sampling(sampling)
        if len(prompt_token_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens + max_tokens {sampling.max_tokens} "
                             f"exceeds max_model_len {self.max_model_len}")

    def _check_vocabulary(self, token_ids: list[int]) -> None:
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.runner.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary of {self.runner.vocab_size}: {bad[:8]}")


def _check_sampling(sampling: SamplingParams) -> None:
    if sampling.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
    if sampling.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {sampling.top_k}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")


def _resolve_max_model_len(configured: int | None, max_position_embeddings: int | None) -> int:
    if configured is None:
        if max_position_embeddings is None:
            raise ValueError("the model config has no max_position_embeddings: set EngineConfig.max_model_len")
        return max_position_embeddings
    if max_position_embeddings is not None and configured > max_position_embeddings:
        raise ValueError(f"max_model_len {configured} exceeds the model's max_position_embeddings "
                         f"{max_position_embeddings}")
    return configured
