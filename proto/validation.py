"""Range and size checks every received message passes before a service sees it.

``codec.decode`` checks types (and a global cap on every string and list, ``MAX_TEXT_CHARS``, ``MAX_LIST_ITEMS``);
this module adds, per message type, the ranges its receiver relies on: non-empty bounded ids, positive
``max_tokens``, ``temperature >= 0``, ``top_p`` in (0, 1], non-negative counts and blocks, token ids in
``[0, MAX_TOKEN_ID]``, bounded lists and maps. A message outside them raises ``ProtocolError``, which every receiver
already answers or drops. The limits are documented in ``proto/README.md``.

What no message can tell on its own stays with the receiver: a prompt against the model's context length or
vocabulary (the coordinator's ``max_model_len``), a block count against a pool's size, a request id it never issued.
``ClientGenerate.sampling`` gets only size checks here: the frontend checks its ranges and answers with the SDK's
request id (a 400 naming the parameter), which a decode error could not carry.

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

_CHECKS: dict[type, Callable[[Any], None]] = {
    m.SubmitRequest: lambda msg: request(msg.request),
    m.CancelRequest: lambda msg: (ident(msg.request_id, "request_id"), text(msg.reason, "reason", MAX_NAME_CHARS)),
    m.RequestFailed: lambda msg: (ident(msg.request_id, "request_id"), count(msg.code, "code", 599, minimum=100),
                                  text(msg.message, "message", MAX_MESSAGE_CHARS),
                                  msg.retry_after_s is None or finite(msg.retry_after_s, "retry_after_s", 0.0)),
    m.RegisterWorker: lambda msg: (ident(msg.worker_id, "worker_id"), one_of(msg.role, ROLES, "role"),
                                   text(msg.model, "model", MAX_MODEL_CHARS, empty=False), layout(msg.layout, "layout"),
                                   text(msg.kv_addr, "kv_addr", MAX_ADDR_CHARS), load(msg.load, "load"),
                                   count(msg.max_model_len, "max_model_len", MAX_CONTEXT_TOKENS, minimum=1),
                                   names(msg.kv_share, "kv_share", len(msg.kv_share))),
    m.RegisterAck: lambda msg: text(msg.error, "error", MAX_MESSAGE_CHARS),
    m.Heartbeat: lambda msg: (ident(msg.worker_id, "worker_id"), load(msg.load, "load"), finite(msg.time, "time")),
    m.ReserveKV: lambda msg: (ident(msg.request_id, "request_id"), count(msg.num_blocks, "num_blocks", MAX_BLOCKS)),
    m.KVReserved: lambda msg: (ident(msg.request_id, "request_id"), ident(msg.worker_id, "worker_id"),
                               text(msg.error, "error", MAX_MESSAGE_CHARS),
                               token_ids(msg.block_ids, "block_ids", MAX_BLOCKS)),
    m.PrefillTask: lambda msg: (request(msg.request), ident(msg.decode_worker_id, "decode_worker_id"),
                                text(msg.decode_kv_addr, "decode_kv_addr", MAX_ADDR_CHARS),
                                finite(msg.admitted_time, "admitted_time"),
                                token_ids(msg.decode_blocks, "decode_blocks", MAX_BLOCKS),
                                names(msg.decode_kv_share, "decode_kv_share", len(msg.decode_kv_share))),
    m.PrefillDone: lambda msg: (ident(msg.request_id, "request_id"), ident(msg.worker_id, "worker_id"),
                                finite(msg.prefill_start, "prefill_start"), finite(msg.prefill_end, "prefill_end")),
    m.KVReceived: lambda msg: (ident(msg.request_id, "request_id"), ident(msg.worker_id, "worker_id"),
                               count(msg.num_tokens, "num_tokens", MAX_CONTEXT_TOKENS, minimum=1),
                               finite(msg.transfer_s, "transfer_s", 0.0)),
    m.TokenReport: lambda msg: (ident(msg.worker_id, "worker_id"), _token_counts(msg.counts)),
    m.RequestDone: lambda msg: (ident(msg.request_id, "request_id"), ident(msg.worker_id, "worker_id"),
                                text(msg.finish_reason, "finish_reason", MAX_NAME_CHARS)),
    m.KVHandoff: lambda msg: (request(msg.request), count(msg.first_token_id, "first_token_id", MAX_TOKEN_ID),
                              finite(msg.first_token_time, "first_token_time"),
                              count(msg.num_tokens, "num_tokens", MAX_CONTEXT_TOKENS, minimum=1),
                              layout(msg.layout, "layout"), count(len(msg.blocks), "blocks", MAX_BLOCKS),
                              finite(msg.sent_time, "sent_time"), one_of(msg.path, HANDOFF_PATHS, "path")),
    m.KVPushAborted: lambda msg: (ident(msg.request_id, "request_id"), ident(msg.worker_id, "worker_id")),
    m.TokenBatch: lambda msg: _outputs(msg.outputs),
    m.ClientGenerate: lambda msg: (ident(msg.request_id, "request_id"), _client_prompt(msg),
                                   sampling_sizes(msg.sampling, "sampling"),
                                   msg.api_key is None or text(msg.api_key, "api_key", MAX_API_KEY_CHARS),
                                   msg.slo is None or slo(msg.slo, "slo")),
    m.ClientCancel: lambda msg: ident(msg.request_id, "request_id"),
    m.ClientChunk: lambda msg: (ident(msg.request_id, "request_id"), token_ids(msg.token_ids, "token_ids"),
                                msg.finish_reason is None or one_of(msg.finish_reason, FINISH_REASONS,
                                                                    "finish_reason"),
                                count(msg.prompt_tokens, "prompt_tokens", MAX_CONTEXT_TOKENS),
                                count(msg.completion_tokens, "completion_tokens", MAX_CONTEXT_TOKENS)),
    m.ClientError: lambda msg: (text(msg.request_id, "request_id", MAX_ID_CHARS),
                                count(msg.code, "code", 599, minimum=100),
                                text(msg.message, "message", MAX_MESSAGE_CHARS)),
    m.ClusterStatus: lambda msg: (count(msg.prefill_workers, "prefill_workers", 1 << 20),
                                  count(msg.decode_workers, "decode_workers", 1 << 20),
                                  count(msg.colocated_workers, "colocated_workers", 1 << 20),
                                  count(msg.waiting, "waiting", 1 << 40), count(msg.in_flight, "in_flight", 1 << 40)),
}
"""One check per message type that has fields; ``StatusQuery`` has none."""


def _token_counts(counts: dict[str, int]) -> None:
    if len(counts) > MAX_MAP_ENTRIES:
        raise _bad("counts", f"{len(counts)} entries, more than {MAX_MAP_ENTRIES}")
    for request_id, n in counts.items():
        ident(request_id, "counts")
        count(n, "counts", MAX_CONTEXT_TOKENS)


def _outputs(outputs: list[m.TokenOutput]) -> None:
    if len(outputs) > MAX_BATCH_OUTPUTS:
        raise _bad("outputs", f"{len(outputs)} outputs, more than {MAX_BATCH_OUTPUTS}")
    for i, o in enumerate(outputs):
        if not _output_in_range(o):
            output(o, f"outputs[{i}]")


def _client_prompt(msg: m.ClientGenerate) -> None:
    if msg.prompt is not None:
        text(msg.prompt, "prompt", MAX_PROMPT_CHARS)
    if msg.prompt_token_ids is not None:
        token_ids(msg.prompt_token_ids, "prompt_token_ids")


def check_message(msg: Any) -> None:
    """Raise ``ProtocolError`` if ``msg`` (a decoded message) is outside the ranges above."""
    check = _CHECKS.get(type(msg))
    if check is not None:
        check(msg)


for _cls, _check in _CHECKS.items():
    register_check(_cls, _check)
