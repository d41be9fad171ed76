"""Per-client service delivered by the cluster, whatever the admission policy: the fairness measure of the VTC
paper. Input tokens count when a request is dispatched, output tokens as workers report them.

Units: tokens; ``service`` is ``w_p * input + w_q * output`` with the same weights as VTC's defaults (1 and 2), so
policies can be compared on one scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

W_INPUT = 1.0
W_OUTPUT = 2.0


@dataclass
class ClientService:
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0

    @property
    def service(self) -> float:
        return W_INPUT * self.input_tokens + W_OUTPUT * self.output_tokens


class ServiceLedger:
    def __init__(self) -> None:
        self.clients: dict[str, ClientService] = {}

    def _client(self, client_id: str) -> ClientService:
        entry = self.clients.get(client_id)
        if entry is None:
            entry = self.clients[client_id] = ClientService()
        return entry

    def on_dispatch(self, client_id: str, prompt_tokens: int) -> None:
        entry = self._client(client_id)
        entry.input_tokens += prompt_tokens
        entry.requests += 1

    def on_output(self, client_id: str, count: int) -> None:
        self._client(client_id).output_tokens += count

    def snapshot(self) -> dict[str, Any]:
        return {cid: {"input_tokens": c.input_tokens, "output_tokens": c.output_tokens, "requests": c.requests,
                      "service": c.service} for cid, c in self.clients.items()}
