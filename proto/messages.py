"""Every message Diptych services exchange. ``proto/README.md`` says who sends each one to whom, over which socket.

Units: times are wall-clock seconds since the epoch (``time.time()``) unless a name says otherwise; lengths are
tokens; KV sizes are blocks of ``KVLayout.block_size`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diptych.proto.codec import message, payload_field

HANDOFF_FRAMES = "zmq_frames"
"""KV handoff path: the blocks travel as raw frames of the ``KVHandoff`` message (through pinned host memory)."""
HANDOFF_CUDA_IPC = "cuda_ipc"
"""KV handoff path: the prefill worker pushed the blocks GPU to GPU into the decode worker's reservation."""

# ---------------------------------------------------------------- shared value types


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Validated by the frontend before it reaches any worker.

    ``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters. ``seed`` makes the
    request's sampling reproducible regardless of batch composition. ``max_tokens`` counts generated tokens and only
    stops generation: no allocator or scheduling policy reads it (KV is allocated as tokens are produced).
    ``stop_after_tokens`` [benchmark knob]: stop after exactly this many output tokens (EOS still applies unless
    ``ignore_eos``); like ``max_tokens`` it is read only by the stop rule, so a load generator can follow a
    workload's output lengths while sending a realistic ``max_tokens`` cap (None: off).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop_after_tokens: int | None = None


@dataclass
class SLO:
    """Latency targets of one request, in seconds. ``tier`` names the client's service class (e.g. strict/relaxed)."""

    tier: str = "default"
    ttft_s: float | None = None
    tbt_s: float | None = None


@dataclass
class Request:
    """A tokenized request as the coordinator and workers see it. ``request_id`` is unique for the cluster."""

    request_id: str
    client_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    stream_addr: str
    """ZeroMQ address of the frontend's token PULL socket that receives this request's ``TokenBatch`` messages."""
    slo: SLO = field(default_factory=SLO)
    weight: float = 1.0
    stream_key: str = "frontend"
    """Name of the CURVE key of the frontend at ``stream_addr``: workers connect to its token stream expecting it."""


