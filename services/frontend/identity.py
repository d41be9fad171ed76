"""Who is calling: API keys mapped to client identities.

The keys file is JSON: ``{"clients": {"<api key>": {"client_id": "alice", "weight": 1.0, "tier": "default"}}}``
(``weight`` and ``tier`` are optional). With no keys configured every request belongs to ``ANONYMOUS``; with keys
configured, a request without a known key is refused (HTTP 401 / SDK ``ClientError`` 401).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from proto import SLO


@dataclass(frozen=True)
class ClientIdentity:
    """``weight`` is the client's share in fair scheduling (> 0); ``tier`` names its SLO class."""

    client_id: str
    weight: float = 1.0
    tier: str = "default"


ANONYMOUS = ClientIdentity("anonymous")


class ClientDirectory:
    """Resolves API keys to identities. Invariant: ``requires_key`` iff at least one key is configured."""

    def __init__(self, clients: dict[str, ClientIdentity] | None = None) -> None:
        self._clients = dict(clients or {})

    @property
    def requires_key(self) -> bool:
        return bool(self._clients)

    def authenticate(self, api_key: str | None) -> ClientIdentity | None:
        """The identity for ``api_key``, ``ANONYMOUS`` when no keys are configured, None when refused."""
        if not self._clients:
            return ANONYMOUS
        return self._clients.get(api_key) if api_key else None

    def slo_for(self, client: ClientIdentity, requested: SLO | None = None) -> SLO:
        """The SLO a request runs under. With keys configured the tier is the key's (a client cannot promote
        itself); without keys the requested tier is used. Latency targets are the client's own."""
        requested = requested or SLO()
        tier = client.tier if self._clients else requested.tier
        return SLO(tier=tier, ttft_s=requested.ttft_s, tbt_s=requested.tbt_s)

    @classmethod
    def from_file(cls, path: str | Path | None) -> "ClientDirectory":
        """Load the keys file; raises ValueError naming the problem when it is malformed."""
        if not path:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read API keys file {path}: {exc}") from None
        entries = data.get("clients") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: expected {{\"clients\": {{<api key>: {{\"client_id\": ...}}}}}}")
        return cls({key: _parse_identity(key, entry, path) for key, entry in entries.items()})


def _parse_identity(key: str, entry: object, path: str | Path) -> ClientIdentity:
    where = f"{path}: client with key ending {key[-4:]!r}"
    if not key or not isinstance(entry, dict):
        raise ValueError(f"{where}: each key must be a non-empty string mapped to an object")
    client_id, weight, tier = entry.get("client_id"), entry.get("weight", 1.0), entry.get("tier", "default")
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"{where}: client_id must be a non-empty string")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: weight must be a positive number")
    if not isinstance(tier, str) or not tier:
        raise ValueError(f"{where}: tier must be a non-empty string")
    return ClientIdentity(client_id, float(weight), tier)
