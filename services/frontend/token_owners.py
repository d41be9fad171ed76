"""Which workers may stream a request's tokens to this frontend: with CURVE, an output is applied only when the key
that sent it (the token stream's ZAP user id) is one of the workers the coordinator placed the request on
(``RequestPlaced``). Without CURVE (no user id) every output passes.

Outputs can reach the token stream before the placement reaches the coordinator link (two sockets): an output of a
running request whose placement is unknown waits here (at most ``MAX_WAITING`` per request) until ``place`` decides
on it. A refused output is logged with the key that sent it and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from diptych import proto

log = logging.getLogger(__name__)

MAX_WAITING = 64
"""Outputs held per request while its placement is unknown; later ones are dropped (a placement comes in ms)."""


class TokenOwners:
    def __init__(self, is_running: Callable[[str], bool]) -> None:
        """``is_running(request_id)``: whether this frontend streams the request (cluster request id)."""
        self._is_running = is_running
        self._owners: dict[str, set[str]] = {}
        self._waiting: dict[str, list[tuple[str, proto.TokenOutput]]] = {}

    def admit(self, sender: str | None, outputs: list[proto.TokenOutput]) -> list[proto.TokenOutput]:
        """The outputs of one ``TokenBatch`` from key ``sender`` that may be applied now."""
        if sender is None:
            return outputs
        admitted = []
        for output in outputs:
            rid = output.request_id
            owners = self._owners.get(rid)
            if owners is None:
                waiting = self._waiting.setdefault(rid, []) if self._is_running(rid) else None
                if waiting is not None and len(waiting) < MAX_WAITING:
                    waiting.append((sender, output))
                else:
                    log.debug("req=%s dropped output %d from %s: not running here", rid, output.index, sender)
            elif sender in owners:
                admitted.append(output)
            else:
                self._refuse(rid, sender, output)
        return admitted

    def place(self, msg: proto.RequestPlaced) -> list[proto.TokenOutput]:
        """Record where a request runs (a request placed again keeps its earlier workers too: their last outputs
        may still be on the way); returns the waiting outputs that its workers sent."""
        if not self._is_running(msg.request_id):
            return []
        owners = self._owners.setdefault(msg.request_id, set())
        owners.update(msg.workers)
        admitted = []
        for sender, output in self._waiting.pop(msg.request_id, []):
            if sender in owners:
                admitted.append(output)
            else:
                self._refuse(msg.request_id, sender, output)
        return admitted

    def forget(self, request_id: str) -> None:
        self._owners.pop(request_id, None)
        self._waiting.pop(request_id, None)

    @staticmethod
    def _refuse(request_id: str, sender: str, output: proto.TokenOutput) -> None:
        log.warning("req=%s refused output %d from key %s: the request is not on that worker", request_id,
                    output.index, sender)
