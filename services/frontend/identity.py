"""Who is calling: API keys mapped to client identities, and the SLO tiers those clients run in.

The keys file is JSON::

    {"tiers": {"strict": {"tbt_s": 0.1, "ttft_s": 1.0}, "relaxed": {"tbt_s": 0.5}},      (optional)
     "clients": {"<api key>": {"client_id": "alice", "weight": 1.0, "tier": "strict"}}}

(``weight`` and ``tier`` are optional; ``tier`` must name a known tier). Optional ``"admins": ["<admin key>", ...]``
lists operator keys (also ``--admin-keys FILE``: one key per line, ``#`` comments); an admin key is not a client key
and a client key is never an admin key. The tiers map may instead come from its own
file (``--slo-tiers``, with or without a keys file): the same ``{"<name>": {...}}`` object; giving tiers in both
files is an error. With neither, the built-in tiers apply (``services.frontend.slo``). With no keys configured every
request belongs to ``ANONYMOUS``; with keys configured, a request without a known key is refused (HTTP 401 / SDK
``ClientError`` 401).

Operator endpoints (``AdminAccess``): open only when no key of either kind is configured (a development cluster);
otherwise they need an admin key: a client key is refused (403), any other key is unauthenticated (401).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diptych.services.frontend.slo import DEFAULT_TIER, SloPolicy, Tier, parse_tiers

_KEYS_FILE_KEYS = frozenset({"tiers", "clients", "admins"})


@dataclass(frozen=True)
class ClientIdentity:
    """``weight`` is the client's share in fair scheduling (> 0); ``tier`` names its SLO class."""

    client_id: str
    weight: float = 1.0
    tier: str = DEFAULT_TIER


ANONYMOUS = ClientIdentity("anonymous")


class AdminAccess(enum.Enum):
    """What a key may do at an operator endpoint."""

    GRANTED = "granted"
    FORBIDDEN = "forbidden"
    """A client (tenant) key: authenticated, not an operator."""
    UNAUTHENTICATED = "unauthenticated"


class ClientDirectory:
    """Resolves API keys to identities. Invariants: ``requires_key`` iff at least one client key is configured; no
    key is both a client key and an admin key."""

    def __init__(self, clients: dict[str, ClientIdentity] | None = None, admins: frozenset[str] = frozenset()) -> None:
        self._clients = dict(clients or {})
        self._admins = frozenset(admins)
        if self._admins & self._clients.keys():
            raise ValueError("a key cannot be both a client key and an admin key")

    @property
    def admin_open(self) -> bool:
        """True when no key of any kind is configured: operator endpoints answer everyone (development only)."""
        return not self._clients and not self._admins

    def admin_access(self, api_key: str | None) -> AdminAccess:
        if self.admin_open or (api_key and api_key in self._admins):
            return AdminAccess.GRANTED
        if api_key and api_key in self._clients:
            return AdminAccess.FORBIDDEN
        return AdminAccess.UNAUTHENTICATED

    @property
    def requires_key(self) -> bool:
        return bool(self._clients)

    def authenticate(self, api_key: str | None) -> ClientIdentity | None:
        """The identity for ``api_key``, ``ANONYMOUS`` when no keys are configured, None when refused."""
        if not self._clients:
            return ANONYMOUS
        return self._clients.get(api_key) if api_key else None


def load_access(keys_file: str | Path | None, tiers_file: str | Path | None = None,
                admin_keys_file: str | Path | None = None) -> tuple[ClientDirectory, SloPolicy]:
    """Load the keys file, tiers file and admin keys file (each optional). Raises ValueError naming the file and the
    problem when one is malformed, when tiers are given twice, when a client names an unknown tier, or when a key is
    both a client's and an admin's."""
    keys = _read_json(keys_file, "API keys") if keys_file else {"clients": {}}
    if not isinstance(keys, dict) or not isinstance(keys.get("clients"), dict) or set(keys) - _KEYS_FILE_KEYS:
        raise ValueError(f'{keys_file}: expected {{"tiers": {{...}} (optional), "clients": {{<api key>: '
                         '{"client_id": ...}}, "admins": [<admin key>, ...] (optional)}')
    admins = keys.get("admins", [])
    if not isinstance(admins, list) or not all(isinstance(k, str) and k for k in admins):
        raise ValueError(f"{keys_file}: admins must be a list of non-empty key strings")
    if admin_keys_file:
        admins = [*admins, *_read_key_lines(admin_keys_file)]
    tiers: dict[str, Tier] | None = None
    if "tiers" in keys:
        if tiers_file:
            raise ValueError(f"SLO tiers given twice: in {keys_file} and in {tiers_file}; keep one")
        tiers = parse_tiers(keys["tiers"], f"{keys_file}: tiers")
    elif tiers_file:
        tiers = parse_tiers(_read_json(tiers_file, "SLO tiers"), str(tiers_file))
    policy = SloPolicy(tiers, client_tiers_fixed=bool(keys["clients"]))
    clients = {key: _parse_identity(key, entry, keys_file, policy) for key, entry in keys["clients"].items()}
    if set(admins) & clients.keys():
        raise ValueError(f"{keys_file}: a key is both a client key and an admin key; give operators their own keys")
    return ClientDirectory(clients, frozenset(admins)), policy


def _read_key_lines(path: str | Path) -> list[str]:
    """Keys one per line; blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read admin keys file {path}: {exc}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"admin keys file {path} holds no key")
    return keys


def _read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {what} file {path}: {exc}") from None


def _parse_identity(key: str, entry: object, path: str | Path | None, policy: SloPolicy) -> ClientIdentity:
    where = f"{path}: client with key ending {key[-4:]!r}"
    if not key or not isinstance(entry, dict):
        raise ValueError(f"{where}: each key must be a non-empty string mapped to an object")
    client_id, weight, tier = entry.get("client_id"), entry.get("weight", 1.0), entry.get("tier", DEFAULT_TIER)
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"{where}: client_id must be a non-empty string")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: weight must be a positive number")
    if not isinstance(tier, str) or tier not in policy.tiers:
        raise ValueError(f"{where}: unknown tier {tier!r}; known tiers: {', '.join(sorted(policy.tiers))}")
    return ClientIdentity(client_id, float(weight), tier)
