"""Who may send what to the coordinator, decided from the name of the CURVE key a message came with (its ZAP user
id): a pure function of the message, that name and the request it is about.

- ``SubmitRequest``, ``StatusQuery``: frontend keys only (``security.is_frontend_key``); ``CancelRequest`` only
  from the frontend key that submitted the request.
- ``RegisterWorker``: a worker key registering under its own name (``worker_id`` == key name).
- ``Heartbeat``, ``TokenReport``, ``KVReserved``, ``PrefillDone``, ``KVReceived``, ``RequestDone``: ``worker_id`` must
  be the key's name, and a message about a request only from the worker the request is on (``KVReserved`` and
  ``KVReceived`` from its decode worker, ``PrefillDone`` from its prefill worker, ``RequestDone`` from either).
  ``TokenReport`` counts for requests on other workers are dropped by its handler.

A refusal's reason is for the coordinator's log only; the sender learns nothing (``REFUSED``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diptych.cluster.requests import RequestRecord
from diptych.proto.messages import (
    CancelRequest,
    Heartbeat,
    KVReceived,
    KVReserved,
    PrefillDone,
    RegisterWorker,
    RequestDone,
    StatusQuery,
    SubmitRequest,
    TokenReport,
)
from diptych.services.common.security import is_frontend_key

REFUSED = "refused"
"""All a refused sender is told."""

FRONTEND_MESSAGES = (SubmitRequest, CancelRequest, StatusQuery)


def authorize(msg: Any, user_id: str | None, lookup: Callable[[str], RequestRecord | None]) -> str | None:
    """None if the key named ``user_id`` may send ``msg``, else why not (for the log). ``lookup`` finds a request's
    record (None when the coordinator does not know it: such messages are harmless and left to the handlers)."""
    if user_id is None:
        return "no authenticated key"
    if isinstance(msg, FRONTEND_MESSAGES):
        if not is_frontend_key(user_id):
            return "only a frontend key may send this"
        if isinstance(msg, CancelRequest):
            record = lookup(msg.request_id)
            if record is not None and record.payload.user_id != user_id:
                return f"request {msg.request_id} was submitted by another frontend"
        return None
    if is_frontend_key(user_id):
        return "a frontend key cannot act as a worker"
    if msg.worker_id != user_id:
        return f"it names worker {msg.worker_id!r}, not the key's own"
    if isinstance(msg, (RegisterWorker, Heartbeat, TokenReport)):
        return None
    record = lookup(msg.request_id)
    if record is None:
        return None
    if isinstance(msg, (KVReserved, KVReceived)):
        holders: tuple[str | None, ...] = (record.decode_worker,)
    elif isinstance(msg, PrefillDone):
        holders = (record.prefill_worker,)
    else:
        assert isinstance(msg, RequestDone)
        holders = (record.prefill_worker, record.decode_worker)
    return None if user_id in holders else f"request {msg.request_id} is not on this worker"