@dataclass
class KVLayout:
    """Shape of a worker's KV pool. Two workers can hand KV to each other only if their layouts are equal.

    One block holds ``block_size`` tokens of K and V for all layers, contiguous (block-major):
    shape ``[num_layers, 2, block_size, num_kv_heads, head_dim]`` of ``dtype``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str


@dataclass
class WorkerLoad:
    """A worker's state, sent with every heartbeat. Blocks are KV blocks of the worker's pool."""

    free_blocks: int
    total_blocks: int
    num_waiting: int
    num_running: int
    waiting_prompt_tokens: int
    prefill_tps: float = 0.0
    """Recent prefill throughput of this worker while prefilling (prompt tokens per second; 0 = not measured)."""
    handoffs: dict[str, dict[str, float]] = field(default_factory=dict)
    """KV this worker handed off since it started, per path (``HANDOFF_FRAMES``, ``HANDOFF_CUDA_IPC``):
    ``requests``, ``bytes``, and ``seconds`` spent after prefill ended until the KV was sent or in place."""
    preemptions: int = 0
    """Sequences this worker preempted (by recompute) since it started."""
    recomputed_tokens: int = 0
    """Positions whose KV this worker dropped on preemption and computes again, since it started."""


@dataclass
class TokenOutput:
    """New tokens of one request. ``index`` is the position of ``token_ids[0]`` among the request's output tokens, so
    a receiver can order outputs that reach it from two workers (the first token comes from the prefill worker)."""

    request_id: str
    index: int
    token_ids: list[int]
    finish_reason: str | None = None
    """None while running; "stop" (EOS or stop token), "length" (max_tokens or context), "abort", or "error"."""
    timestamps: list[float] = field(default_factory=list)
    """Emission time of each token in ``token_ids`` (seconds since the epoch)."""
    events: dict[str, float] = field(default_factory=dict)
    """Phase times of the request (seconds since the epoch), sent once by the worker that saw them, on its first
    output for the request: the prefill worker sends ``admitted``, ``prefill_start``, ``prefill_end``; the decode
    worker sends ``handoff_start`` and ``handoff_end`` (KV sent by prefill / landed in the decode pool)."""


# ---------------------------------------------------------------- frontend <-> coordinator


@message("submit")
class SubmitRequest:
    request: Request


@message("cancel")
class CancelRequest:
    """Stop a request wherever it is and free everything it holds. Sent frontend -> coordinator -> workers."""

    request_id: str
    reason: str = "abort"


@message("request_failed")
class RequestFailed:
    """The coordinator or a worker gave up on a request. ``code`` follows HTTP (400 bad input, 429 rejected by an
    overload policy, 503 no capacity or worker lost, 500 internal)."""

    request_id: str
    code: int
    message: str
    retry_after_s: float | None = None


# ---------------------------------------------------------------- workers <-> coordinator


@message("register")
class RegisterWorker:
    worker_id: str
    role: str
    """"prefill", "decode", "colocated" (prefill and decode of the same requests in one batch), or "flex" (serves
    the prefill or the decode pool, as the coordinator's pool policy assigns it)."""
    model: str
    layout: KVLayout
    kv_addr: str
    """Decode workers: address of their KV ingress PULL socket. Prefill workers: empty."""
    load: WorkerLoad
    max_model_len: int
    kv_share: dict[str, Any] = field(default_factory=dict)
    """Decode workers whose KV pool is on a GPU: what a prefill worker on the same host needs to write into it GPU to
    GPU (``engine.kv_transfer.share_pool``: host, GPU UUID, CUDA IPC handle, shape). Empty otherwise."""


@message("register_ack")
class RegisterAck:
    ok: bool
    error: str = ""


@message("heartbeat")
class Heartbeat:
    """Sent from the worker's engine loop (not a side thread) so a stuck loop stops its heartbeats."""

    worker_id: str
    load: WorkerLoad
    time: float


@message("reserve_kv")
class ReserveKV:
    """Coordinator -> decode worker: hold ``num_blocks`` blocks for a request whose KV will arrive from prefill."""

    request_id: str
    num_blocks: int
    prefill_worker_id: str = ""
    """The worker that will push the KV: with CURVE the decode worker accepts it from that key only."""


@message("kv_reserved")
class KVReserved:
    """Decode worker -> coordinator: answer to ``ReserveKV``."""

    request_id: str
    worker_id: str
    ok: bool
    error: str = ""
    block_ids: list[int] = field(default_factory=list)
    """The reserved blocks, in order, when the worker shares its pool (``RegisterWorker.kv_share``); else empty."""


@message("prefill")
class PrefillTask:
    """Coordinator -> prefill worker: prefill ``request`` and push its KV to ``decode_kv_addr``. With
    ``colocated`` the receiving worker runs the whole request itself (no handoff; ``decode_worker_id`` is its own id
    and ``decode_kv_addr`` is empty)."""

    request: Request
    decode_worker_id: str
    decode_kv_addr: str
    admitted_time: float = 0.0
    """When the coordinator admitted the request (seconds since the epoch)."""
    decode_blocks: list[int] = field(default_factory=list)
    """The decode worker's reserved blocks (``KVReserved.block_ids``), for a GPU-to-GPU push; empty if not shared."""
    decode_kv_share: dict[str, Any] = field(default_factory=dict)
    """The decode worker's ``RegisterWorker.kv_share``; empty if it shares no GPU pool."""
    colocated: bool = False
    """Run the request from prompt to last token here (a colocated worker, or a flex worker in the colocated
    pool)."""


@message("prefill_done")
class PrefillDone:
    """Prefill worker -> coordinator: the prompt is processed and its first token emitted.

    ``handed_off`` is False when the request finished with its first token (no decode needed)."""

    request_id: str
    worker_id: str
    handed_off: bool
    prefill_start: float
    prefill_end: float


@message("kv_received")
class KVReceived:
    """Decode worker -> coordinator: a handoff landed in the reserved blocks; the request now decodes here."""

    request_id: str
    worker_id: str
    num_tokens: int
    transfer_s: float


@message("token_report")
class TokenReport:
    """Decode worker -> coordinator: output tokens generated per request since the last report (for fair-share
    accounting)."""

    worker_id: str
    counts: dict[str, int]


@message("request_done")
class RequestDone:
    """Worker -> coordinator: a request left this worker and released its blocks (finished, aborted or failed)."""

    request_id: str
    worker_id: str
    finish_reason: str


# ---------------------------------------------------------------- prefill -> decode (KV ingress socket)


@message("kv_handoff")
class KVHandoff:
    """The KV of a prefilled request, pushed into the blocks the decode worker reserved for it.

    ``path`` ``HANDOFF_FRAMES``: ``blocks`` holds one raw frame per block, each ``layout``-shaped and contiguous; the
    last block may be partly filled (``num_tokens`` says how many positions are valid in total).
    ``HANDOFF_CUDA_IPC``: the prefill worker has already written the KV into the reserved blocks, GPU to GPU, and
    every copy has landed; ``blocks`` is empty."""

    request: Request
    first_token_id: int
    first_token_time: float
    num_tokens: int
    layout: KVLayout
    blocks: list[Any] = payload_field()
    sent_time: float = 0.0
    """When the prefill worker began exporting the KV (seconds since the epoch)."""
    path: str = HANDOFF_FRAMES


@message("kv_push_aborted")
class KVPushAborted:
    """Prefill -> decode, on the KV socket: the request was aborted; this prefill worker will neither write into its
    reservation (GPU to GPU) nor send its KV, and copies already issued have landed. The decode worker may free
    blocks it kept for the request."""

    request_id: str
    worker_id: str


# ---------------------------------------------------------------- workers -> frontend (token stream socket)


@message("tokens")
class TokenBatch:
    outputs: list[TokenOutput]


# ---------------------------------------------------------------- SDK client <-> frontend


@message("client_generate")
class ClientGenerate:
    """SDK -> frontend. Exactly one of ``prompt`` / ``prompt_token_ids`` is set. ``api_key`` identifies the client."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    sampling: SamplingParams
    api_key: str | None = None
    slo: SLO | None = None
    stream: bool = True


@message("client_cancel")
class ClientCancel:
    request_id: str


@message("client_chunk")
class ClientChunk:
    """Frontend -> SDK: text and token ids produced since the previous chunk. ``text`` never splits a UTF-8
    character. The final chunk has ``finish_reason`` set and the usage counts."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timeline: dict[str, Any] | None = None
    """On the final chunk: the request's timeline (see ``services/frontend``: arrival, phase times, every token
    time, finish), seconds since the epoch."""


@message("client_error")
class ClientError:
    """Frontend -> SDK: the request failed. ``code`` follows HTTP; ``request_id`` is empty when the frame itself
    could not be decoded."""

    request_id: str
    code: int
    message: str
    retry_after_s: float | None = None


# ---------------------------------------------------------------- frontend <-> coordinator: cluster status


@message("status_query")
class StatusQuery:
    """Frontend -> coordinator: ask for a ``ClusterStatus`` (health checks, admin endpoint)."""


@message("cluster_status")
class ClusterStatus:
    """Coordinator -> frontend. ``admission`` is the admission policy's snapshot (counters, per-client service)."""

    prefill_workers: int
    decode_workers: int
    waiting: int
    in_flight: int
    admission: dict[str, Any] = field(default_factory=dict)
    workers: dict[str, Any] = field(default_factory=dict)
    colocated_workers: int = 0
    pools: dict[str, Any] = field(default_factory=dict)
    """The pool policy's state: its name and recent worker moves with their reasons."""
    clients: dict[str, Any] = field(default_factory=dict)
    """Service delivered per client (input and output tokens, requests, ``input + 2 * output``), for any policy."""
    instance: str = ""
    """Id of the coordinator process: a new one after a restart (its predecessor's requests are gone)."""


# ---------------------------------------------------------------- coordinator -> frontend: request migration


@message("request_lost")
class RequestLost:
    """Coordinator -> frontend: a worker that held the request was lost (exited, evicted, or silent past its
    heartbeat deadline, or it re-registered as a new process). The coordinator has already released everything it
    held for the request; the frontend, which knows the tokens it streamed, resubmits the prompt plus those tokens
    under a new request id for the remaining ``max_tokens`` (``docs/reliability.md``), or fails it."""

    request_id: str
    reason: str


# ---------------------------------------------------------------- coordinator -> frontend: placement


@message("request_placed")
class RequestPlaced:
    """Coordinator -> frontend: the workers request ``request_id`` was placed on (its prefill and decode workers, one
    when colocated), sent before they get its work. With CURVE the frontend accepts the request's ``TokenBatch``
    outputs only from these workers' keys."""

    request_id: str
    workers: list[str]
