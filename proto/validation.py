"""Range and size checks every received message passes before a service sees it.

``codec.decode`` checks types (and a global cap on every string and list, ``MAX_TEXT_CHARS``, ``MAX_LIST_ITEMS``);
this module adds, per message type, the ranges its receiver relies on: non-empty bounded ids, positive
``max_tokens``, ``temperature >= 0``, ``top_p`` in (0, 1], non-negative counts and blocks, token ids in
``[0, MAX_TOKEN_ID]``, bounded lists and maps. A message outside them raises ``ProtocolError``, which every receiver
already answers or drops. The limits are documented in ``proto/README.md``.

What no message can tell on its own stays with the receiver: a prompt against the model's context length or
vocabulary (the coordinator's ``max_model_len``), a block count against a pool's size, a request id it never issued.
``ClientGenerate.sampling`` and ``ClientGenerate.slo`` get only size checks here: the frontend checks their ranges
and answers with the SDK's request id (a 400 naming the parameter), which a decode error could not carry.

Cost: a few comparisons per message, plus one pass over each token-id list (``min``/``max`` in C).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from diptych.proto import messages as m
from diptych.proto.codec import ProtocolError, register_check
from diptych.proto.roles import WorkerRole

MAX_ID_CHARS = 256
"""Request, client and worker ids (never empty where the message names one)."""
MAX_NAME_CHARS = 256
"""Short names: SLO tier, worker role, finish and cancel reasons, handoff path, dtype, map keys."""
MAX_ADDR_CHARS = 1024
"""ZeroMQ addresses (``stream_addr``, ``kv_addr``, ``decode_kv_addr``)."""
MAX_MODEL_CHARS = 4096
"""A model name or path (``RegisterWorker.model``)."""
MAX_API_KEY_CHARS = 1024
MAX_MESSAGE_CHARS = 65536
"""Error and refusal messages (``RequestFailed``, ``ClientError``, ``RegisterAck``, ``KVReserved``)."""
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
"""Per stop string, in characters."""
MAX_STOP_TOKEN_IDS = 1024
MAX_CONTEXT_TOKENS = 1 << 20
"""Bound of any token list or token count (prompt, ``max_tokens``, ``num_tokens``, one output's tokens)."""
MAX_TOKEN_ID = (1 << 31) - 1
MAX_BLOCKS = 1 << 22
"""Bound of a block count or list (a reservation, a pool, a handoff's frames)."""
MAX_BATCH_OUTPUTS = 65536
"""Outputs in one ``TokenBatch``."""
MAX_PLACEMENT = 16
"""Workers named in one ``RequestPlaced`` (a request's prefill and decode workers)."""
MAX_MAP_ENTRIES = 65536
"""Entries of a map field (``TokenReport.counts``, ``TokenOutput.events``, ``WorkerLoad.handoffs``)."""
MAX_PROMPT_CHARS = 16 << 20
"""``ClientGenerate.prompt``; the frontend then holds it against the model's context (characters per token)."""
FINISH_REASONS = frozenset({"stop", "length", "abort", "error"})
HANDOFF_PATHS = frozenset({m.HANDOFF_FRAMES, m.HANDOFF_CUDA_IPC})
ROLES = frozenset(role.value for role in WorkerRole)


def _bad(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"{where}: {what}")


def text(value: str, where: str, limit: int, *, empty: bool = True) -> None:
    if len(value) > limit:
        raise _bad(where, f"{len(value)} characters, more than {limit}")
    if not empty and not value:
        raise _bad(where, "must not be empty")


def ident(value: str, where: str) -> None:
    text(value, where, MAX_ID_CHARS, empty=False)


def count(value: int, where: str, limit: int, minimum: int = 0) -> None:
    if not minimum <= value <= limit:
        raise _bad(where, f"{value} outside [{minimum}, {limit}]")


def finite(value: float, where: str, minimum: float = -math.inf) -> None:
    if not (math.isfinite(value) and value >= minimum):
        raise _bad(where, f"{value} is not a finite number >= {minimum}")


def token_ids(ids: list[int], where: str, limit: int = MAX_CONTEXT_TOKENS, *, empty: bool = True) -> None:
    if len(ids) > limit:
        raise _bad(where, f"{len(ids)} tokens, more than {limit}")
    if not ids:
        if not empty:
            raise _bad(where, "must not be empty")
        return
    if min(ids) < 0 or max(ids) > MAX_TOKEN_ID:
        raise _bad(where, f"token ids must be in [0, {MAX_TOKEN_ID}]")


def names(keys: Iterable[str], where: str, size: int) -> None:
    if size > MAX_MAP_ENTRIES:
        raise _bad(where, f"{size} entries, more than {MAX_MAP_ENTRIES}")
    for key in keys:
        text(key, where, MAX_NAME_CHARS)


def one_of(value: str, allowed: frozenset[str], where: str) -> None:
    if value not in allowed:
        raise _bad(where, f"{value[:MAX_NAME_CHARS]!r} is not one of {sorted(allowed)}")


# ---------------------------------------------------------------- shared value types


def sampling_sizes(s: m.SamplingParams, where: str) -> None:
    """Sizes only (lists, strings, integer widths): what any receiver needs to hold the value safely."""
    if len(s.stop) > MAX_STOP_STRINGS:
        raise _bad(where + ".stop", f"{len(s.stop)} stop strings, more than {MAX_STOP_STRINGS}")
    for stop in s.stop:
        text(stop, where + ".stop", MAX_STOP_CHARS)
    token_ids(s.stop_token_ids, where + ".stop_token_ids", MAX_STOP_TOKEN_IDS)
    if s.seed is not None and not -(1 << 63) <= s.seed < (1 << 64):
        raise _bad(where + ".seed", "must fit in 64 bits")
    if abs(s.max_tokens) > MAX_CONTEXT_TOKENS or abs(s.top_k) > MAX_TOKEN_ID:
        raise _bad(where, "max_tokens or top_k out of range")


def sampling(s: m.SamplingParams, where: str) -> None:
    """Sizes and ranges, as the frontend normalises them: ``max_tokens >= 1``, ``temperature >= 0``,
    ``0 < top_p <= 1``, ``top_k >= 0``."""
    sampling_sizes(s, where)
    count(s.max_tokens, where + ".max_tokens", MAX_CONTEXT_TOKENS, minimum=1)
    finite(s.temperature, where + ".temperature", 0.0)
    if not 0.0 < s.top_p <= 1.0:
        raise _bad(where + ".top_p", f"{s.top_p} outside (0, 1]")
    count(s.top_k, where + ".top_k", MAX_TOKEN_ID)
    if s.stop_after_tokens is not None:
        count(s.stop_after_tokens, where + ".stop_after_tokens", MAX_CONTEXT_TOKENS, minimum=1)


def slo(value: m.SLO, where: str) -> None:
    text(value.tier, where + ".tier", MAX_NAME_CHARS)
    for target in (value.ttft_s, value.tbt_s):
        if target is not None:
            finite(target, where, 0.0)


def request(r: m.Request, where: str = "request") -> None:
    ident(r.request_id, where + ".request_id")
    ident(r.client_id, where + ".client_id")
    token_ids(r.prompt_token_ids, where + ".prompt_token_ids", empty=False)
    sampling(r.sampling, where + ".sampling")
    finite(r.arrival_time, where + ".arrival_time")
    text(r.stream_addr, where + ".stream_addr", MAX_ADDR_CHARS, empty=False)
    text(r.stream_key, where + ".stream_key", MAX_NAME_CHARS)
    slo(r.slo, where + ".slo")
    if not (math.isfinite(r.weight) and r.weight > 0):
        raise _bad(where + ".weight", f"{r.weight} is not a finite number > 0")


def layout(value: m.KVLayout, where: str) -> None:
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        count(getattr(value, name), f"{where}.{name}", 1 << 20, minimum=1)
    text(value.dtype, where + ".dtype", MAX_NAME_CHARS, empty=False)


def load(value: m.WorkerLoad, where: str) -> None:
    count(value.total_blocks, where + ".total_blocks", MAX_BLOCKS)
    count(value.free_blocks, where + ".free_blocks", value.total_blocks)
    count(value.num_waiting, where + ".num_waiting", 1 << 30)
    count(value.num_running, where + ".num_running", 1 << 30)
    count(value.waiting_prompt_tokens, where + ".waiting_prompt_tokens", 1 << 40)
    count(value.preemptions, where + ".preemptions", 1 << 40)
    count(value.recomputed_tokens, where + ".recomputed_tokens", 1 << 50)
    finite(value.prefill_tps, where + ".prefill_tps", 0.0)
    names(value.handoffs, where + ".handoffs", len(value.handoffs))
    for stats in value.handoffs.values():
        names(stats, where + ".handoffs", len(stats))


def output(o: m.TokenOutput, where: str) -> None:
    ident(o.request_id, where + ".request_id")
    count(o.index, where + ".index", MAX_CONTEXT_TOKENS)
    token_ids(o.token_ids, where + ".token_ids")
    if o.finish_reason is not None:
        one_of(o.finish_reason, FINISH_REASONS, where + ".finish_reason")
    if len(o.timestamps) > MAX_CONTEXT_TOKENS:
        raise _bad(where + ".timestamps", "too many")
    if o.events:
        names(o.events, where + ".events", len(o.events))


def _output_in_range(o: m.TokenOutput) -> bool:
    """The common case of ``output`` in one expression (token batches are the hottest message)."""
    ids = o.token_ids
    return (0 < len(o.request_id) <= MAX_ID_CHARS and 0 <= o.index <= MAX_CONTEXT_TOKENS
            and len(ids) <= MAX_CONTEXT_TOKENS and (not ids or (min(ids) >= 0 and max(ids) <= MAX_TOKEN_ID))
            and (o.finish_reason is None or o.finish_reason in FINISH_REASONS)
            and len(o.timestamps) <= MAX_CONTEXT_TOKENS and not o.events)


# ---------------------------------------------------------------- per message type

def _submit(msg: m.SubmitRequest) -> None:
    request(msg.request)


def _cancel(msg: m.CancelRequest) -> None:
    ident(msg.request_id, "request_id")
    text(msg.reason, "reason", MAX_NAME_CHARS)


def _failed(msg: m.RequestFailed) -> None:
    ident(msg.request_id, "request_id")
    count(msg.code, "code", 599, minimum=100)
    text(msg.message, "message", MAX_MESSAGE_CHARS)
    if msg.retry_after_s is not None:
        finite(msg.retry_after_s, "retry_after_s", 0.0)


def _lost(msg: m.RequestLost) -> None:
    ident(msg.request_id, "request_id")
    text(msg.reason, "reason", MAX_MESSAGE_CHARS)


def _placed(msg: m.RequestPlaced) -> None:
    ident(msg.request_id, "request_id")
    if len(msg.workers) > MAX_PLACEMENT:
        raise _bad("workers", f"{len(msg.workers)} workers, more than {MAX_PLACEMENT}")
    for worker_id in msg.workers:
        ident(worker_id, "workers")


def _register(msg: m.RegisterWorker) -> None:
    ident(msg.worker_id, "worker_id")
    one_of(msg.role, ROLES, "role")
    text(msg.model, "model", MAX_MODEL_CHARS, empty=False)
    layout(msg.layout, "layout")
    text(msg.kv_addr, "kv_addr", MAX_ADDR_CHARS)
    load(msg.load, "load")
    count(msg.max_model_len, "max_model_len", MAX_CONTEXT_TOKENS, minimum=1)
    names(msg.kv_share, "kv_share", len(msg.kv_share))


def _register_ack(msg: m.RegisterAck) -> None:
    text(msg.error, "error", MAX_MESSAGE_CHARS)


def _heartbeat(msg: m.Heartbeat) -> None:
    ident(msg.worker_id, "worker_id")
    load(msg.load, "load")
    finite(msg.time, "time")


def _reserve(msg: m.ReserveKV) -> None:
    ident(msg.request_id, "request_id")
    count(msg.num_blocks, "num_blocks", MAX_BLOCKS)


def _reserved(msg: m.KVReserved) -> None:
    ident(msg.request_id, "request_id")
    ident(msg.worker_id, "worker_id")
    text(msg.error, "error", MAX_MESSAGE_CHARS)
    token_ids(msg.block_ids, "block_ids", MAX_BLOCKS)


def _prefill(msg: m.PrefillTask) -> None:
    request(msg.request)
    ident(msg.decode_worker_id, "decode_worker_id")
    text(msg.decode_kv_addr, "decode_kv_addr", MAX_ADDR_CHARS)
    finite(msg.admitted_time, "admitted_time")
    token_ids(msg.decode_blocks, "decode_blocks", MAX_BLOCKS)
    names(msg.decode_kv_share, "decode_kv_share", len(msg.decode_kv_share))


def _prefill_done(msg: m.PrefillDone) -> None:
    ident(msg.request_id, "request_id")
    ident(msg.worker_id, "worker_id")
    finite(msg.prefill_start, "prefill_start")
    finite(msg.prefill_end, "prefill_end")


def _kv_received(msg: m.KVReceived) -> None:
    ident(msg.request_id, "request_id")
    ident(msg.worker_id, "worker_id")
    count(msg.num_tokens, "num_tokens", MAX_CONTEXT_TOKENS, minimum=1)
    finite(msg.transfer_s, "transfer_s", 0.0)


def _token_report(msg: m.TokenReport) -> None:
    ident(msg.worker_id, "worker_id")
    if len(msg.counts) > MAX_MAP_ENTRIES:
        raise _bad("counts", f"{len(msg.counts)} entries, more than {MAX_MAP_ENTRIES}")
    for request_id, n in msg.counts.items():
        ident(request_id, "counts")
        count(n, "counts", MAX_CONTEXT_TOKENS)


def _request_done(msg: m.RequestDone) -> None:
    ident(msg.request_id, "request_id")
    ident(msg.worker_id, "worker_id")
    text(msg.finish_reason, "finish_reason", MAX_NAME_CHARS)


def _handoff(msg: m.KVHandoff) -> None:
    request(msg.request)
    count(msg.first_token_id, "first_token_id", MAX_TOKEN_ID)
    finite(msg.first_token_time, "first_token_time")
    count(msg.num_tokens, "num_tokens", MAX_CONTEXT_TOKENS, minimum=1)
    layout(msg.layout, "layout")
    count(len(msg.blocks), "blocks", MAX_BLOCKS)
    finite(msg.sent_time, "sent_time")
    one_of(msg.path, HANDOFF_PATHS, "path")


def _push_aborted(msg: m.KVPushAborted) -> None:
    ident(msg.request_id, "request_id")
    ident(msg.worker_id, "worker_id")


def _token_batch(msg: m.TokenBatch) -> None:
    if len(msg.outputs) > MAX_BATCH_OUTPUTS:
        raise _bad("outputs", f"{len(msg.outputs)} outputs, more than {MAX_BATCH_OUTPUTS}")
    for i, o in enumerate(msg.outputs):
        if not _output_in_range(o):
            output(o, f"outputs[{i}]")


def _client_generate(msg: m.ClientGenerate) -> None:
    ident(msg.request_id, "request_id")
    if msg.prompt is not None:
        text(msg.prompt, "prompt", MAX_PROMPT_CHARS)
    if msg.prompt_token_ids is not None:
        token_ids(msg.prompt_token_ids, "prompt_token_ids")
    sampling_sizes(msg.sampling, "sampling")
    if msg.api_key is not None:
        text(msg.api_key, "api_key", MAX_API_KEY_CHARS)
    if msg.slo is not None:  # sizes only, like the sampling: the frontend's SloPolicy checks the targets
        text(msg.slo.tier, "slo.tier", MAX_NAME_CHARS)


def _client_cancel(msg: m.ClientCancel) -> None:
    ident(msg.request_id, "request_id")


def _client_chunk(msg: m.ClientChunk) -> None:
    ident(msg.request_id, "request_id")
    token_ids(msg.token_ids, "token_ids")
    if msg.finish_reason is not None:
        one_of(msg.finish_reason, FINISH_REASONS, "finish_reason")
    count(msg.prompt_tokens, "prompt_tokens", MAX_CONTEXT_TOKENS)
    count(msg.completion_tokens, "completion_tokens", MAX_CONTEXT_TOKENS)


def _client_error(msg: m.ClientError) -> None:
    text(msg.request_id, "request_id", MAX_ID_CHARS)
    count(msg.code, "code", 599, minimum=100)
    text(msg.message, "message", MAX_MESSAGE_CHARS)


def _cluster_status(msg: m.ClusterStatus) -> None:
    for name in ("prefill_workers", "decode_workers", "colocated_workers", "waiting", "in_flight"):
        count(getattr(msg, name), name, 1 << 40)


_CHECKS: dict[type, Callable[[Any], None]] = {
    m.SubmitRequest: _submit, m.CancelRequest: _cancel, m.RequestFailed: _failed,
    m.RequestLost: _lost, m.RequestPlaced: _placed,
    m.RegisterWorker: _register, m.RegisterAck: _register_ack, m.Heartbeat: _heartbeat, m.ReserveKV: _reserve,
    m.KVReserved: _reserved, m.PrefillTask: _prefill, m.PrefillDone: _prefill_done, m.KVReceived: _kv_received,
    m.TokenReport: _token_report, m.RequestDone: _request_done, m.KVHandoff: _handoff,
    m.KVPushAborted: _push_aborted, m.TokenBatch: _token_batch, m.ClientGenerate: _client_generate,
    m.ClientCancel: _client_cancel, m.ClientChunk: _client_chunk, m.ClientError: _client_error,
    m.ClusterStatus: _cluster_status,
}
"""One check per message type that has fields (``StatusQuery`` has none); a type missing here gets the codec's type
and size checks only."""


def check_message(msg: Any) -> None:
    """Raise ``ProtocolError`` if ``msg`` (a decoded message) is outside the ranges above."""
    check = _CHECKS.get(type(msg))
    if check is not None:
        check(msg)


for _cls, _check in _CHECKS.items():
    register_check(_cls, _check)
