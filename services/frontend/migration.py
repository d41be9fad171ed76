"""Request migration: a request whose worker was lost is resubmitted by the frontend that streams it.

The coordinator releases everything it held for a lost request and tells its frontend (``RequestLost``). The
frontend knows exactly which tokens it has applied to the client's stream, so it resubmits the prompt followed by
those tokens, for the remaining ``max_tokens``, under a new cluster request id (``<request id>-m<n>``); the new
request's outputs, numbered from 0, continue the client's stream after the tokens already sent. Outputs of the lost
request that arrive late carry the old id and are dropped, so no token is lost or repeated, and a greedy request's
output equals an undisturbed run (its recomputed prefix is the same tokens). A coordinator restart loses every
request it held: ``watch_coordinator`` notices the new instance and the frontend resubmits all its running
requests the same way. Design and figures: ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

from diptych import proto

log = logging.getLogger(__name__)

MAX_MIGRATIONS = 3
"""Resubmissions of one request at most; a request whose workers keep being lost then fails with 503."""


class StatusSource(Protocol):
    async def query_status(self, timeout_s: float) -> proto.ClusterStatus | None: ...


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


class CoordinatorWatch:
    """Notices a coordinator restart: ``check`` reads the coordinator's ``ClusterStatus.instance`` and returns True
    when it differs from the one seen before (the new coordinator knows none of the requests submitted to the old
    one, and its workers have aborted them). Unanswered queries change nothing."""

    def __init__(self) -> None:
        self.instance: str | None = None

    def changed(self, status: proto.ClusterStatus | None) -> bool:
        if status is None or not status.instance:
            return False
        before, self.instance = self.instance, status.instance
        return before is not None and before != status.instance


async def watch_coordinator(link: StatusSource, on_restart: Callable[[str], None], interval_s: float = 1.0) -> None:
    """Query the coordinator's status every ``interval_s`` seconds; call ``on_restart(reason)`` when it restarted."""
    watch = CoordinatorWatch()
    while True:
        if watch.changed(await link.query_status(interval_s)):
            log.warning("the coordinator restarted (instance %s): resubmitting the running requests", watch.instance)
            on_restart("the coordinator restarted")
        await asyncio.sleep(interval_s)
