"""Names shared by every process: worker roles and request phases. They travel as their string values."""

from __future__ import annotations

from enum import Enum


class WorkerRole(str, Enum):
    """What a worker registers as (``RegisterWorker.role``)."""

    PREFILL = "prefill"
    """Runs prompts and hands their KV to a decode worker."""
    DECODE = "decode"
    """Receives handed-off KV and generates the remaining tokens."""
    COLOCATED = "colocated"
    """Runs a request from prompt to last token in one engine (no handoff)."""
    FLEX = "flex"
    """Prefill or decode, as the coordinator's pool policy assigns it at run time."""


class Pool(str, Enum):
    """The pools the coordinator places work in; a flex worker serves the prefill or the decode pool."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class RequestPhase(str, Enum):
    """Where a request is in the cluster, as the coordinator tracks it."""

    QUEUED = "queued"
    """Waiting for admission."""
    RESERVING = "reserving"
    """Admitted; its decode worker is reserving KV blocks for the handoff."""
    PREFILLING = "prefilling"
    """Its prompt runs on a prefill (or colocated) worker."""
    HANDOFF = "handoff"
    """Prefill done; its KV is on the way to the decode worker."""
    DECODING = "decoding"
    """Generating output tokens."""
    ENDED = "ended"
    """Finished, failed or cancelled; kept only until every worker has let it go."""
