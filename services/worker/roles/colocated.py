"""The colocated role: runs a request from prompt to last token on this worker, its prefill and decode sharing the
engine's batches (no KV handoff). It queues the request and, at its first token, hands it to the decode role
(``adopt``), which streams and reports that token and every later one.

Invariant: a colocated request is owned by this role from its task until its first token (or abort), then by the
decode role; never by both. This role must run before the decode role in an iteration (``ROLE_ORDER``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from diptych.engine.outputs import StepOutput
from diptych.proto.messages import PrefillTask, Request, RequestDone, WorkerLoad
from diptych.proto.roles import Pool
from diptych.services.worker.links import WorkerLinks
from diptych.services.worker.roles.prefill import PrefillJob, first_tokens, is_colocated

log = logging.getLogger("diptych.colocated")

Adopt = Callable[[Request, dict[str, float]], None]
"""Hands a request at its first token to the role that decodes it, with its prefill events (``DecodeRole.adopt``)."""


class ColocatedRole:
    kind = Pool.COLOCATED

    def __init__(self, links: WorkerLinks, adopt: Adopt) -> None:
        self.links = links
        self.engine = links.engine
        self._adopt = adopt
        self._jobs: dict[str, PrefillJob] = {}

    def kv_ingress(self) -> tuple[str, dict[str, Any]] | None:
        return None

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return []

    async def handle(self, msg: Any) -> bool:
        if not isinstance(msg, PrefillTask) or not is_colocated(msg):
            return False
        request = msg.request
        rid = request.request_id
        try:
            await self.links.engine_call(self.engine.add_request, rid, request.prompt_token_ids, request.sampling,
                                         arrival_time=request.arrival_time, slo=request.slo)
        except (ValueError, KeyError) as exc:
            log.warning("req=%s refused: %s", rid, exc)
            await self.links.send_control(RequestDone(request_id=rid, worker_id=self.links.worker_id,
                                                      finish_reason="error"))
            return True
        self._jobs[rid] = PrefillJob(request=request, decode_kv_addr="", admitted_time=msg.admitted_time or time.time())
        log.debug("req=%s colocated request queued (%d prompt tokens)", rid, len(request.prompt_token_ids))
        return True

    def output_needs_engine(self, output: StepOutput) -> bool:
        return False

    async def after_step(self, output: StepOutput) -> None:
        for rid, tok in first_tokens(output, self._jobs).items():
            job = self._jobs.pop(rid)
            self._adopt(job.request, job.events(tok.time))

    async def prepare_abort(self, request_id: str) -> bool:
        return False

    async def aborted(self, request_id: str, held: bool) -> None:
        if held:
            self._jobs.pop(request_id, None)

    def report(self, load: WorkerLoad) -> None:
        pass
