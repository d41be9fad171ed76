"""How the coordinator reaches its workers and frontends: what a worker registered beyond what the cluster core keeps,
and who submitted each request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diptych.proto.messages import Request, WorkerLoad


@dataclass
class Endpoint:
    identity: bytes
    """The worker's ZeroMQ routing identity on the control socket."""
    kv_addr: str
    """Where it receives KV handoffs (decode and flex roles)."""
    load: WorkerLoad
    """As of its last heartbeat."""
    max_model_len: int
    """The longest sequence (prompt plus outputs, tokens) its engine takes."""
    kv_share: dict[str, Any] = field(default_factory=dict)
    """Decode roles on a GPU: their pool shared for GPU-to-GPU pushes (``RegisterWorker.kv_share``)."""


@dataclass(frozen=True)
class Submission:
    """Who submitted a request: the request, the frontend's routing identity (where its failures go) and the name of
    the key it came with (None without CURVE; only that key may cancel it)."""

    request: Request
    frontend: bytes
    user_id: str | None
