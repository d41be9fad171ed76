"""Request migration: a request whose worker was lost is resubmitted by the frontend that streams it.

The coordinator releases everything it held for a lost request and tells its frontend (``RequestLost``). The
frontend knows exactly which tokens it has applied to the client's stream, so it resubmits the prompt followed by
those tokens, for the remaining ``max_tokens``, under a new cluster request id (``<request id>-m<n>``); the new
request's outputs, numbered from 0, continue the client's stream after the tokens already sent. Outputs of the lost
request that arrive late carry the old id and are dropped, so no token is lost or repeated, and a greedy request's
output equals an undisturbed run (its recomputed prefix is the same tokens). Design and figures:
``docs/reliability.md``.
"""

from __future__ import annotations

import dataclasses

from diptych import proto

MAX_MIGRATIONS = 3
"""Resubmissions of one request at most; a request whose workers keep being lost then fails with 503."""


def resubmission(original: proto.Request, streamed: list[int], attempt: int) -> proto.Request | None:
    """``original`` as it must be resubmitted after ``streamed`` output tokens reached the client, for migration
    number ``attempt`` (1, 2, ...), or None when it may not be (too many migrations, or nothing left to generate)."""
    remaining = original.sampling.max_tokens - len(streamed)
    if attempt > MAX_MIGRATIONS or remaining <= 0:
        return None
    return dataclasses.replace(
        original, request_id=f"{original.request_id}-m{attempt}",
        prompt_token_ids=[*original.prompt_token_ids, *streamed],
        sampling=dataclasses.replace(original.sampling, max_tokens=remaining))
