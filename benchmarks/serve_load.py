"""``diptych bench serve``: an open-loop load generator against a running Diptych, over the SDK or the HTTP API.

Each ``workloads.RequestSpec`` is sent at its arrival time (seconds from the start of the run), whatever happened
to earlier requests (open loop), with ``max_tokens = spec.max_tokens`` (what the workload's ``--max-tokens`` policy
set: the scheduler sees a client's cap, not the output length), ``stop_after_tokens = spec.output_len`` and
``ignore_eos`` (so the output length is the spec's, as in the simulator, without telling the scheduler), the spec's
SLO tier and targets, and a prompt of ``prompt_len`` token ids. Each
request's timeline comes back from the frontend and is kept as a ``metrics.RequestTimeline``; the run is written as
one JSON file (``metrics.timeline.save_timelines``) and summarised with the same code as ``diptych simulate``.

Client identity: ``--client-keys FILE`` maps each workload client id to an API key (JSON ``{"client": "key"}``),
so the coordinator's fairness policy sees the workload's clients; without it every request is sent without a key.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from diptych.client import AsyncClient
from diptych.errors import DiptychError, RateLimitError
from diptych.metrics.timeline import RequestTimeline, from_service_timeline
from diptych.workloads.spec import RequestSpec

TOKEN_ID_RANGE = (10, 250)
"""Prompt token ids are drawn from here: valid for every model with a vocabulary of 256 or more (the tiny one)."""


@dataclass
class LoadTarget:
    """Where to send: ``endpoint`` is ``tcp://...`` (SDK) or ``http://...`` (OpenAI API; ``model`` names it)."""

    endpoint: str
    client_keys: dict[str, str]
    model: str | None = None
    timeout_s: float = 600.0

    @property
    def over_http(self) -> bool:
        return self.endpoint.startswith(("http://", "https://"))


def prompt_ids(spec: RequestSpec, seed: int) -> list[int]:
    rng = random.Random(f"{seed}:{spec.request_id}")
    return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(spec.prompt_len)]


def sampling_fields(spec: RequestSpec) -> dict[str, Any]:
    """The generation fields of ``spec``'s request, as SDK keywords and HTTP body fields alike (same names)."""
    return {"max_tokens": spec.max_tokens, "stop_after_tokens": spec.output_len, "ignore_eos": True,
            "temperature": 0.0}


def slo_fields(spec: RequestSpec) -> dict[str, Any]:
    fields: dict[str, Any] = {"tier": spec.tier}
    if spec.tbt_slo_s is not None:
        fields["tbt_s"] = spec.tbt_slo_s
    if spec.ttft_slo_s is not None:
        fields["ttft_s"] = spec.ttft_slo_s
    return fields


async def _send_sdk(clients: dict[str | None, AsyncClient], target: LoadTarget, spec: RequestSpec,
                    seed: int) -> RequestTimeline:
    client = clients[target.client_keys.get(spec.client_id)]
    try:
        result = await client.complete(prompt_token_ids=prompt_ids(spec, seed), timeline=True,
                                       **sampling_fields(spec), **slo_fields(spec))
    except RateLimitError as exc:
        return _refused(spec, "rejected", f"429 {exc}")
    except DiptychError as exc:
        return _refused(spec, "failed", f"{getattr(exc, 'code', '')} {exc}".strip())
    return from_service_timeline(spec, result.timeline)


async def _send_http(http: httpx.AsyncClient, target: LoadTarget, spec: RequestSpec, seed: int) -> RequestTimeline:
    key = target.client_keys.get(spec.client_id)
    body = {"model": target.model, "prompt": prompt_ids(spec, seed), **sampling_fields(spec),
            "diptych": {"timeline": True, **slo_fields(spec)}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = await http.post("/v1/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        return _refused(spec, "failed", f"{type(exc).__name__} {exc}")
    if resp.status_code != 200:
        detail = f"{resp.status_code} {resp.text[:200]}"
        return _refused(spec, "rejected" if resp.status_code == 429 else "failed", detail)
    return from_service_timeline(spec, resp.json().get("timeline"))


FAILURES: Counter[str] = Counter()
"""Why requests of the current process's runs were refused or failed (reason -> count), for the report."""


def _refused(spec: RequestSpec, status: str, reason: str) -> RequestTimeline:
    FAILURES[reason] += 1
    now = time.time()
    return from_service_timeline(spec, {"arrival": now, "finish": now}, status=status)


async def run_load(specs: list[RequestSpec], target: LoadTarget, seed: int = 0,
                   progress: bool = True) -> list[RequestTimeline]:
    """Send every spec at its arrival time and collect the timelines, in spec order."""
    bar = tqdm(total=len(specs), desc="requests", unit="req", disable=not progress)
    clients: dict[str | None, AsyncClient] = {}
    http = None
    if target.over_http:
        http = httpx.AsyncClient(base_url=target.endpoint, timeout=target.timeout_s,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        if target.model is None:
            key = next(iter(target.client_keys.values()), None)
            resp = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
            if resp.status_code != 200:
                await http.aclose()
                raise ValueError(f"GET /v1/models answered {resp.status_code}: {resp.text[:200]} (give --model)")
            target.model = resp.json()["data"][0]["id"]
    else:
        for key in {None, *target.client_keys.values()}:
            clients[key] = AsyncClient(target.endpoint, api_key=key, timeout_s=target.timeout_s)
    start = time.time()

    async def one(spec: RequestSpec) -> RequestTimeline:
        await asyncio.sleep(max(0.0, start + spec.arrival_time - time.time()))
        timeline = await (_send_http(http, target, spec, seed) if http is not None
                          else _send_sdk(clients, target, spec, seed))
        bar.update()
        return timeline

    try:
        return list(await asyncio.gather(*[one(spec) for spec in specs]))
    finally:
        bar.close()
        if http is not None:
            await http.aclose()
        for client in clients.values():
            await client.close()


def load_client_keys(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    with open(path) as f:
        keys = json.load(f)
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise ValueError(f"{path}: expected a JSON object mapping client ids to API keys")
    return keys
